"""Row-wise products: ``out[b, :] = a[b, :] @ w`` with every row computed on its own.

A plain ``a @ w`` picks its blocking from the batch size ``B``, so a row's float result could
change with the batch it shares; early-exit decisions must not, so the heads and projections use
this. On CPU each row is one matrix-vector product (the same call whatever ``B``; a batched GEMM
was not enough: MKL's batched kernels regroup the products by batch size on Intel CPUs); on CUDA a
batch of ``1 x K`` GEMMs. The CPU kernels have their own, in a fixed summation order
(``lra_kernels.cpu.ops.rows_matmul``).

Shapes and dtypes: ``a[B, K]``, ``w[K, N]`` float; ``out[B, N]`` in their promoted dtype.
"""

from __future__ import annotations

import torch


def matmul_rows(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a[B, K] @ w[K, N]`` with each row computed alone (see the module docstring)."""
    if a.device.type != "cpu":
        return torch.bmm(a.unsqueeze(1), w.expand(a.shape[0], *w.shape)).squeeze(1)
    wt = w.t()
    out = torch.empty(a.shape[0], w.shape[1], dtype=torch.promote_types(a.dtype, w.dtype))
    for i in range(a.shape[0]):
        torch.mv(wt, a[i], out=out[i])
    return out
