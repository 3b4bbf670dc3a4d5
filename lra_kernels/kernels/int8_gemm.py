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
``int8_gemm`` launches one of two Triton kernels, both reading ``q`` and ``w`` K-major (what int8
``wgmma`` wants for both operands):

- ``tiled`` (this file): one program per ``BLOCK_M x BLOCK_N`` output tile, in grouped order;
  ``BLOCK_K`` slices of ``q`` and ``w`` (rows ``% M`` / ``% N``, so no clamp breaks the
  contiguity facts, with ``max_contiguous(multiple_of(...))`` hints), int8 ``tl.dot`` into an
  int32 accumulator, the epilogue in fp32 registers, one masked store;
- ``persistent`` (``int8_gemm_persistent.py``): a grid of ``CTAS_PER_SM x SMs`` programs walks
  the tiles, TMA descriptors for the operands, the residual and the output, the epilogue in
  subtiles while the next tile's loads are in flight.

Which kernel and tile shape a launch uses is tuned per (M bucket, N, K, weight layout, epilogue)
and persisted (``_tuning.py``). The integer sums are exact and the epilogue is element-wise, so a
row's output never depends on the kernel, the tile shape or on the other rows of the batch.

Activations (fp32): ``gelu(y) = 0.5 y (1 + erf(y / sqrt 2))``;
``gelu_tanh(y) = y * sigmoid(2 sqrt(2/pi) (y + 0.044715 y^3))`` (the same function as
``0.5 y (1 + tanh(.))``, without a tanh); ``quick_gelu(y) = y * sigmoid(1.702 y)``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..names import ACT_CODES, ACTIVATIONS
from . import _tuning
from ._gemm_common import _activate, _grouped_tile
from ._launch import FLOAT_DTYPES, check_device, check_out, check_tensor
from ._triton import interpreting, tl, triton
from .int8_gemm_persistent import INTERPRETER_PERSISTENT, PERSISTENT_CONFIGS, launch_persistent, tma_compatible

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNELS = ("tiled", "persistent")
GROUP_M = 8


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


# ---------------------------------------------------------------------------------- configs
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, CTAS_PER_SM). Int8 tiles are half the bytes of
# fp16 ones, so BLOCK_K = 128 keeps 128-byte rows. Every tile is at least 64 rows (one wgmma
# warpgroup) and BLOCK_K >= 32 (Triton's 8-bit dots need it on NVIDIA). CTAS_PER_SM is what fits
# on an H100/H200 SM (registers and shared memory), a claim scripts/compile_check.py verifies; with
# two, one CTA's epilogue overlaps the other's main loop. The whole-tile epilogue of larger tiles
# spills (128 x 256: 255 registers); those shapes are left to the persistent kernel's subtiles.
TILED_CONFIGS = (
    (128, 128, 128, 3, 8, 1),
    (128, 64, 128, 4, 4, 2),
    (64, 128, 128, 4, 4, 2),  # batch 1 (M = 50) and compacted exits
    (64, 64, 128, 4, 4, 2),  # small M and N
)
# Under the interpreter: one tile (autotuning needs a GPU); large tiles mean fewer programs.
INTERPRETER_TILED = (64, 64, 64, 1, 4, 1)
# With LRA_TRITON_AUTOTUNE=0 (and where no timing may run and nothing is tuned): by M.
DEFAULT_SMALL_M = TILED_CONFIGS[2]


def autotune_enabled() -> bool:
    return os.environ.get("LRA_TRITON_AUTOTUNE", "1") not in ("", "0")


def _tiled(bm, bn, bk, stages, warps, ctas) -> dict:
    return {"kernel": "tiled", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M,
            "num_stages": stages, "num_warps": warps, "CTAS_PER_SM": ctas}


def _worth_trying(cfg: dict, bucket: int) -> bool:
    """Tiles far taller than the problem (batch 1) waste work."""
    return cfg["BLOCK_M"] <= max(64, bucket)


def gpu_configs(M: int | None = None, tma: bool = True) -> list[dict]:
    """The tuner's GPU candidates as ``config=`` dicts; with ``M``, those it tries for that ``M``."""
    cands = [_tiled(*c) for c in TILED_CONFIGS] + (list(PERSISTENT_CONFIGS) if tma else [])
    return [dict(c) for c in cands if M is None or _worth_trying(c, _tuning.m_bucket(M))]


