"""Helpers shared by the Triton kernel tests (``lra_kernels/kernels/test_*.py``,
``lra_kernels/ops/test_triton_ops.py``).

The kernels run on CUDA when a GPU is present, else on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``, set by ``conftest.py`` before Triton is imported).
"""

from __future__ import annotations

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gpu(test):
    """Mark a GPU-only test (``-m gpu`` selects them) and skip it without CUDA."""
    return pytest.mark.gpu(_needs_cuda(test))


# Numpy warns about the NaN/Inf arithmetic of the non-finite tests in the interpreter.
ignore_fp_warnings = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def poisoned(shape, dtype, device=DEVICE) -> torch.Tensor:
    """An output buffer full of garbage: NaN for floats, a fixed odd code for integers."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, 77, dtype=dtype, device=device)


def assert_within_torch_error(out: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, atol: float = 0.0,
                              name: str = ""):
    """flash-attention's rule: ``|out - exact| <= 2 * max|ref - exact| + atol``.

    ``ref``: PyTorch's result in the same dtype as ``out``; ``exact``: a float64 evaluation. NaN
    must appear exactly where ``exact`` has it.
    """
    assert out.shape == exact.shape, (out.shape, exact.shape)
    out64, ref64, exact = out.double().cpu(), ref.double().cpu(), exact.double().cpu()
    nan = torch.isnan(exact)
    assert torch.equal(torch.isnan(out64), nan), f"{name}: NaN pattern differs from the reference"
    ok = ~nan
    if not ok.any():
        return
    torch_err = (ref64[ok] - exact[ok]).abs().max().item()
    err = (out64[ok] - exact[ok]).abs().max().item()
    assert err <= 2 * torch_err + atol, f"{name}: error {err:.3g} > 2 x torch's {torch_err:.3g} + {atol:.3g}"
