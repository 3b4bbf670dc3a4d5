"""What the machine can do, read once: CPU instruction sets and the activation dtype they favour.

Every speed decision that depends on the processor is taken here (and logged by the model's
``repr`` and the benchmarks' ``extra_info``), never scattered through the modules:

- ``cpu_caps()``: vendor, model name and the flags that matter for INT8 and bf16 on x86
  (``avx512_vnni``, ``avx512_bf16``, ``amx_int8``, ``amx_bf16``, ``avx_vnni``), from
  ``/proc/cpuinfo``; ``torch.backends.cpu.get_cpu_capability()`` as a fallback elsewhere.
- ``resolve_act_dtype(requested, device, backend)``: the dtype of the float activations (residual
  stream, attention core, GEMM outputs). ``None``/``"auto"`` picks fp16 on CUDA, bf16 for the CPU
  kernels on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX-BF16), fp32 elsewhere.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

import torch

ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ACT_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass(frozen=True)
class CpuCaps:
    """The x86 features the CPU kernels dispatch on (all False off x86)."""

    vendor: str
    model_name: str
    flags: frozenset[str]

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def avx512(self) -> bool:
        return {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= self.flags

    @property
    def avx512_vnni(self) -> bool:
        return self.avx512 and "avx512_vnni" in self.flags

    @property
    def avx512_bf16(self) -> bool:
        return self.avx512 and "avx512_bf16" in self.flags

    @property
    def amx_int8(self) -> bool:
        return {"amx_tile", "amx_int8"} <= self.flags

    @property
    def amx_bf16(self) -> bool:
        return {"amx_tile", "amx_bf16"} <= self.flags

    @property
    def native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx_bf16

    def summary(self) -> str:
        """``"AMD EPYC 9R45 [avx512_vnni avx512_bf16]"``: the model and the features we use."""
        used = [f for f in ("avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx_vnni") if f in self.flags]
        return f"{self.model_name} [{' '.join(used) or 'no int8/bf16 extensions'}]"


def _read_cpuinfo() -> tuple[str, str, frozenset[str]]:
    vendor = model = ""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if vendor and model and flags:
                    break
    except OSError:
        pass
    return vendor, model, frozenset(flags)


@functools.lru_cache(maxsize=None)
def cpu_caps() -> CpuCaps:
    vendor, model, flags = _read_cpuinfo()
    if not flags:  # not Linux: what torch's own dispatch detected
        cap = torch.backends.cpu.get_cpu_capability()
        if cap.startswith("AVX512"):
            flags = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})
        elif cap.startswith("AVX2"):
            flags = frozenset({"avx2", "fma"})
    return CpuCaps(vendor or platform.processor() or platform.machine(), model or platform.processor() or "cpu",
                   flags)


def parse_act_dtype(requested) -> torch.dtype | None:
    """``None``/``"auto"`` -> None (chosen per device); a dtype or its name -> that dtype; else ``ValueError``."""
    if requested is None or requested == "auto":
        return None
    if isinstance(requested, str):
        if requested not in _ACT_NAMES:
            raise ValueError(f"act_dtype must be torch.float32, torch.bfloat16, torch.float16 or None, "
                             f"got {requested!r}")
        return _ACT_NAMES[requested]
    if requested not in ACT_DTYPES:
        raise ValueError(f"act_dtype must be torch.float32, torch.bfloat16, torch.float16 or None, got {requested!r}")
    return requested


def act_dtype_name(dtype: torch.dtype | None) -> str:
    return "auto" if dtype is None else str(dtype).replace("torch.", "")


def resolve_act_dtype(requested, device: torch.device | str, backend: str = "torch") -> torch.dtype:
    """The activation dtype to run with on ``device`` with the concrete ``backend`` (see the module docstring).

    The ``"torch"`` backend is the reference: fp32 on CPU unless asked otherwise.
    """
    dtype = parse_act_dtype(requested)
    if dtype is not None:
        return dtype
    if torch.device(device).type == "cuda":
        return torch.float16
    if backend == "cpu" and cpu_caps().native_bf16:
        return torch.bfloat16
    return torch.float32
