"""INT8 GEMM with a fused dequantization epilogue.

    acc[m, n] = sum_k q[m, k] * w[n, k]                            (int32, exact)
    y[m, n]   = acc[m, n] * x_scale[m] * w_scale[n] + bias[n]      (fp32, left to right)
    y         = act(y)            act in {none, gelu (erf), gelu_tanh, quick_gelu}
    y         = y + residual[m, n]
    out       = y.to(out_dtype)   out_dtype in {fp32, fp16, bf16}

Shapes and dtypes: ``q[M, K]`` int8, ``w[N, K]`` int8 (``nn.Linear``'s layout: K-major rows),
``x_scale[M]`` fp32 (per token, or a per-tensor scale broadcast), ``w_scale[N]`` fp32,
``bias[N]`` fp32, ``residual[M, N]`` float.

``int8_gemm_ref`` is the contract and the CPU path (``torch._int_mm``: oneDNN VNNI on x86);
``int8_gemm`` is the Triton kernel: ``BLOCK_M x BLOCK_N`` output tiles, int8 ``tl.dot`` into an
int32 accumulator over ``BLOCK_K`` slices of ``K``, the epilogue in fp32 registers, one store.
Tiles are visited in groups of ``GROUP_M`` rows of tiles so that consecutive programs share
``wq_t`` column panels in L2. The integer sums are exact and the epilogue is element-wise, so
a row's output never depends on the tile configuration or on the other rows of the batch.

Activations (fp32): ``gelu(y) = 0.5 y (1 + erf(y / sqrt 2))``;
``gelu_tanh(y) = y * sigmoid(2 sqrt(2/pi) (y + 0.044715 y^3))`` (the same function as
``0.5 y (1 + tanh(.))``, without a tanh); ``quick_gelu(y) = y * sigmoid(1.702 y)``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._launch import FLOAT_DTYPES, check_device, check_out, check_tensor, interpreting, next_pow2
from ._triton import tl, triton

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "quick_gelu")
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    w: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pure-torch reference of the fused INT8 GEMM (see the module docstring)."""
    acc = int_mm(q, w.t())
    y = acc.float() * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    y = apply_activation(y, activation)
    if residual is not None:
        y = y + residual.float()
    return y.to(out_dtype)


# ---------------------------------------------------------------------------------- Triton
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). Int8 tiles are half the bytes of fp16
# ones, so BLOCK_K = 128 keeps 128-byte rows; the largest tiles (128x256x128, 3 stages) use
# 144 KiB of shared memory, within the 227 KiB of an H100/H200 SM (Triton compiles them to
# wgmma on sm_90). The 64- and 32-row tiles serve batch 1 (M = 50 for ViT-B/32) and the
# compacted batches of late exits. Few candidates: each costs a compile (2-5 s) per variant.
_GPU_CONFIGS = (
    (128, 256, 128, 3, 8),
    (256, 128, 128, 3, 8),
    (128, 128, 128, 4, 8),
    (128, 256, 64, 4, 8),
    (64, 256, 128, 3, 4),
    (64, 128, 128, 4, 4),
    (32, 64, 128, 4, 4),
)
# Under the interpreter: one config (autotuning needs a GPU); large tiles mean fewer programs.
_INTERPRETER_CONFIG = (64, 64, 64, 1, 4)
# With LRA_TRITON_AUTOTUNE=0 (set before import): one of the candidates on GPU too, for quick
# test runs that would otherwise tune every shape they touch.
_DEFAULT_GPU_CONFIG = (64, 128, 128, 4, 4)
GROUP_M = 8


def autotune_enabled() -> bool:
    return os.environ.get("LRA_TRITON_AUTOTUNE", "1") not in ("", "0")


def _configs() -> list:
    if interpreting():
        table = (_INTERPRETER_CONFIG,)
    else:
        table = _GPU_CONFIGS if autotune_enabled() else (_DEFAULT_GPU_CONFIG,)
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in table
    ]


def _worth_trying(block_m: int, m_bucket: int) -> bool:
    """Tiles far taller than the problem (batch 1) waste work; 32-row tiles only for small problems."""
    return block_m <= max(64, m_bucket) and (m_bucket <= 256 or block_m >= 64)


def _prune_configs(configs, named_args, **kwargs):
    if len(configs) <= 1:
        return configs
    kept = [c for c in configs if _worth_trying(c.kwargs["BLOCK_M"], named_args["M_BUCKET"])]
    return kept or configs


