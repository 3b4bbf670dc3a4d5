"""Backend selection, in one place.

A backend is a small namespace of operations with the contracts of the kernel references:
``layernorm_quant``, ``quantize_per_token``, ``quantize_per_tensor``, ``int8_gemm``,
``attention``, ``exit_head``, ``gate_features``. The float activations run in the model's
``act_dtype`` (``lra_kernels.hardware``), whatever the backend. Modules receive the namespace and
call it; they never branch on the backend.

- ``"torch"``: the ``*_ref`` functions (``torch._int_mm`` for the INT8 GEMMs). On CPU the
  transformer blocks are compiled with TorchInductor (see ``compile_blocks``) so that the
  quantize / dequantize element-wise passes fuse; eager otherwise.
- ``"triton"``: the Triton kernels of ``lra_kernels.kernels`` (CUDA, or CPU tensors under
  ``TRITON_INTERPRET=1``).
- ``"auto"``: ``"triton"`` on CUDA, ``"torch"`` elsewhere.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .kernels.int8_gemm import int8_gemm_ref
from .kernels.layernorm_quant import layernorm_quant_ref
from .quant import quantize_per_tensor_ref, quantize_per_token_ref

BACKENDS = ("auto", "torch", "triton")


def attention_ref(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """Multi-head self-attention core: ``qkv[B, T, 3D]`` -> ``[B, T, D]`` via SDPA.

    Runs in ``qkv``'s dtype (the model's activation dtype).
    """
    B, T, three_d = qkv.shape
    D = three_d // 3
    q, k, v = qkv.view(B, T, 3, n_head, D // n_head).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, T, D)


def matmul_rows(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a[B, K] @ w[K, N]`` with each row computed alone (a batch of ``1 x K`` GEMMs).

    A plain ``a @ w`` picks its blocking from ``B``, so a row's float result could change with
    the batch it shares; early-exit decisions must not, so heads and projections use this.
    """
    return torch.bmm(a.unsqueeze(1), w.expand(a.shape[0], *w.shape)).squeeze(1)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def validate_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``"torch"`` or ``"triton"``) for tensors on ``device``."""
    validate_backend(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
            f"the model is on {device}. Use backend='torch' or 'auto' on this device."
        )
    return backend


def _torch_ops() -> SimpleNamespace:
    from .kernels.exit_head import exit_head_ref
    from .kernels.gate_features import gate_features_ref

    return SimpleNamespace(
        name="torch",
        layernorm_quant=layernorm_quant_ref,
        quantize_per_token=quantize_per_token_ref,
        quantize_per_tensor=quantize_per_tensor_ref,
        int8_gemm=int8_gemm_ref,
        attention=attention_ref,
        exit_head=exit_head_ref,
        gate_features=gate_features_ref,
    )


TORCH_OPS = _torch_ops()


def get_ops(name: str) -> SimpleNamespace:
    """The operation namespace of a concrete backend."""
    if name == "torch":
        return TORCH_OPS
    if name == "triton":
        from .kernels import triton_ops  # imports triton; only when asked for

        return triton_ops()
    raise ValueError(f"no operations for backend {name!r}")
