"""Pieces shared by the INT8 GEMM kernels (``int8_gemm.py``, ``int8_gemm_persistent.py``).

- ``_grouped_tile``: tile ``t`` of a ``tiles_m x tiles_n`` grid in grouped order: ``GROUP_M``
  tile-rows advance together along N, so a weight panel is reused from L2 by ``GROUP_M`` tiles
  before it is evicted (Triton's matmul tutorial).
- ``_activate``: the fp32 activations of the epilogue, codes as ``names.ACT_CODES``.
"""

from __future__ import annotations

from ._triton import tl, triton


@triton.jit
def _grouped_tile(t, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    per_group = GROUP_M * tiles_n
    first_m = (t // per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (t % per_group) % rows_in_group
    pid_n = (t % per_group) // rows_in_group
    return pid_m, pid_n


@triton.jit
def _activate(y, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:  # gelu (erf)
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == 2:  # gelu (tanh approximation) = y * sigmoid(2u)
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = y / (1.0 + tl.exp(-2.0 * u))
    elif ACTIVATION == 3:  # quick_gelu
        y = y / (1.0 + tl.exp(-1.702 * y))
    return y
