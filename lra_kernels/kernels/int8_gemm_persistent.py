"""Persistent INT8 GEMM with TMA descriptors and a subtiled epilogue (the contract of ``int8_gemm_ref``).

    acc[m, n] = sum_k q[m, k] * w[n, k]                          int32, exact
    out[m, n] = act(acc * x_scale[m] * w_scale[n] + bias[n]) + residual[m, n]

A grid of ``min(tiles, CTAS_PER_SM * SMs)`` programs walks the ``BLOCK_M x BLOCK_N`` output tiles
(grouped order, stride = the grid size) in one ``tl.range(..., flatten=True)`` loop over tiles
and K steps (Triton's persistent-matmul pattern): the compiler pipelines the flattened loop, so
the next tile's first TMA loads are in flight while this tile's epilogue runs. Operands,
residual and output move through TMA descriptors (``q[M, K]`` and ``w[N, K]``, both K-major,
blocks ``[BLOCK_M, BLOCK_K]`` and ``[BLOCK_N, BLOCK_K]``); out-of-range rows and K columns load
as zeros and out-of-range stores are dropped by the copy engine, so the kernel has no masks.
The epilogue runs on ``EPILOGUE_SUBTILE`` (1, 2 or 4) column slices of the accumulator, each
stored on its own, which divides the registers and the shared-memory staging of the store.

TMA needs sm_90+, unit inner strides, row strides and bases 16-byte aligned (``tma_compatible``);
other operands take the tiled kernel of ``int8_gemm.py``. Triton's interpreter runs descriptors
too, so the CPU tests run this kernel on a small grid (3 programs) that walks several tiles each.
"""

from __future__ import annotations

import functools

import torch

from ..names import ACT_CODES
from ._gemm_common import _activate, _grouped_tile
from ._triton import interpreting, tl, triton

GROUP_M = 8
INTERPRETER_PROGRAMS = 3


def _persistent(bm, bn, bk, stages, warps, subtile, ctas) -> dict:
    return {"kernel": "persistent", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M,
            "num_stages": stages, "num_warps": warps, "EPILOGUE_SUBTILE": subtile, "CTAS_PER_SM": ctas}


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, EPILOGUE_SUBTILE, CTAS_PER_SM). CTAS_PER_SM sets the grid
# and is a claim that scripts/compile_check.py checks against the compiled registers and shared memory
# for every epilogue the block launches. Quarter slices (EPILOGUE_SUBTILE = 4) keep the 8-warp
# 128 x 128 tile at <= 128 registers and its fp32 output staging small enough for two CTAs per SM.
PERSISTENT_CONFIGS = tuple(_persistent(*c) for c in (
    (128, 256, 128, 3, 8, 4, 1),
    (128, 256, 64, 4, 8, 4, 1),
    (128, 128, 64, 4, 8, 4, 2),
    (64, 128, 128, 3, 4, 2, 2),
))
# Under the interpreter: small tiles, so that a tiny problem still has several tiles per program.
INTERPRETER_PERSISTENT = _persistent(32, 32, 64, 1, 4, 2, 1)