def default_config(M: int, tma: bool) -> dict:
    """The untuned choice: the persistent kernel for large problems, a 64-row tile otherwise."""
    if tma and M >= 1024:
        return dict(PERSISTENT_CONFIGS[2])
    return _tiled(*DEFAULT_SMALL_M)


def weight_layout(w: torch.Tensor) -> str:
    """``"k-major"`` when each row of ``w[N, K]`` is contiguous (``nn.Linear``'s layout), else ``"strided"``."""
    return "k-major" if w.stride(1) == 1 or w.shape[1] <= 1 else "strided"


def _key(q, w, residual, out_dtype, activation, bias, tma) -> dict:
    dev = torch.cuda.get_device_name(q.device) if q.device.type == "cuda" else q.device.type
    M, K = q.shape
    return {"op": "int8_gemm", "device": dev, "triton": getattr(triton, "__version__", "?"),
            "m_bucket": _tuning.m_bucket(M), "N": w.shape[0], "K": K, "layout": weight_layout(w),
            "q_layout": "k-major" if q.stride(1) == 1 or K <= 1 else "strided", "tma": tma,
            "out": str(out_dtype)[6:], "residual": str(residual.dtype)[6:] if residual is not None else None,
            "activation": activation, "bias": bias is not None}


def _check_config(config: dict, tma: bool) -> dict:
    cfg = {"kernel": "tiled", "GROUP_M": GROUP_M, "num_warps": 4, "num_stages": 2 if interpreting() else 3, **config}
    missing = {"BLOCK_M", "BLOCK_N", "BLOCK_K"} - set(cfg)
    if missing:
        raise ValueError(f"int8_gemm: config needs {sorted(missing)}")
    if cfg["kernel"] not in KERNELS:
        raise ValueError(f"int8_gemm: config kernel must be one of {KERNELS}, got {cfg['kernel']!r}")
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = cfg[name]
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"int8_gemm: config {name} must be a power of two >= 16, got {v!r}")
    if cfg["BLOCK_K"] < 32:
        raise ValueError(f"int8_gemm: config BLOCK_K must be >= 32 (8-bit tl.dot on NVIDIA), got {cfg['BLOCK_K']}")
    if cfg["kernel"] == "persistent" and not tma:
        raise ValueError("int8_gemm: the persistent kernel needs TMA-compatible operands (sm_90+, K-major q and w, "
                         "row strides and K multiples of 16 bytes)")
    return cfg


