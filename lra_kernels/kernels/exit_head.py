"""Exit head: spatio-semantic aggregation and cosine logits.

    m[b, d]   = mean_{t >= 1} h[b, t, d]            ("patch_mean"; "cls": m = h[b, 0, :])
    n[b, d]   = LayerNorm(m[b, :])[d] * ln_weight[d] + ln_bias[d]
    e[b, j]   = sum_d n[b, d] * proj[d, j]
    z[b, j]   = e[b, j] / max(||e[b, :]||_2, 1e-12)
    logits[b, c] = logit_scale * sum_j z[b, j] * text[c, j]

Shapes and dtypes: ``h[B, T, D]`` float (fp32/fp16/bf16), ``ln_weight[D]``, ``ln_bias[D]``,
``proj[D, E]``, ``text[C, E]`` (L2-normalised rows) fp32; outputs ``logits[B, C]`` and
``z[B, E]`` fp32. Every row is computed on its own (no batch-dependent blocking), so a
sample's exit decision never depends on the batch it shares.

Triton kernel: one program per ``BLOCK_B = 16`` samples, everything in fp32, so that ``proj`` and
``text`` are read once per 16 samples instead of once per sample:

1. pool, in ``BLOCK_DC`` column chunks: ``h[rows, t, chunk]`` summed over ``t = 1..T-1`` in order;
   the pooled chunk goes to a scratch ``[B, D]`` (the program's own rows) with its row sums;
2. LayerNorm: mean from the row sums, variance by a second pass over the scratch, the normalised
   row written back;
3. projection as a ``[BLOCK_B, D] @ [D, E]`` product: ``BLOCK_E`` output columns at a time,
   summed over ``BLOCK_DK`` slices of D in order, each slice a broadcast product reduced along
   its K axis; the unnormalised slices parked in ``z`` with each row's sum of squares; then
   ``z`` normalised in place;
4. logits ``[BLOCK_B, E] @ text^T`` in ``BLOCK_C`` class slices, the same way.

Every reduction runs in a fixed order along one row and the tile shapes depend on ``D``, ``E``,
``C`` only, never on ``B``; a row's partial sums never meet another row's. So a sample's logits
are bit-identical whatever batch it is in, and wherever it sits in its tile. (``tl.dot`` would
be that on the GPU too, but Triton's interpreter runs it through BLAS, whose rounding depends on
a row's position in the tile, and the CPU tests could not show the property.) The float results
match the reference to rounding (summation order differs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..names import HEADS
from ._launch import FLOAT_DTYPES, check_device, check_out, check_tensor, next_pow2
from ._triton import tl, triton
from .matmul_rows import matmul_rows

BLOCK_B = 16  # samples per program
HEAD_WARPS = 4
MAX_WIDTH = 8192


def head_blocks(D: int, E: int, C: int) -> dict:
    """The kernel's tile sizes: functions of the widths only (never of the batch)."""
    return dict(BLOCK_B=BLOCK_B, BLOCK_DC=min(256, next_pow2(D)), BLOCK_DK=min(16, next_pow2(D)),
                BLOCK_E=min(32, next_pow2(E)), BLOCK_EK=min(16, next_pow2(E)), BLOCK_C=min(32, next_pow2(C)))


