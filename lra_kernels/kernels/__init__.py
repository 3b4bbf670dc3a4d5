"""Kernels: each file holds a Triton kernel, its pure-torch ``*_ref`` and a validating launcher.

``triton_ops()`` returns the operation namespace of the ``"triton"`` backend (see
``lra_kernels.backend``); it imports Triton, so it is only called when that backend is used.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def triton_ops():
    """The ``"triton"`` backend: the Triton launchers, with the fields of ``backend.TORCH_OPS``.

    The attention core is ``backend.attention_ref`` (PyTorch SDPA) in the model's activation dtype.
    """
    from types import SimpleNamespace

    from ..backend import attention_ref, matmul_rows
    from ._triton import HAVE_TRITON
    from .exit_head import exit_head
    from .gate_features import gate_features
    from .int8_gemm import int8_gemm
    from .layernorm_quant import layernorm_quant, quantize_per_tensor, quantize_per_token

    if not HAVE_TRITON:
        raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
    return SimpleNamespace(
        name="triton",
        layernorm_quant=layernorm_quant,
        quantize_per_token=quantize_per_token,
        quantize_per_tensor=quantize_per_tensor,
        int8_gemm=int8_gemm,
        attention=attention_ref,
        exit_head=exit_head,
        gate_features=gate_features,
        matmul_rows=matmul_rows,
        fused_block=None,
        fused_linear=None,
    )
