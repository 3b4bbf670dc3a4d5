"""INT8 quantization primitives shared by every backend.

These functions define the numerical contracts; the Triton kernels reproduce them bit for bit
(see ``docs/kernels.md``).

Weights, symmetric per output channel::

    w_scale[n] = max_k |W[n, k]| / 127
    wq[n, k]   = clamp(round(W[n, k] / w_scale[n]), -127, 127)

Activations, symmetric per token (row), computed at run time::

    amax[m]    = max_k |x[m, k]|          (raised to AMAX_FLOOR when smaller)
    q[m, k]    = clamp(round(x[m, k] * (127 / amax[m])), -127, 127)
    x_scale[m] = amax[m] / 127

``round`` is round-half-to-even (``torch.round``). A row holding NaN or Inf gets a NaN/Inf
scale and all-zero codes, so its GEMM output is non-finite while every other row is untouched.

Activations, symmetric per tensor with a calibrated scale::

    q = clamp(round(x * (1 / x_scale)), -127, 127)

The paper's baseline (``torch.ao.quantization.quantize_dynamic``, fbgemm): weights symmetric per
tensor over [-128, 127] (``scale = amax / 127.5``); activations asymmetric per tensor over the
whole input, unsigned with ``reduce_range`` ([0, 127]), scale and zero point chosen like ATen's
``ChooseQuantizationParams``. The GEMM then runs on ``q - zero_point``, which fits in int8.
"""

from __future__ import annotations

import torch

from .names import AMAX_FLOOR, QMAX


def _round_clamp_int8(v: torch.Tensor, lo: int = -QMAX, hi: int = QMAX) -> torch.Tensor:
    v = torch.clamp(torch.round(v), lo, hi)
    # NaN codes would be implementation-defined after the cast; zero them (the scale carries
    # the NaN, so the row's output is still non-finite). ``v == v`` is False only for NaN and,
    # unlike nan_to_num, vectorizes when compiled; clamp has already removed +-Inf.
    return torch.where(v == v, v, torch.zeros_like(v)).to(torch.int8)


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight[N, K]`` float -> ``(wq[N, K] int8, w_scale[N] fp32)``, symmetric per output channel."""
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a float weight [N, K], got {tuple(weight.shape)} {weight.dtype}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    w_scale = amax / QMAX
    safe = torch.where(amax > 0, w_scale, torch.ones_like(w_scale))
    wq = _round_clamp_int8(w / safe[:, None])
    return wq, w_scale


def quantize_per_token_ref(
    x: torch.Tensor, smooth_inv: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[M, K]`` float -> ``(q[M, K] int8, x_scale[M] fp32)``, one symmetric scale per row.

    ``smooth_inv[K]`` (SmoothQuant factors applied at run time) multiplies ``x`` first.
    """
    x = x.float()
    if smooth_inv is not None:
        x = x * smooth_inv
    amax = x.abs().amax(dim=-1)
    # where(amax < floor) rather than clamp_min: keeps NaN (NaN < floor is False).
    amax = torch.where(amax < AMAX_FLOOR, torch.full_like(amax, AMAX_FLOOR), amax)
    inv = QMAX / amax
    q = _round_clamp_int8(x * inv[..., None])
    return q, amax / QMAX


def quantize_per_tensor_ref(
    x: torch.Tensor, x_scale: torch.Tensor, smooth_inv: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[M, K]`` float with a calibrated scalar ``x_scale`` -> ``(q[M, K] int8, x_scale[M])``.

    Values beyond ``127 * x_scale`` saturate. A non-finite row gets a NaN scale so that, as with
    per-token scales, its output is visibly non-finite instead of silently saturated.
    """
    x = x.float()
    if smooth_inv is not None:
        x = x * smooth_inv
    inv = 1.0 / x_scale.float()
    q = _round_clamp_int8(x * inv)
    finite = torch.isfinite(x).all(dim=-1)
    scale = torch.where(finite, x_scale.float().expand(x.shape[:-1]), torch.full_like(x[..., 0], float("nan")))
    return q, scale


def choose_qparams_dynamic(x: torch.Tensor, qmin: int = 0, qmax: int = QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor asymmetric scale and zero point as ATen's ``ChooseQuantizationParams``
    (fbgemm dynamic linear, ``reduce_range=True``: ``[qmin, qmax] = [0, 127]``).

    Returns 0-d tensors (``scale`` fp32, ``zero_point`` int32), computed on ``x``'s device
    without a host synchronisation.
    """
    xmin = torch.clamp(x.min().double(), max=0.0)
    xmax = torch.clamp(x.max().double(), min=0.0)
    scale = (xmax - xmin) / (qmax - qmin)
    scale32 = scale.float()
    bad = (scale32 == 0) | torch.isinf(1.0 / scale32)
    scale = torch.where(bad, torch.full_like(scale, 0.1), scale)
    zp_from_min = qmin - xmin / scale
    zp_from_max = qmax - xmax / scale
    err_min = abs(qmin) - torch.abs(xmin / scale)
    err_max = abs(qmax) - torch.abs(xmax / scale)
    zp = torch.where(err_min < err_max, zp_from_min, zp_from_max)
    zp = torch.clamp(torch.round(zp), qmin, qmax)
    return scale.float(), zp.to(torch.int32)


def quantize_paper_dynamic_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's dynamic per-tensor activation quantization, returned centred.

    ``x[M, K]`` -> ``(q - zero_point)[M, K]`` int8 (values in [-127, 127]) and ``x_scale[M]``
    (the one per-tensor scale, broadcast), so the same INT8 GEMM epilogue applies.
    The scale depends on every row of ``x``: results of this scheme depend on the batch.
    """
    x = x.float()
    scale, zp = choose_qparams_dynamic(x)
    q = torch.clamp(torch.round(x / scale) + zp, 0, QMAX)
    q = torch.where(q == q, q, torch.zeros_like(q)) - zp
    return q.to(torch.int8), scale.expand(x.shape[:-1])


def quantize_weight_paper(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights as ``quantize_dynamic``'s default observer: symmetric per tensor over [-128, 127]."""
    w = weight.detach().float()
    amax = w.abs().amax()
    scale = torch.where(amax > 0, amax / 127.5, torch.ones_like(amax))
    wq = _round_clamp_int8(w / scale, -128, 127)
    return wq, scale.expand(w.shape[0]).contiguous()


def smooth_factors(
    act_amax: torch.Tensor, weight: torch.Tensor, alpha: float, floor: float = 1e-5
) -> torch.Tensor:
    """SmoothQuant migration factors ``s[K] = amax_x[k]**alpha / max_n |W[n, k]|**(1 - alpha)``.

    The GEMM input is divided by ``s`` and the weight's columns multiplied by it, which leaves the
    float product unchanged and flattens activation outlier channels.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_alpha must lie in [0, 1], got {alpha}")
    a = act_amax.float().clamp_min(floor)
    w = weight.detach().float().abs().amax(dim=0).clamp_min(floor)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp_min(floor)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of the symmetric quantizers: ``q[R, K] * scale[R]`` (one scale per row) or a 0-d scale."""
    scale = scale.float()
    return q.float() * (scale[:, None] if scale.ndim == 1 else scale)