def exit_head_ref(
    h: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    proj: torch.Tensor | None,
    text: torch.Tensor,
    logit_scale: float,
    pool: str = "patch_mean",
    matmul=matmul_rows,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference: ``(logits[B, C], z[B, E])``. ``matmul``: the row-wise product to use
    (``kernels.matmul_rows``, or a backend's own with the same contract)."""
    if pool == "patch_mean":
        m = h[:, 1:, :].float().mean(dim=1)
    elif pool == "cls":
        m = h[:, 0, :].float()
    else:
        raise ValueError(f"pool must be one of {HEADS}, got {pool!r}")
    n = F.layer_norm(m, (m.shape[-1],), ln_weight, ln_bias, eps)
    e = matmul(n, proj.float()) if proj is not None else n
    z = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    logits = logit_scale * matmul(z, text.float().t())
    return logits, z


@triton.jit
def _exit_head_kernel(
    # pointers
    h_ptr,
    ln_weight_ptr,
    ln_bias_ptr,
    proj_ptr,
    text_ptr,
    scratch_ptr,
    logits_ptr,
    z_ptr,
    # sizes
    B,
    T,
    D,
    E,
    C,
    # strides
    stride_hb,
    stride_ht,
    stride_hd,
    stride_lw,
    stride_lb,
    stride_pd,
    stride_pe,
    stride_tc,
    stride_te,
    stride_sb,
    stride_sd,
    stride_ob,
    stride_zb,
    # scalars
    eps,
    logit_scale,
    # constexprs
    PATCH_MEAN: tl.constexpr,
    HAS_LN_WEIGHT: tl.constexpr,
    HAS_LN_BIAS: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_DC: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_EK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows = rows.to(tl.int64)
    h_rows = h_ptr + rows[:, None] * stride_hb
    s_rows = scratch_ptr + rows[:, None] * stride_sb
    z_rows = z_ptr + rows[:, None] * stride_zb
    dc = tl.arange(0, BLOCK_DC)

    # 1. pool, chunk by chunk, into the scratch rows; row sums for the LayerNorm mean
    row_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DC):
        cols = d0 + dc
        mask = row_ok[:, None] & (cols < D)[None, :]
        if PATCH_MEAN:
            acc = tl.zeros((BLOCK_B, BLOCK_DC), dtype=tl.float32)
            for t in range(1, T):
                acc += tl.load(h_rows + t * stride_ht + cols[None, :] * stride_hd, mask=mask, other=0.0).to(tl.float32)
            m = acc / (T - 1)
        else:
            m = tl.load(h_rows + cols[None, :] * stride_hd, mask=mask, other=0.0).to(tl.float32)
        row_sum += tl.sum(m, axis=1)
        tl.store(s_rows + cols[None, :] * stride_sd, m, mask=mask)
    mean = row_sum / D

    # 2. LayerNorm: two-pass variance over the scratch, then the normalised rows in its place
    tl.debug_barrier()
    row_var = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DC):
        cols = d0 + dc
        mask = row_ok[:, None] & (cols < D)[None, :]
        mc = tl.where(mask, tl.load(s_rows + cols[None, :] * stride_sd, mask=mask, other=0.0) - mean[:, None], 0.0)
        row_var += tl.sum(mc * mc, axis=1)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(row_var / D + eps))
    tl.debug_barrier()
    for d0 in range(0, D, BLOCK_DC):
        cols = d0 + dc
        mask = row_ok[:, None] & (cols < D)[None, :]
        n = (tl.load(s_rows + cols[None, :] * stride_sd, mask=mask, other=0.0) - mean[:, None]) * rstd[:, None]
        if HAS_LN_WEIGHT:
            n = n * tl.load(ln_weight_ptr + cols * stride_lw, mask=cols < D, other=0.0)[None, :]
        if HAS_LN_BIAS:
            n = n + tl.load(ln_bias_ptr + cols * stride_lb, mask=cols < D, other=0.0)[None, :]
        tl.store(s_rows + cols[None, :] * stride_sd, n, mask=mask)
    tl.debug_barrier()

    # 3. projection [BLOCK_B, D] @ proj[D, E] (or the normalised rows themselves), unnormalised into z
    je = tl.arange(0, BLOCK_E)
    sumsq = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        cols = e0 + je
        c_ok = cols < E
        if HAS_PROJ:
            dk = tl.arange(0, BLOCK_DK)
            e = tl.zeros((BLOCK_B, BLOCK_E), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_DK):
                kk = d0 + dk
                a = tl.load(s_rows + kk[None, :] * stride_sd, mask=row_ok[:, None] & (kk < D)[None, :], other=0.0)
                w = tl.load(proj_ptr + kk[:, None] * stride_pd + cols[None, :] * stride_pe,
                            mask=(kk < D)[:, None] & c_ok[None, :], other=0.0)
                e += tl.sum(a[:, :, None] * w[None, :, :], axis=1)
        else:  # E == D
            e = tl.load(s_rows + cols[None, :] * stride_sd, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        sumsq += tl.sum(e * e, axis=1)
        tl.store(z_rows + cols[None, :], e, mask=row_ok[:, None] & c_ok[None, :])
    norm = tl.maximum(tl.sqrt_rn(sumsq), 1e-12)
    tl.debug_barrier()
    for e0 in range(0, E, BLOCK_E):
        cols = e0 + je
        mask = row_ok[:, None] & (cols < E)[None, :]
        tl.store(z_rows + cols[None, :], tl.load(z_rows + cols[None, :], mask=mask, other=0.0) / norm[:, None],
                 mask=mask)
    tl.debug_barrier()

    # 4. cosine logits [BLOCK_B, E] @ text^T, BLOCK_C classes at a time
    jc = tl.arange(0, BLOCK_C)
    ek = tl.arange(0, BLOCK_EK)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + jc
        acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_EK):
            kk = e0 + ek
            zz = tl.load(z_rows + kk[None, :], mask=row_ok[:, None] & (kk < E)[None, :], other=0.0)
            tt = tl.load(text_ptr + cls[:, None] * stride_tc + kk[None, :] * stride_te,
                         mask=(cls < C)[:, None] & (kk < E)[None, :], other=0.0)
            acc += tl.sum(zz[:, None, :] * tt[None, :, :], axis=2)
        tl.store(logits_ptr + rows[:, None] * stride_ob + cls[None, :], acc * logit_scale,
                 mask=row_ok[:, None] & (cls < C)[None, :])


