"""Kernels: each file holds a Triton kernel, its pure-torch ``*_ref`` and a validating launcher.

``triton_ops()`` returns the operation namespace of the ``"triton"`` backend (see
``lra_kernels.backend``); it imports Triton, so it is only called when that backend is used.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def triton_ops():
    """The ``"triton"`` backend: the Triton launchers, with the fields of ``backend.TORCH_OPS``.

    ``attn_dtype`` (what the qkv GEMM writes and SDPA runs in) is fp16 on CUDA, where SDPA's
    flash/memory-efficient kernels want half precision; under ``TRITON_INTERPRET=1`` (CPU tensors,
    tests) it is fp32, as on the torch backend, so the two backends can be compared code for code.
    The attention core itself is ``backend.attention_ref`` (PyTorch SDPA) on both.
    """
    from types import SimpleNamespace

    import torch

    from ..backend import attention_ref
    from ._launch import interpreting
    from ._triton import HAVE_TRITON
    from .exit_head import exit_head
    from .gate_features import gate_features
    from .int8_gemm import int8_gemm
    from .layernorm_quant import layernorm_quant, quantize_per_tensor, quantize_per_token

    if not HAVE_TRITON:
        raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
    return SimpleNamespace(
        name="triton",
        attn_dtype=torch.float32 if interpreting() else torch.float16,
        # The MLP hidden is re-quantized to INT8 right away: fp16 halves its round trip on GPU.
        hidden_dtype=torch.float32 if interpreting() else torch.float16,
        layernorm_quant=layernorm_quant,
        quantize_per_token=quantize_per_token,
        quantize_per_tensor=quantize_per_tensor,
        int8_gemm=int8_gemm,
        attention=attention_ref,
        exit_head=exit_head,
        gate_features=gate_features,
    )
