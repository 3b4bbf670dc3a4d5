"""LayerNorm fused with per-token INT8 quantization.

    mean[m]    = sum_k x[m, k] / K
    var[m]     = sum_k (x[m, k] - mean[m])**2 / K
    h[m, k]    = (x[m, k] - mean[m]) / sqrt(var[m] + eps) * weight[k] + bias[k]      (fp32)
    then the per-token quantizer of ``lra_kernels.quant``:
    q[m, k]    = clamp(round(h[m, k] * 127 / amax[m]), -127, 127)     int8
    x_scale[m] = amax[m] / 127                                        fp32

Shapes and dtypes: ``x[M, K]`` fp32/fp16/bf16, ``weight[K]``/``bias[K]`` fp32 (SmoothQuant factors
already folded in), outputs ``q[M, K]`` int8 and ``x_scale[M]`` fp32.

The same kernel, without the LayerNorm (``HAS_LN=False``), is the quantizer of the other GEMM
inputs: ``quantize_per_token(x, smooth_inv)`` (``h = x * smooth_inv``) and
``quantize_per_tensor(x, x_scale, smooth_inv)`` (a calibrated scalar scale; the per-row scale it
returns is NaN for a row holding a non-finite value).

Numerical contract (bit for bit with ``lra_kernels.quant`` given the same ``h``):

- ``inv = (1 / amax) * 127`` (torch evaluates ``127 / amax`` as ``amax.reciprocal() * 127``), the
  reciprocal correctly rounded (``div_rn``); codes ``h * inv`` rounded half to even with
  ``floor``/compare (libdevice ``rint`` does not run in the interpreter), clamped to [-127, 127];
  NaN codes are 0.
- ``amax`` below ``AMAX_FLOOR`` is raised to it by ``where(amax < floor, floor, amax)``, which
  keeps a NaN ``amax`` (and so a NaN scale) for a row holding NaN.
- ``x_scale = amax / 127``: a correctly rounded division on CPU; on CUDA torch multiplies by the
  fp32 reciprocal of a Python-scalar divisor, and the kernel does the same there, so that it
  matches the torch backend on either device.
- The LayerNorm itself (mean, variance, ``1/sqrt``) is fp32 but its rounding differs from
  ``F.layer_norm`` by an ulp or so; a code can then differ by one where ``h * inv`` lies within
  rounding distance of a half-integer.

One program normalises and quantizes ``ROWS`` rows, each held whole in registers
(``BLOCK_K = next_pow2(K)``). ``ROWS`` depends on ``K`` only, never on ``M``, so a row's
reductions (and its codes) do not depend on the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..names import AMAX_FLOOR, QMAX
from ..quant import quantize_per_token_ref
from ._launch import FLOAT_DTYPES, check_device, check_out, check_tensor, next_pow2
from ._triton import tl, triton

MAX_BLOCK_K = 16384  # a row is held whole in registers


def layernorm_quant_ref(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference: ``F.layer_norm`` in fp32, then per-token quantization."""
    h = F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)
    return quantize_per_token_ref(h)


@triton.jit
def _round_half_even_int8(v):
    """``clamp(round(v), -127, 127)`` with ``torch.round``'s ties-to-even; NaN -> 0; as int8."""
    a = tl.minimum(tl.abs(v), 128.0)  # |v| >= 128 saturates anyway; keeps floor/frac exact
    r = tl.floor(a)
    frac = a - r  # exact: r <= a < 2r (Sterbenz) or r == 0
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    r = tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)
    r = tl.minimum(r, 127.0)
    r = tl.where(v < 0.0, -r, r)
    r = tl.where(v != v, 0.0, r)
    return r.to(tl.int8)


