"""Gate features: per sample, from the exit logits and the tokens, in one pass.

    p[b, :]        = softmax(logits[b, :])
    conf[b]        = max_c p[b, c]
    margin[b]      = p_(1)[b] - p_(2)[b]        (top-2 softmax margin; 1.0 when C == 1)
    svar[b]        = mean_d Var_{t >= 1}(h[b, t, d])    (population variance over patch tokens)
    out[b, :]      = (conf, margin, svar)

Shapes and dtypes: ``logits[B, C]`` fp32, ``h[B, T, D]`` float; ``out[B, 3]`` fp32. A row with a
non-finite logit or token yields NaN features (the gate then keeps the sample running).

Triton kernel: one program per sample.

- logits, in ``BLOCK_C`` slices: a first sweep keeps per-lane maxima and the index of their first
  occurrence (the top-1 class ``c1``); a second sums ``exp(l - l_max)`` and takes the largest
  logit other than ``c1`` (so tied maxima give a zero margin, as ``topk`` does). Then
  ``conf = 1 / sum`` and ``margin = conf - exp(l_2 - l_max) / sum``.
- tokens, in ``BLOCK_T x BLOCK_D`` tiles of ``h[b, 1:, :]`` read once: per channel, sums of
  ``h - shift`` and of its square, ``shift`` being the first tile's column mean;
  ``Var = S2/n - (S1/n)^2``. The shift cancels a channel's common offset before anything is
  squared, so the variance stays accurate when a channel's mean dwarfs its spread (the outlier
  channels of CLIP) while ``h`` is still read only once.

Block sizes depend on ``C``, ``T`` and ``D`` only, never on ``B``.
"""

from __future__ import annotations

import torch

from ..names import N_FEATURES
from ._launch import FLOAT_DTYPES, check_device, check_out, check_tensor, next_pow2
from ._triton import tl, triton

TILE_ELEMENTS = 4096
MAX_WIDTH = 8192


