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

Triton kernel: one program per sample, everything in fp32.

1. pool: ``BLOCK_T x BLOCK_D`` tiles of ``h[b, 1:, :]`` summed into a tile accumulator, reduced
   over tokens once at the end (``BLOCK_D = next_pow2(D)``, the whole width in registers);
2. LayerNorm of the pooled row in registers;
3. projection in ``BLOCK_E`` column slices of ``proj`` (``BLOCK_D x BLOCK_E`` tiles); the
   unnormalised slices go to ``z``'s row (the program's own scratch) with their sum of squares;
4. the row is read back whole (``next_pow2(E)``), normalised, stored, and multiplied with
   ``BLOCK_C x E`` slices of ``text``.

Block sizes depend on ``D``, ``E`` and ``C`` only, never on ``B``. The float results match the
reference to rounding (summation order differs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backend import matmul_rows
from ._launch import FLOAT_DTYPES, check_device, check_out, check_tensor, next_pow2
from ._triton import tl, triton

POOLS = ("patch_mean", "cls")
TILE_ELEMENTS = 4096  # fp32 values per register tile of one program
MAX_WIDTH = 8192


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
    (``backend.matmul_rows``, or a backend's own with the same contract)."""
    if pool == "patch_mean":
        m = h[:, 1:, :].float().mean(dim=1)
    elif pool == "cls":
        m = h[:, 0, :].float()
    else:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
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
    logits_ptr,
    z_ptr,
    # sizes
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
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_E_ROW: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    h_row = h_ptr + b * stride_hb

    # 1. pool
    if PATCH_MEAN:
        t = tl.arange(0, BLOCK_T)
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for t0 in range(1, T, BLOCK_T):
            tt = t0 + t
            mask = (tt < T)[:, None] & d_ok[None, :]
            tile = tl.load(h_row + tt[:, None] * stride_ht + d[None, :] * stride_hd, mask=mask, other=0.0)
            acc += tile.to(tl.float32)
        m = tl.sum(acc, axis=0) / (T - 1)
    else:
        m = tl.load(h_row + d * stride_hd, mask=d_ok, other=0.0).to(tl.float32)

    # 2. LayerNorm
    mean = tl.sum(m, axis=0) / D
    mc = tl.where(d_ok, m - mean, 0.0)
    var = tl.sum(mc * mc, axis=0) / D
    n = mc * tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
    if HAS_LN_WEIGHT:
        n = n * tl.load(ln_weight_ptr + d * stride_lw, mask=d_ok, other=0.0)
    if HAS_LN_BIAS:
        n = n + tl.load(ln_bias_ptr + d * stride_lb, mask=d_ok, other=0.0)
    n = tl.where(d_ok, n, 0.0)

    # 3. projection (unnormalised row parked in z) and its squared norm
    z_row = z_ptr + b * stride_zb
    j = tl.arange(0, BLOCK_E_ROW)
    j_ok = j < E
    if HAS_PROJ:
        je = tl.arange(0, BLOCK_E)
        sumsq = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_E):
            cols = e0 + je
            c_ok = cols < E
            w = tl.load(
                proj_ptr + d[:, None] * stride_pd + cols[None, :] * stride_pe,
                mask=d_ok[:, None] & c_ok[None, :],
                other=0.0,
            )
            e_slice = tl.sum(n[:, None] * w, axis=0)
            sumsq += e_slice * e_slice
            tl.store(z_row + cols, e_slice, mask=c_ok)
        norm = tl.sqrt_rn(tl.sum(sumsq, axis=0))
        tl.debug_barrier()  # the slices were written by other threads of this program
        e = tl.load(z_row + j, mask=j_ok, other=0.0)
    else:
        e = n  # E == D, BLOCK_E_ROW == BLOCK_D
        norm = tl.sqrt_rn(tl.sum(n * n, axis=0))
    z = e / tl.maximum(norm, 1e-12)
    tl.debug_barrier()  # every thread has read its part of the scratch row before it is overwritten
    tl.store(z_row + j, z, mask=j_ok)

    # 4. cosine logits
    c = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        rows = c0 + c
        r_ok = rows < C
        txt = tl.load(
            text_ptr + rows[:, None] * stride_tc + j[None, :] * stride_te,
            mask=r_ok[:, None] & j_ok[None, :],
            other=0.0,
        )
        logit = tl.sum(txt * z[None, :], axis=1) * logit_scale
        tl.store(logits_ptr + b * stride_ob + rows, logit, mask=r_ok)


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
    if pool not in POOLS:
        raise ValueError(f"exit_head: pool must be one of {POOLS}, got {pool!r}")
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
    BLOCK_D, BLOCK_E_ROW = next_pow2(D), next_pow2(E)
    if max(BLOCK_D, BLOCK_E_ROW) > MAX_WIDTH:
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

    BLOCK_T = max(1, min(next_pow2(max(T - 1, 1)), TILE_ELEMENTS // BLOCK_D))
    # proj slices at least 8 columns (32-byte row segments), up to twice the usual tile
    BLOCK_E = max(1, min(BLOCK_E_ROW, max(8, 2 * TILE_ELEMENTS // BLOCK_D)))
    BLOCK_C = max(1, min(next_pow2(C), TILE_ELEMENTS // BLOCK_E_ROW))
    dummy = text
    _exit_head_kernel[(B,)](
        h,
        ln_weight if ln_weight is not None else dummy,
        ln_bias if ln_bias is not None else dummy,
        proj if proj is not None else dummy,
        text,
        logits,
        z,
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
        logits.stride(0),
        z.stride(0),
        float(eps),
        float(logit_scale),
        PATCH_MEAN=pool == "patch_mean",
        HAS_LN_WEIGHT=ln_weight is not None,
        HAS_LN_BIAS=ln_bias is not None,
        HAS_PROJ=proj is not None,
        BLOCK_T=BLOCK_T,
        BLOCK_D=BLOCK_D,
        BLOCK_E=BLOCK_E,
        BLOCK_E_ROW=BLOCK_E_ROW,
        BLOCK_C=BLOCK_C,
        num_warps=8 if BLOCK_D >= 1024 else 4,
    )
    return logits, z