@triton.jit
def _int8_gemm_persistent_kernel(
    # descriptors and pointers
    q_desc,
    w_desc,
    out_desc,
    residual_desc,
    x_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    # sizes
    M,
    N,
    K,
    # strides
    stride_xs,
    stride_ws,
    stride_bias,
    # constexprs
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr,
):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    step = tl.num_programs(0)
    # The epilogue keeps its own tile counter: after flattening, the loop's induction variable
    # belongs to the loads of the next tile.
    tile_out = tl.program_id(0) - step
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, step, flatten=True):
        pid_m, pid_n = _grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ks in range(k_steps):
            a = q_desc.load([off_m, ks * BLOCK_K])
            b = w_desc.load([off_n, ks * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)

        tile_out += step
        pid_m, pid_n = _grouped_tile(tile_out, tiles_m, tiles_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows = off_m + tl.arange(0, BLOCK_M)
        xs = tl.load(x_scale_ptr + rows * stride_xs, mask=rows < M, other=0.0)
        y = acc.to(tl.float32) * xs[:, None]
        SUB_N: tl.constexpr = BLOCK_N // EPILOGUE_SUBTILE
        if EPILOGUE_SUBTILE == 1:
            _epilogue_store(y, off_m, off_n, N, w_scale_ptr, bias_ptr, stride_ws, stride_bias, out_desc,
                            residual_desc, HAS_BIAS, HAS_RESIDUAL, ACTIVATION, SUB_N)
        else:
            # column halves (quarters): [BLOCK_M, 2, BLOCK_N / 2] -> permute -> split
            y0, y1 = tl.split(tl.permute(tl.reshape(y, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            if EPILOGUE_SUBTILE == 2:
                _epilogue_store(y0, off_m, off_n, N, w_scale_ptr, bias_ptr, stride_ws, stride_bias, out_desc,
                                residual_desc, HAS_BIAS, HAS_RESIDUAL, ACTIVATION, SUB_N)
                _epilogue_store(y1, off_m, off_n + SUB_N, N, w_scale_ptr, bias_ptr, stride_ws, stride_bias,
                                out_desc, residual_desc, HAS_BIAS, HAS_RESIDUAL, ACTIVATION, SUB_N)
            else:
                y00, y01 = tl.split(tl.permute(tl.reshape(y0, (BLOCK_M, 2, SUB_N)), (0, 2, 1)))
                y10, y11 = tl.split(tl.permute(tl.reshape(y1, (BLOCK_M, 2, SUB_N)), (0, 2, 1)))
                _epilogue_store(y00, off_m, off_n, N, w_scale_ptr, bias_ptr, stride_ws, stride_bias, out_desc,
                                residual_desc, HAS_BIAS, HAS_RESIDUAL, ACTIVATION, SUB_N)
                _epilogue_store(y01, off_m, off_n + SUB_N, N, w_scale_ptr, bias_ptr, stride_ws, stride_bias,
                                out_desc, residual_desc, HAS_BIAS, HAS_RESIDUAL, ACTIVATION, SUB_N)
                _epilogue_store(y10, off_m, off_n + 2 * SUB_N, N, w_scale_ptr, bias_ptr, stride_ws, stride_bias,
                                out_desc, residual_desc, HAS_BIAS, HAS_RESIDUAL, ACTIVATION, SUB_N)
                _epilogue_store(y11, off_m, off_n + 3 * SUB_N, N, w_scale_ptr, bias_ptr, stride_ws, stride_bias,
                                out_desc, residual_desc, HAS_BIAS, HAS_RESIDUAL, ACTIVATION, SUB_N)


@triton.jit
def _epilogue_store(y, off_m, off_n, N, w_scale_ptr, bias_ptr, stride_ws, stride_bias, out_desc, residual_desc,
                    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
                    SUB_N: tl.constexpr):
    """``y = acc * x_scale`` of one column slice: finish the reference's order and store it."""
    cols = off_n + tl.arange(0, SUB_N)
    ok = cols < N
    y = y * tl.load(w_scale_ptr + cols * stride_ws, mask=ok, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols * stride_bias, mask=ok, other=0.0)[None, :]
    y = _activate(y, ACTIVATION)
    if HAS_RESIDUAL:
        y = y + residual_desc.load([off_m, off_n]).to(tl.float32)
    out_desc.store([off_m, off_n], y.to(out_desc.dtype))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tma_ready(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def tma_compatible(q, w, out, residual) -> bool:
    """True when the persistent TMA kernel can take these operands (device and alignment)."""
    if q.device.type == "cuda":
        if torch.cuda.get_device_capability(q.device)[0] < 9:
            return False
    elif not (q.device.type == "cpu" and interpreting()):
        return False
    if min(q.shape[0], q.shape[1], w.shape[0]) < 1:
        return False
    tensors = (q, w, out) if residual is None else (q, w, out, residual)
    return all(_tma_ready(t) for t in tensors)


def launch_persistent(cfg, q, w, x_scale, w_scale, bias, residual, out, activation):
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = q.shape
    N = w.shape[0]
    bm, bn, bk, sub = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg.get("EPILOGUE_SUBTILE", 1)
    q_desc = TensorDescriptor(q, [M, K], [q.stride(0), 1], [bm, bk])
    w_desc = TensorDescriptor(w, [N, K], [w.stride(0), 1], [bn, bk])
    out_desc = TensorDescriptor(out, [M, N], [out.stride(0), 1], [bm, bn // sub])
    res_desc = (TensorDescriptor(residual, [M, N], [residual.stride(0), 1], [bm, bn // sub])
                if residual is not None else out_desc)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if q.device.type == "cuda":
        slots = cfg.get("CTAS_PER_SM", 1) * _sm_count(q.device.index if q.device.index is not None else 0)
    else:
        slots = INTERPRETER_PROGRAMS
    _int8_gemm_persistent_kernel[(min(tiles, slots),)](
        q_desc, w_desc, out_desc, res_desc,
        x_scale, w_scale, bias if bias is not None else w_scale,
        M, N, K,
        x_scale.stride(0), w_scale.stride(0), bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        ACTIVATION=ACT_CODES[activation],
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.get("GROUP_M", GROUP_M), EPILOGUE_SUBTILE=sub,
        num_warps=cfg.get("num_warps", 8), num_stages=cfg.get("num_stages", 3),
    )
