"""``triton`` and ``triton.language``, or stand-ins when Triton is not installed.

The kernel files define their ``@triton.jit`` kernels at import time, but the torch backend (which
imports the same files for their ``*_ref`` functions) must work where Triton is missing (macOS,
Windows). The stand-ins accept the decorators and fail only when a kernel is launched.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated: set it before importing
``lra_kernels`` to run the kernels on CPU tensors.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    HAVE_TRITON = False

    class _MissingKernel:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError("Triton is not installed: the 'triton' backend is unavailable; use backend='torch'")

    class _MissingTriton:
        @staticmethod
        def jit(fn=None, **kwargs):
            return _MissingKernel(fn) if fn is not None else _MissingKernel

        @staticmethod
        def autotune(*args, **kwargs):
            return lambda kernel: kernel

        @staticmethod
        def heuristics(*args, **kwargs):
            return lambda kernel: kernel

        @staticmethod
        def Config(*args, **kwargs):
            return None

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

    class _MissingLanguage:
        def __getattr__(self, name):
            return None

    triton = _MissingTriton()
    tl = _MissingLanguage()



def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter on CPU tensors (``TRITON_INTERPRET=1``).

    Read at call time: the one place the package asks (launchers, backend selection)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


__all__ = ["HAVE_TRITON", "interpreting", "triton", "tl"]
