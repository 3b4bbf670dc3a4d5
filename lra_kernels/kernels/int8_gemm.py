"""INT8 GEMM with a fused dequantization epilogue.

    acc[m, n] = sum_k q[m, k] * wq_t[k, n]                         (int32, exact)
    y[m, n]   = acc[m, n] * x_scale[m] * w_scale[n] + bias[n]      (fp32, left to right)
    y         = act(y)            act in {none, gelu (erf), gelu_tanh, quick_gelu}
    y         = y + residual[m, n]
    out       = y.to(out_dtype)   out_dtype in {fp32, fp16, bf16}

Shapes and dtypes: ``q[M, K]`` int8, ``wq_t[K, N]`` int8 (the transposed weight, GEMM-ready),
``x_scale[M]`` fp32 (per token, or a per-tensor scale broadcast), ``w_scale[N]`` fp32,
``bias[N]`` fp32, ``residual[M, N]`` float.

``int8_gemm_ref`` is the contract and the CPU path (``torch._int_mm``: oneDNN VNNI on x86);
``int8_gemm`` (Triton) lands with the kernel work and must match it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "quick_gelu")


def apply_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "none":
        return y
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "quick_gelu":
        return y * torch.sigmoid(1.702 * y)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if t.shape == (rows, cols):
        return t
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a[M, K] int8 @ b[K, N] int8 -> int32`` on any device.

    CPU: ``torch._int_mm`` (oneDNN) takes any shape. CUDA: cuBLASLt needs ``M > 16`` and ``K``,
    ``N`` multiples of 8, so awkward shapes are zero-padded (zeros do not change the sums).
    """
    M, K = a.shape
    N = b.shape[1]
    if a.device.type == "cpu":
        return torch._int_mm(a, b)
    if a.device.type == "cuda":
        Mp, Kp, Np = max(M, 17), -(-K // 8) * 8, -(-N // 8) * 8
        out = torch._int_mm(_pad_to(a, Mp, Kp), _pad_to(b, Kp, Np))
        return out[:M, :N] if (Mp, Np) != (M, N) else out
    # Other devices: float64 holds every partial sum of int8 products exactly (|sum| < 2**53).
    return (a.double() @ b.double()).to(torch.int32)


def int8_gemm_ref(
    q: torch.Tensor,
    wq_t: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pure-torch reference of the fused INT8 GEMM (see the module docstring)."""
    acc = int_mm(q, wq_t)
    y = acc.float() * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    y = apply_activation(y, activation)
    if residual is not None:
        y = y + residual.float()
    return y.to(out_dtype)