# ---------------------------------------------------------------------------------- tiled kernel
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
    # strides
    stride_qm,
    stride_qk,
    stride_wn,
    stride_wk,
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
    K_MAJOR: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past the edge wrap (% M, % N) to valid rows instead of being masked in the K loop; their
    # results are never stored. The hints restore what the modulo hides: runs of BLOCK_M (BLOCK_N)
    # consecutive rows starting at a multiple of the block. They are only claimed for K-major
    # operands, whose vectorised axis is K, never the wrapped one.
    rm = offs_m % M
    rn = offs_n % N
    if K_MAJOR:
        rm = tl.max_contiguous(tl.multiple_of(rm, BLOCK_M), BLOCK_M)
        rn = tl.max_contiguous(tl.multiple_of(rn, BLOCK_N), BLOCK_N)
    a_ptrs = q_ptr + rm.to(tl.int64)[:, None] * stride_qm + offs_k[None, :] * stride_qk
    b_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk  # [BLOCK_N, BLOCK_K]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k[None, :] < K - k0
            a = tl.load(a_ptrs, mask=k_ok, other=0)
            b = tl.load(b_ptrs, mask=k_ok, other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_qk
        b_ptrs += BLOCK_K * stride_wk

    # epilogue, fp32 in registers, in the reference's order
    xs = tl.load(x_scale_ptr + rm * stride_xs)
    ws = tl.load(w_scale_ptr + rn * stride_ws)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn * stride_bias)[None, :]
    y = _activate(y, ACTIVATION)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    row_m = offs_m.to(tl.int64)[:, None]
    if HAS_RESIDUAL:
        r_ptrs = residual_ptr + row_m * stride_rm + offs_n[None, :] * stride_rn
        y = y + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + row_m * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_tiled(cfg, q, w, x_scale, w_scale, bias, residual, out, activation):
    M, K = q.shape
    N = w.shape[0]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _int8_gemm_kernel[grid](
        q, w, x_scale, w_scale,
        bias if bias is not None else w_scale,
        residual if residual is not None else out,
        out,
        M, N, K,
        q.stride(0), q.stride(1), w.stride(0), w.stride(1),
        x_scale.stride(0), w_scale.stride(0), bias.stride(0) if bias is not None else 0,
        residual.stride(0) if residual is not None else 0, residual.stride(1) if residual is not None else 0,
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        ACTIVATION=ACT_CODES[activation],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        EVEN_K=K % cfg["BLOCK_K"] == 0,
        K_MAJOR=weight_layout(w) == "k-major" and (q.stride(1) == 1 or K <= 1),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _launch(cfg, *args):
    if cfg["kernel"] == "persistent":
        launch_persistent(cfg, *args)
    else:
        _launch_tiled(cfg, *args)


def _may_tune(device: torch.device) -> bool:
    if interpreting() or not autotune_enabled() or device.type != "cuda":
        return False
    return not torch.cuda.is_current_stream_capturing()


def choose_config(q, w, x_scale, w_scale, bias, activation, residual, out_dtype, out) -> tuple[dict, str]:
    """The config a launch uses and how it was found (see ``_tuning.choose``)."""
    tma = tma_compatible(q, w, out, residual)
    if interpreting():
        # the persistent TMA kernel wherever it applies, so that the CPU tests run both kernels
        cfg = dict(INTERPRETER_PERSISTENT) if tma else _tiled(*INTERPRETER_TILED)
        return cfg, "interpreter"
    fields = _key(q, w, residual, out_dtype, activation, bias, tma)

    def bench(cfg):
        import triton.testing

        scratch = torch.empty_like(out)
        run = lambda: _launch(cfg, q, w, x_scale, w_scale, bias, residual, scratch, activation)  # noqa: E731
        run()  # compile outside the timing
        return triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median")

    return _tuning.choose(_tuning.tune_cache(), fields, gpu_configs(q.shape[0], tma), bench,
                          _may_tune(q.device), default_config(q.shape[0], tma))


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
    ``residual`` (tuning runs the kernel more than once).
    ``config`` (tests, benchmarks): bypass the tuner: ``kernel`` (``"tiled"``, default, or
    ``"persistent"``), ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K`` (powers of two, ``BLOCK_K >= 32``) and
    optionally ``GROUP_M``, ``num_warps``, ``num_stages`` (persistent: ``EPILOGUE_SUBTILE``,
    ``CTAS_PER_SM``).
    """
    op = "int8_gemm"
    check_tensor(op, "q", q, dtypes=(torch.int8,), ndim=2, shape_hint="[M, K]")
    check_tensor(op, "w", w, dtypes=(torch.int8,), ndim=2, shape_hint="[N, K]")
    M, K = q.shape
    check_tensor(op, "w", w, shape_hint=f"[N, K={K}] (q is [{M}, {K}])", sizes={1: K})
    N = w.shape[0]
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
        raise ValueError("int8_gemm: out must not alias residual (tuning may launch the kernel more than once)")
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype, device=device)
    if config is not None:
        config = _check_config(config, tma_compatible(q, w, out, residual))
    if M == 0 or N == 0:
        return out
    if config is None:
        config, _ = choose_config(q, w, x_scale, w_scale, bias, activation, residual, out_dtype, out)
    _launch(config, q, w, x_scale, w_scale, bias, residual, out, activation)
    return out


def tuned_config(q: torch.Tensor, w: torch.Tensor, bias=None, activation="none", residual=None,
                 out_dtype=torch.float32) -> dict | None:
    """The config the tuner holds for these operands (None before they were tuned or on CPU)."""
    if q.device.type != "cuda":
        return None
    out = torch.empty((q.shape[0], w.shape[0]), device=q.device, dtype=out_dtype)
    tma = tma_compatible(q, w, out, residual)
    return _tuning.tune_cache().get(_key(q, w, residual, out_dtype, activation, bias, tma))