def exit_head(
    h: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
    proj: torch.Tensor | None,
    text: torch.Tensor,
    logit_scale: float,
    pool: str = "patch_mean",
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton exit head with the contract of ``exit_head_ref``: ``(logits[B, C], z[B, E])`` fp32.

    ``out=(logits, z)``: caller buffers with contiguous rows.
    """
    op = "exit_head"
    if pool not in HEADS:
        raise ValueError(f"exit_head: pool must be one of {HEADS}, got {pool!r}")
    check_tensor(op, "h", h, dtypes=FLOAT_DTYPES, ndim=3, shape_hint="[B, T, D]")
    B, T, D = h.shape
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None:
            check_tensor(op, name, t, dtypes=(torch.float32,), ndim=1, shape_hint=f"[D={D}]", sizes={0: D})
    if proj is not None:
        check_tensor(op, "proj", proj, dtypes=(torch.float32,), ndim=2, shape_hint=f"[D={D}, E]", sizes={0: D})
    E = proj.shape[1] if proj is not None else D
    check_tensor(op, "text", text, dtypes=(torch.float32,), ndim=2, shape_hint=f"[C, E={E}]", sizes={1: E})
    C = text.shape[0]
    if pool == "patch_mean" and T < 2:
        raise ValueError(f"exit_head: pool='patch_mean' needs patch tokens (h of shape [B, T >= 2, D]), got T={T}")
    if pool == "cls" and T < 1:
        raise ValueError("exit_head: pool='cls' needs the class token (T >= 1)")
    if D == 0 or E == 0:
        raise ValueError(f"exit_head: expected D >= 1 and E >= 1, got D={D}, E={E}")
    if isinstance(logit_scale, torch.Tensor):
        logit_scale = float(logit_scale)
    device = check_device(op, {"h": h, "ln_weight": ln_weight, "ln_bias": ln_bias, "proj": proj, "text": text})
    if max(D, E) > MAX_WIDTH:
        raise ValueError(f"exit_head: widths above {MAX_WIDTH} are not supported (D={D}, E={E})")

    if out is not None:
        logits, z = out
        check_out(op, logits, (B, C), torch.float32, device, "out[0] (logits)")
        check_out(op, z, (B, E), torch.float32, device, "out[1] (z)")
        if (C > 1 and logits.stride(1) != 1) or (E > 1 and z.stride(1) != 1):
            raise ValueError("exit_head: out buffers need contiguous rows")
    else:
        logits = torch.empty((B, C), dtype=torch.float32, device=device)
        z = torch.empty((B, E), dtype=torch.float32, device=device)
    if B == 0:
        return logits, z

    scratch = torch.empty((B, D), dtype=torch.float32, device=device)  # pooled, then normalised rows
    dummy = text
    _exit_head_kernel[(triton.cdiv(B, BLOCK_B),)](
        h,
        ln_weight if ln_weight is not None else dummy,
        ln_bias if ln_bias is not None else dummy,
        proj if proj is not None else dummy,
        text,
        scratch,
        logits,
        z,
        B,
        T,
        D,
        E,
        C,
        h.stride(0),
        h.stride(1),
        h.stride(2),
        ln_weight.stride(0) if ln_weight is not None else 0,
        ln_bias.stride(0) if ln_bias is not None else 0,
        proj.stride(0) if proj is not None else 0,
        proj.stride(1) if proj is not None else 0,
        text.stride(0),
        text.stride(1),
        scratch.stride(0),
        scratch.stride(1),
        logits.stride(0),
        z.stride(0),
        float(eps),
        float(logit_scale),
        PATCH_MEAN=pool == "patch_mean",
        HAS_LN_WEIGHT=ln_weight is not None,
        HAS_LN_BIAS=ln_bias is not None,
        HAS_PROJ=proj is not None,
        **head_blocks(D, E, C),
        num_warps=HEAD_WARPS,
    )
    return logits, z