_ACT_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune_configs})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _int8_gemm_kernel(
    # pointers
    q_ptr,
    w_ptr,
    x_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    residual_ptr,
    out_ptr,
    # sizes
    M,
    N,
    K,
    M_BUCKET,  # autotune key only: next_pow2(M), so that each batch size does not retune
    # strides
    stride_qm,
    stride_qk,
    stride_wk,
    stride_wn,
    stride_xs,
    stride_ws,
    stride_bias,
    stride_rm,
    stride_rn,
    stride_om,
    stride_on,
    # constexprs
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M tile-rows advance together along N, so a wq_t panel is reused
    # from L2 by GROUP_M programs before it is evicted.
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge load a valid neighbour instead of being masked in the K loop;
    # their results are never stored.
    load_m = tl.minimum(offs_m, M - 1)
    load_n = tl.minimum(offs_n, N - 1)
    a_ptrs = q_ptr + load_m[:, None] * stride_qm + offs_k[None, :] * stride_qk
    b_ptrs = w_ptr + offs_k[:, None] * stride_wk + load_n[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_qk
        b_ptrs += BLOCK_K * stride_wk

    # epilogue, fp32 in registers, in the reference's order
    m_ok = offs_m < M
    n_ok = offs_n < N
    xs = tl.load(x_scale_ptr + load_m * stride_xs)
    ws = tl.load(w_scale_ptr + load_n * stride_ws)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + load_n * stride_bias)[None, :]
    if ACTIVATION == 1:  # gelu (erf)
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == 2:  # gelu (tanh approximation) = y * sigmoid(2u)
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = y / (1.0 + tl.exp(-2.0 * u))
    elif ACTIVATION == 3:  # quick_gelu
        y = y / (1.0 + tl.exp(-1.702 * y))
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        r_ptrs = residual_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn
        y = y + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


def int8_gemm(
    q: torch.Tensor,
    w: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Triton fused INT8 GEMM with the contract of ``int8_gemm_ref`` (see the module docstring).

    ``out`` (optional): a caller buffer ``[M, N]`` of ``out_dtype`` to write into; it must not be
    ``residual`` (autotuning runs the kernel more than once).
    ``config`` (tests, benchmarks): bypass the autotuner with explicit ``BLOCK_M``, ``BLOCK_N``,
    ``BLOCK_K`` (and optionally ``GROUP_M``, ``num_warps``, ``num_stages``).
    """
    op = "int8_gemm"
    check_tensor(op, "q", q, dtypes=(torch.int8,), ndim=2, shape_hint="[M, K]")
    check_tensor(op, "w", w, dtypes=(torch.int8,), ndim=2, shape_hint="[N, K]")
    M, K = q.shape
    check_tensor(op, "w", w, shape_hint=f"[N, K={K}] (q is [{M}, {K}])", sizes={1: K})
    N = w.shape[0]
    wq_t = w.t()  # [K, N] view: the kernel indexes it through strides
    check_tensor(op, "x_scale", x_scale, dtypes=(torch.float32,), ndim=1, shape_hint=f"[M={M}]", sizes={0: M})
    check_tensor(op, "w_scale", w_scale, dtypes=(torch.float32,), ndim=1, shape_hint=f"[N={N}]", sizes={0: N})
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=(torch.float32,), ndim=1, shape_hint=f"[N={N}]", sizes={0: N})
    if residual is not None:
        check_tensor(op, "residual", residual, dtypes=FLOAT_DTYPES, ndim=2, shape_hint=f"[M={M}, N={N}]",
                     sizes={0: M, 1: N})
    if activation not in ACTIVATIONS:
        raise ValueError(f"int8_gemm: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"int8_gemm: out_dtype must be one of float32/float16/bfloat16, got {out_dtype}")
    device = check_device(
        op, {"q": q, "w": w, "x_scale": x_scale, "w_scale": w_scale, "bias": bias, "residual": residual}
    )
    check_out(op, out, (M, N), out_dtype, device)
    if out is not None and residual is not None and out.data_ptr() == residual.data_ptr():
        raise ValueError("int8_gemm: out must not alias residual (the autotuner may launch the kernel more than once)")
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype, device=device)
    if M == 0 or N == 0:
        return out

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    kernel, meta = _int8_gemm_kernel, {}
    if config is not None:
        kernel = _int8_gemm_kernel.fn  # the heuristics-wrapped kernel, without the autotuner
        meta = {"GROUP_M": GROUP_M, "num_warps": 4, "num_stages": 2 if interpreting() else 3, **config}
        missing = {"BLOCK_M", "BLOCK_N", "BLOCK_K"} - set(meta)
        if missing:
            raise ValueError(f"int8_gemm: config needs {sorted(missing)}")
    kernel[grid](
        q,
        wq_t,
        x_scale,
        w_scale,
        bias if bias is not None else w_scale,
        residual if residual is not None else out,
        out,
        M,
        N,
        K,
        next_pow2(M),
        q.stride(0),
        q.stride(1),
        wq_t.stride(0),
        wq_t.stride(1),
        x_scale.stride(0),
        w_scale.stride(0),
        bias.stride(0) if bias is not None else 0,
        residual.stride(0) if residual is not None else 0,
        residual.stride(1) if residual is not None else 0,
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        ACTIVATION=_ACT_CODES[activation],
        **meta,
    )
    return out


def gpu_configs(M: int | None = None) -> list[dict]:
    """The autotuner's GPU candidates as ``config=`` dicts; with ``M``, those it tries for that ``M``."""
    return [
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M, "num_stages": st, "num_warps": w}
        for bm, bn, bk, st, w in _GPU_CONFIGS
        if M is None or _worth_trying(bm, next_pow2(M))
    ]


def tuned_config(M: int, N: int, K: int) -> dict | None:
    """The config the autotuner chose for a problem it has seen (None before, or when interpreting)."""
    cache = getattr(_int8_gemm_kernel, "cache", {})
    for key, cfg in cache.items():
        if tuple(key[:3]) == (next_pow2(M), N, K):
            return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return None
