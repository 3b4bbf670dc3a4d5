"""CPU kernels: INT8 GEMMs on prepacked weights with fused epilogues, for AVX-512 VNNI and AMX-INT8.

A small C++ library (``csrc/``) registered as ``torch.ops.lra_cpu``, compiled on first use with the
machine's own compiler for the machine's own instruction set (``-march=native``) and cached
(``$LRA_KERNELS_CACHE`` or ``~/.cache/lra-kernels``). Nothing is compiled at install time; where
the library cannot be built (no C++ compiler, no AVX-512 VNNI, not Linux x86-64) ``available()``
is False, ``reason()`` says why, and the model runs on the ``"torch"`` backend instead.

The micro-kernel's instruction set is chosen once, at load (``isa()``): AMX-INT8 tiles where the
CPU has them and Linux grants the tile state, after a self-test against the AVX-512 VNNI kernel;
AVX-512 VNNI otherwise. ``LRA_CPU_ISA=avx512_vnni`` forces the latter; ``LRA_CPU_KERNELS=0``
disables the library.

Formats and numerics: ``csrc/common.h``. The Python wrappers are in ``lra_kernels.cpu.ops``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path

import torch

from ..hardware import cpu_caps

_HERE = Path(__file__).resolve().parent
SOURCES = ("ops.cpp", "gemm.cpp", "attention.cpp", "heads.cpp")
HEADERS = ("common.h", "gemm.h", "attention.h")
# -fopenmp: at::parallel_for is a template whose OpenMP region is compiled here (torch's own libgomp
# is already loaded and is the one used).
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-Wno-unused-function")
LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_state: dict = {}
log = logging.getLogger(__name__)


def _cache_root() -> Path:
    root = os.environ.get("LRA_KERNELS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "lra-kernels"


def _build_name() -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update((_HERE / "csrc" / name).read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(" ".join(sorted(cpu_caps().flags)).encode())
    return f"lra_cpu_{h.hexdigest()[:12]}"


def _why_not() -> str | None:
    if os.environ.get("LRA_CPU_KERNELS", "1") in ("0", ""):
        return "disabled by LRA_CPU_KERNELS=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the CPU kernels are built for Linux x86-64 (this is {platform.system()} {platform.machine()})"
    if not cpu_caps().avx512_vnni:
        return f"the CPU lacks AVX-512 VNNI ({cpu_caps().summary()})"
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "no C++ compiler found (c++/g++/clang++) to build the CPU kernels"
    return None


def _self_test() -> bool:
    """The GEMM's int32 sums against an int64 matmul on awkward shapes, with the current ISA."""
    g = torch.Generator().manual_seed(0)
    for M, K, N in ((1, 8, 8), (37, 136, 200), (70, 768, 96)):
        x = torch.randn(M, K, generator=g)
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        codes, scale = torch.ops.lra_cpu.quantize(x, None, None, 0.0, False, None, 0.0)
        packed, colsum = torch.ops.lra_cpu.pack_weight(w)
        acc = torch.ops.lra_cpu.gemm(codes, scale, packed, colsum, N, K, torch.ones(N), None, 0, None, 3,
                                     torch.float32, None, 0.0, None, None, 0.0)[0]
        q = codes[:M, :K].to(torch.int64) - 128
        if not torch.equal(acc.to(torch.int64), q @ w.to(torch.int64).t()):
            return False
    return True


def _load() -> None:
    reason = _why_not()
    if reason is not None:
        _state.update(available=False, reason=reason, isa=None)
        return
    name = _build_name()
    build_dir = _cache_root() / name
    try:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on import
        from torch.utils import cpp_extension

        build_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cpp_extension.load(name=name, sources=[str(_HERE / "csrc" / s) for s in SOURCES],
                               extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), build_directory=str(build_dir),
                               is_python_module=False,
                               verbose=False)
    except Exception as err:  # a compiler error, a missing ninja: stay correct on the torch backend
        first = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
        _state.update(available=False, reason=f"building the CPU kernels failed ({first})", isa=None)
        warnings.warn(f"lra_kernels: the CPU kernels could not be built; using the torch backend ({first})")
        return
    ops = torch.ops.lra_cpu
    ops.set_amx(False)
    if not _self_test():
        _state.update(available=False, reason="the AVX-512 VNNI kernel failed its self-test", isa=None)
        warnings.warn("lra_kernels: the CPU kernels failed their self-test; using the torch backend")
        return
    note = None
    want_amx = os.environ.get("LRA_CPU_ISA", "auto") not in ("avx512_vnni", "vnni")
    if want_amx and cpu_caps().amx_int8:
        if not ops.amx_compiled():
            note = "AMX-INT8 present but not compiled in"
        elif not ops.set_amx(True):
            note = "AMX-INT8 present but Linux refused the tile state (arch_prctl)"
        elif not _self_test():
            ops.set_amx(False)
            note = "AMX-INT8 kernel failed its self-test: using AVX-512 VNNI"
            warnings.warn(f"lra_kernels: {note}")
    _state.update(available=True, reason=None, isa=str(ops.isa()), note=note, build_dir=str(build_dir))
    log.info("lra_kernels CPU kernels: %s on %s", _state["isa"], cpu_caps().summary())


def _ensure() -> dict:
    if not _state:
        with _lock:
            if not _state:
                _load()
    return _state


def available() -> bool:
    """True when the CPU kernels are built and passed their self-test (builds them on first call)."""
    return bool(_ensure()["available"])


def reason() -> str | None:
    """Why the CPU kernels are not available (None when they are)."""
    return _ensure()["reason"]


def isa() -> str | None:
    """``"amx_int8"`` or ``"avx512_vnni"``: the GEMM micro-kernel in use (None when unavailable)."""
    return _ensure()["isa"]


def describe() -> str:
    """One line for ``repr`` and benchmark records: ISA, CPU and any note."""
    st = _ensure()
    if not st["available"]:
        return f"unavailable: {st['reason']}"
    note = f"; {st['note']}" if st.get("note") else ""
    return f"{st['isa']} on {cpu_caps().summary()}{note}"