@triton.jit
def _layernorm_quant_kernel(
    # pointers
    x_ptr,
    weight_ptr,
    bias_ptr,
    smooth_ptr,
    static_scale_ptr,
    q_ptr,
    scale_ptr,
    # sizes
    M,
    K,
    # strides
    stride_xm,
    stride_xk,
    stride_qm,
    stride_w,
    stride_b,
    stride_s,
    # scalars
    eps,
    # constexprs
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_LN: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    STATIC_SCALE: tl.constexpr,
    SCALE_BY_RECIPROCAL: tl.constexpr,
    AMAX_FLOOR: tl.constexpr,
    QMAX: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < K
    mask = row_ok[:, None] & col_ok[None, :]

    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    h = x.to(tl.float32)
    if HAS_LN:
        mean = tl.sum(h, axis=1) / K
        xc = tl.where(mask, h - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / K
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
        h = xc * rstd[:, None]
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols * stride_w, mask=col_ok, other=0.0)
            h = h * w[None, :]
        if HAS_BIAS:
            b = tl.load(bias_ptr + cols * stride_b, mask=col_ok, other=0.0)
            h = h + b[None, :]
    if HAS_SMOOTH:
        s = tl.load(smooth_ptr + cols * stride_s, mask=col_ok, other=0.0)
        h = h * s[None, :]

    if STATIC_SCALE:
        x_scale = tl.load(static_scale_ptr).to(tl.float32)
        inv = tl.math.div_rn(1.0, x_scale)
        v = h * inv
        finite = tl.abs(h) < float("inf")  # false for NaN and +-Inf
        n_bad = tl.sum(tl.where(mask, 1 - finite.to(tl.int32), 0), axis=1)
        row_scale = tl.where(n_bad > 0, float("nan"), x_scale)
    else:
        n_nan = tl.sum(tl.where(mask & (h != h), 1, 0), axis=1)
        amax = tl.max(tl.where(mask, tl.abs(h), 0.0), axis=1)
        amax = tl.where(n_nan > 0, float("nan"), amax)  # whatever max() does with NaN, keep it
        amax = tl.where(amax < AMAX_FLOOR, AMAX_FLOOR, amax)
        inv = tl.math.div_rn(1.0, amax) * QMAX
        v = h * inv[:, None]
        if SCALE_BY_RECIPROCAL:
            row_scale = amax * (1.0 / QMAX)
        else:
            row_scale = tl.math.div_rn(amax, QMAX * 1.0)

    q = _round_half_even_int8(v)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(scale_ptr + rows, row_scale, mask=row_ok)


def _rows_per_program(block_k: int) -> int:
    return max(1, min(16, 4096 // block_k))


def _launch(
    op: str,
    x: torch.Tensor,
    *,
    weight=None,
    bias=None,
    eps: float = 0.0,
    has_ln: bool,
    smooth_inv=None,
    static_scale=None,
    out=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, shape_hint="[M, K]")
    if x.ndim < 1:
        raise ValueError(f"{op}: expected x of shape [M, K] (or [..., K]), got a 0-d tensor")
    K = x.shape[-1]
    vectors = {"weight": weight, "bias": bias, "smooth_inv": smooth_inv}
    for name, t in vectors.items():
        if t is not None:
            check_tensor(op, name, t, dtypes=(torch.float32,), ndim=1, shape_hint=f"[{K}]", sizes={0: K})
    if static_scale is not None:
        check_tensor(op, "x_scale", static_scale, dtypes=(torch.float32,), shape_hint="[] (one calibrated scale)")
        if static_scale.numel() != 1:
            raise ValueError(f"{op}: expected a single calibrated x_scale (shape []), "
                             f"got shape {list(static_scale.shape)}")
    device = check_device(op, {"x": x, **vectors, "x_scale": static_scale})
    if K == 0:
        raise ValueError(f"{op}: expected x of shape [M, K] with K >= 1, got {list(x.shape)}")
    BLOCK_K = next_pow2(K)
    if BLOCK_K > MAX_BLOCK_K:
        raise ValueError(f"{op}: rows of K={K} > {MAX_BLOCK_K} elements are not supported (a row is held in registers)")

    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if out is not None:
        q, scale = out
        check_out(op, q, tuple(x.shape), torch.int8, device, "out[0] (codes)")
        check_out(op, scale, tuple(lead), torch.float32, device, "out[1] (x_scale)")
        if not (q.is_contiguous() and scale.is_contiguous()):
            raise ValueError(f"{op}: out tensors must be contiguous")
    else:
        q = torch.empty(x.shape, dtype=torch.int8, device=device)
        scale = torch.empty(lead, dtype=torch.float32, device=device)
    if M == 0:
        return q, scale
    ROWS = _rows_per_program(BLOCK_K)
    dummy = x2  # never read: the matching HAS_* flag is off
    grid = (triton.cdiv(M, ROWS),)
    _layernorm_quant_kernel[grid](
        x2,
        weight if weight is not None else dummy,
        bias if bias is not None else dummy,
        smooth_inv if smooth_inv is not None else dummy,
        static_scale if static_scale is not None else dummy,
        q,
        scale,
        M,
        K,
        x2.stride(0),
        x2.stride(1),
        K,
        weight.stride(0) if weight is not None else 0,
        bias.stride(0) if bias is not None else 0,
        smooth_inv.stride(0) if smooth_inv is not None else 0,
        float(eps),
        ROWS=ROWS,
        BLOCK_K=BLOCK_K,
        HAS_LN=has_ln,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_SMOOTH=smooth_inv is not None,
        STATIC_SCALE=static_scale is not None,
        SCALE_BY_RECIPROCAL=device.type == "cuda",
        AMAX_FLOOR=AMAX_FLOOR,
        QMAX=QMAX,
        num_warps=4 if ROWS * BLOCK_K <= 4096 else min(16, ROWS * BLOCK_K // 1024),
    )
    return q, scale


def layernorm_quant(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton LayerNorm + per-token INT8 quantization: ``x[..., K]`` -> ``(q[..., K] int8, x_scale[...] fp32)``.

    ``out=(q, x_scale)`` writes into caller buffers (contiguous, exact shapes and dtypes).
    """
    return _launch("layernorm_quant", x, weight=weight, bias=bias, eps=eps, has_ln=True, out=out)


def quantize_per_token(
    x: torch.Tensor,
    smooth_inv: torch.Tensor | None = None,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``quantize_per_token_ref``: ``x[..., K]`` -> ``(q int8, x_scale[...] fp32)``, one scale per row."""
    return _launch("quantize_per_token", x, has_ln=False, smooth_inv=smooth_inv, out=out)


def quantize_per_tensor(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    smooth_inv: torch.Tensor | None = None,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``quantize_per_tensor_ref``: a calibrated scalar ``x_scale`` -> ``(q int8, row scales)``, the scale
    NaN where a row is non-finite."""
    return _launch("quantize_per_tensor", x, has_ln=False, smooth_inv=smooth_inv, static_scale=x_scale, out=out)
