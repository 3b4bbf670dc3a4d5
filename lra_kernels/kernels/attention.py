"""The attention core: multi-head softmax attention of a packed ``qkv``, through PyTorch's SDPA.

    q, k, v   = qkv[b, t, :D], qkv[b, t, D:2D], qkv[b, t, 2D:], split into ``n_head`` heads
    out[b, t] = concat_h softmax(q_h k_h^T / sqrt(D / n_head)) v_h

``causal``: token ``t`` attends to tokens ``0..t`` only (open_clip's text tower, whose additive
``attn_mask`` is ``-inf`` above the diagonal), i.e. SDPA's ``is_causal``.

Shapes and dtypes: ``qkv[B, T, 3D]`` in the model's activation dtype; ``out[B, T, D]`` in the same
dtype. There is no Triton kernel: SDPA is what every backend but the CPU kernels (which fuse the
quantization of the output, ``lra_kernels.cpu``) runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_ref(qkv: torch.Tensor, n_head: int, causal: bool = False) -> torch.Tensor:
    """Multi-head self-attention core: ``qkv[B, T, 3D]`` -> ``[B, T, D]`` via SDPA, in ``qkv``'s dtype
    (``causal``: each token attends to itself and the tokens before it)."""
    B, T, three_d = qkv.shape
    D = three_d // 3
    q, k, v = qkv.view(B, T, 3, n_head, D // n_head).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))
    return out.transpose(1, 2).reshape(B, T, D)
