"""Backend selection, in one place.

A backend is a small namespace of operations with the contracts of the kernel references:
``layernorm_quant``, ``quantize_per_token``, ``quantize_per_tensor``, ``int8_gemm``,
``attention``, ``exit_head``, ``gate_features``, ``matmul_rows`` (a batch of matrix-vector
products whose rows never depend on the batch), and two optional fused paths, ``fused_block``
and ``fused_linear`` (None, or a function that runs a whole ``QuantBlock`` / ``QuantLinear`` and
returns None when it declines one). The float activations run in the model's ``act_dtype``
(``lra_kernels.hardware``), whatever the backend. Modules receive the namespace and call it; they
never branch on the backend.

- ``"torch"``: the ``*_ref`` functions (``torch._int_mm`` for the INT8 GEMMs). On CPU the
  transformer blocks are compiled with TorchInductor (see ``compile_blocks``) so that the
  quantize / dequantize element-wise passes fuse; eager otherwise.
- ``"triton"``: the Triton kernels of ``lra_kernels.kernels`` (CUDA, or CPU tensors under
  ``TRITON_INTERPRET=1``).
- ``"cpu"``: the C++ CPU kernels of ``lra_kernels.cpu`` (AVX-512 VNNI / AMX-INT8 GEMMs on packed
  weights with fused epilogues, fused attention); the torch references for what they do not fuse.
- ``"auto"``: ``"triton"`` on CUDA; on CPU ``"cpu"`` where those kernels are available and take the
  model's scheme (``cpu_declines``), ``"torch"`` otherwise.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .kernels.int8_gemm import int8_gemm_ref
from .kernels.layernorm_quant import layernorm_quant_ref
from .quant import quantize_per_tensor_ref, quantize_per_token_ref

BACKENDS = ("auto", "torch", "triton", "cpu")


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
    """``a[B, K] @ w[K, N]`` with each row computed alone.

    A plain ``a @ w`` picks its blocking from ``B``, so a row's float result could change with
    the batch it shares; early-exit decisions must not, so heads and projections use this. On
    CPU each row is one matrix-vector product (the same call whatever ``B``; a batched GEMM was
    not enough: MKL's batched kernels regroup the products by batch size on Intel CPUs); on CUDA
    a batch of ``1 x K`` GEMMs.
    """
    if a.device.type != "cpu":
        return torch.bmm(a.unsqueeze(1), w.expand(a.shape[0], *w.shape)).squeeze(1)
    wt = w.t()
    out = torch.empty(a.shape[0], w.shape[1], dtype=torch.promote_types(a.dtype, w.dtype))
    for i in range(a.shape[0]):
        torch.mv(wt, a[i], out=out[i])
    return out


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def validate_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def cpu_declines(device: torch.device, quant_config=None) -> str | None:
    """Why the ``"cpu"`` backend cannot run a model of ``quant_config`` on ``device`` (None: it can).

    Building the CPU kernels happens here, on the first call (cached on disk afterwards)."""
    if device.type != "cpu":
        return f"the CPU kernels run on CPU tensors (the model is on {device})"
    if quant_config is not None and quant_config.act_quant == "paper":
        return "the paper's scheme (per-tensor dynamic activations over the whole batch) is not fused by the CPU kernels"
    from . import cpu

    return None if cpu.available() else cpu.reason()


def resolve_backend(backend: str, device: torch.device, quant_config=None) -> str:
    """The concrete backend (``"torch"``, ``"triton"`` or ``"cpu"``) for a model of ``quant_config`` on ``device``."""
    validate_backend(backend)
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        return "cpu" if cpu_declines(device, quant_config) is None else "torch"
    if backend == "cpu":
        reason = cpu_declines(device, quant_config)
        if reason is not None:
            raise ValueError(f"backend='cpu' cannot run this model: {reason}. Use backend='torch' or 'auto'.")
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
        matmul_rows=matmul_rows,
        fused_block=None,
        fused_linear=None,
        layernorm_quant=layernorm_quant_ref,
        quantize_per_token=quantize_per_token_ref,
        quantize_per_tensor=quantize_per_tensor_ref,
        int8_gemm=int8_gemm_ref,
        attention=attention_ref,
        exit_head=exit_head_ref,
        gate_features=gate_features_ref,
    )


TORCH_OPS = _torch_ops()


@functools.lru_cache(maxsize=None)
def _cpu_ops() -> SimpleNamespace:
    from .cpu import block as cpu_block
    from .cpu import ops as cpu

    return SimpleNamespace(**{
        **vars(TORCH_OPS),
        "name": "cpu",
        "matmul_rows": cpu.rows_matmul,
        "exit_head": cpu.exit_head,
        "gate_features": cpu.gate_features,
        "fused_block": cpu_block.forward_or_decline,
        "fused_linear": cpu_block.linear_or_decline,
    })


def get_ops(name: str) -> SimpleNamespace:
    """The operation namespace of a concrete backend."""
    if name == "torch":
        return TORCH_OPS
    if name == "cpu":
        return _cpu_ops()
    if name == "triton":
        from .kernels import triton_ops  # imports triton; only when asked for

        return triton_ops()
    raise ValueError(f"no operations for backend {name!r}")