def gate_blocks(C: int, T: int, D: int) -> dict:
    """Tile sizes and warps of a launch: functions of ``C``, ``T``, ``D`` only, never of the batch.

    Four warps up to 1024 channels: with eight, a 4 x 1024 fp16 tile spilled 8 bytes on sm_90
    (scripts/compile_check.py)."""
    block_d = next_pow2(D)
    return dict(BLOCK_C=min(next_pow2(C), 1024), BLOCK_T=max(1, min(next_pow2(T - 1), TILE_ELEMENTS // block_d)),
                BLOCK_D=block_d, num_warps=4 if block_d <= 1024 else 8)


def gate_features_ref(logits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference: ``[B, 3]`` fp32 ``(confidence, margin, spatial variance)``."""
    p = torch.softmax(logits.float(), dim=-1)
    if p.shape[-1] >= 2:
        top2 = p.topk(2, dim=-1).values
        conf, margin = top2[:, 0], top2[:, 0] - top2[:, 1]
    else:
        conf = p[:, 0]
        margin = torch.ones_like(conf)
    patches = h[:, 1:, :].float()
    # Two passes along the contiguous channel axis (torch.var over dim 1 is ~15x slower on CPU).
    svar = (patches - patches.mean(dim=1, keepdim=True)).pow(2).mean(dim=1).mean(dim=-1)
    out = torch.stack([conf, margin, svar], dim=-1)
    finite = torch.isfinite(logits).all(dim=-1) & torch.isfinite(svar)
    return torch.where(finite[:, None], out, torch.full_like(out, float("nan")))


@triton.jit
def _gate_features_kernel(
    # pointers
    logits_ptr,
    h_ptr,
    out_ptr,
    # sizes
    C,
    T,
    D,
    # strides
    stride_lb,
    stride_lc,
    stride_hb,
    stride_ht,
    stride_hd,
    stride_ob,
    stride_of,
    # constexprs
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)

    # ---- softmax confidence and top-2 margin
    c = tl.arange(0, BLOCK_C)
    l_row = logits_ptr + b * stride_lb
    lane_max = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    lane_arg = tl.full((BLOCK_C,), C, tl.int32)
    n_bad = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        idx = c0 + c
        ok = idx < C
        logit = tl.load(l_row + idx * stride_lc, mask=ok, other=float("-inf")).to(tl.float32)
        n_bad += tl.where(ok & ((tl.abs(logit) < float("inf")) == 0), 1, 0)
        better = logit > lane_max  # strict: a lane keeps its first occurrence
        lane_arg = tl.where(better, idx, lane_arg)
        lane_max = tl.where(better, logit, lane_max)
    l_max = tl.max(lane_max, axis=0)
    top1 = tl.min(tl.where(lane_max == l_max, lane_arg, C), axis=0)
    lane_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    lane_second = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        idx = c0 + c
        ok = idx < C
        logit = tl.load(l_row + idx * stride_lc, mask=ok, other=float("-inf")).to(tl.float32)
        lane_sum += tl.where(ok, tl.exp(logit - l_max), 0.0)
        lane_second = tl.maximum(lane_second, tl.where(idx == top1, float("-inf"), logit))
    total = tl.sum(lane_sum, axis=0)
    conf = tl.math.div_rn(1.0, total)
    if C >= 2:
        second = tl.max(lane_second, axis=0)
        margin = conf - tl.math.div_rn(tl.exp(second - l_max), total)
    else:
        margin = conf * 0.0 + 1.0

    # ---- spatial variance over patch tokens, one read of h: sums of (h - shift) and its square,
    # the shift being the first tile's column mean, so a channel's large common offset cancels
    # before anything is squared.
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    h_row = h_ptr + b * stride_hb
    mask = ((1 + t) < T)[:, None] & d_ok[None, :]
    tile = tl.load(h_row + (1 + t)[:, None] * stride_ht + d[None, :] * stride_hd, mask=mask, other=0.0).to(tl.float32)
    shift = tl.sum(tile, axis=0) / tl.minimum(T - 1, BLOCK_T)
    dev = tl.where(mask, tile - shift[None, :], 0.0)
    s1 = tl.sum(dev, axis=0)
    s2 = tl.sum(dev * dev, axis=0)
    for t0 in range(1 + BLOCK_T, T, BLOCK_T):
        tt = t0 + t
        mask = (tt < T)[:, None] & d_ok[None, :]
        tile = tl.load(h_row + tt[:, None] * stride_ht + d[None, :] * stride_hd, mask=mask, other=0.0).to(tl.float32)
        dev = tl.where(mask, tile - shift[None, :], 0.0)
        s1 += tl.sum(dev, axis=0)
        s2 += tl.sum(dev * dev, axis=0)
    n_patch = (T - 1) * 1.0
    mean_dev = s1 / n_patch
    var = s2 / n_patch - mean_dev * mean_dev
    var = tl.where(var < 0.0, 0.0, var)  # rounding; where() keeps NaN (maximum() may not)
    svar = tl.sum(tl.where(d_ok, var, 0.0), axis=0) / D

    bad = (tl.sum(n_bad, axis=0) > 0) | ((tl.abs(svar) < float("inf")) == 0)
    o_row = out_ptr + b * stride_ob
    tl.store(o_row, tl.where(bad, float("nan"), conf))
    tl.store(o_row + stride_of, tl.where(bad, float("nan"), margin))
    tl.store(o_row + 2 * stride_of, tl.where(bad, float("nan"), svar))


def gate_features(logits: torch.Tensor, h: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton gate features with the contract of ``gate_features_ref``: ``[B, 3]`` fp32."""
    op = "gate_features"
    check_tensor(op, "logits", logits, dtypes=FLOAT_DTYPES, ndim=2, shape_hint="[B, C]")
    check_tensor(op, "h", h, dtypes=FLOAT_DTYPES, ndim=3, shape_hint="[B, T, D]")
    B, C = logits.shape
    check_tensor(op, "h", h, shape_hint=f"[B={B}, T, D] (logits are [{B}, {C}])", sizes={0: B})
    _, T, D = h.shape
    if C < 1:
        raise ValueError(f"gate_features: expected logits [B, C] with C >= 1, got {list(logits.shape)}")
    if T < 2 or D < 1:
        raise ValueError(f"gate_features: expected h [B, T >= 2, D >= 1] (patch tokens after the class token), "
                         f"got {list(h.shape)}")
    device = check_device(op, {"logits": logits, "h": h})
    BLOCK_D = next_pow2(D)
    if BLOCK_D > MAX_WIDTH:
        raise ValueError(f"gate_features: widths above {MAX_WIDTH} are not supported (D={D})")
    check_out(op, out, (B, N_FEATURES), torch.float32, device)
    if out is None:
        out = torch.empty((B, N_FEATURES), dtype=torch.float32, device=device)
    if B == 0:
        return out
    _gate_features_kernel[(B,)](
        logits,
        h,
        out,
        C,
        T,
        D,
        logits.stride(0),
        logits.stride(1),
        h.stride(0),
        h.stride(1),
        h.stride(2),
        out.stride(0),
        out.stride(1),
        **gate_blocks(C, T, D),
    )
    return out
