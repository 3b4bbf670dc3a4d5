"""Backend selection, in one place.

``backend=`` takes one of ``names.BACKENDS``:

- ``"torch"``: the pure-torch references (``lra_kernels.ops.reference``); runs anywhere.
- ``"triton"``: the Triton kernels (``lra_kernels.ops.triton_ops``): CUDA, or CPU tensors under
  ``TRITON_INTERPRET=1``.
- ``"cpu"``: the C++ CPU kernels (``lra_kernels.ops.cpu_ops``) where they build and take the scheme.
- ``"auto"``: the first of ``AUTO_ORDER[device type]`` that does not decline: ``"triton"`` on CUDA;
  ``"cpu"``, else ``"torch"``, elsewhere.

Each backend says why it declines a model (``Backend.declines``); asking for one that declines, or
an ``"auto"`` whose every candidate declines, raises ``BackendUnavailable`` with the reasons. A new
backend is one ``Backend`` subclass in ``lra_kernels/ops/`` and one entry in ``BACKEND_CLASSES``
(and ``AUTO_ORDER`` if ``"auto"`` should pick it).
"""

from __future__ import annotations

import torch

from .names import BACKENDS
from .ops.contract import Backend, BackendUnavailable, Ops
from .ops.cpu_ops import CpuBackend
from .ops.reference import TORCH_OPS, TorchBackend
from .ops.triton_ops import TritonBackend

__all__ = ["AUTO_ORDER", "BACKENDS", "BackendUnavailable", "TORCH_OPS", "backend_named", "choose_backend",
           "get_ops", "resolve_backend", "validate_backend"]

BACKEND_CLASSES: dict[str, type[Backend]] = {"torch": TorchBackend, "triton": TritonBackend, "cpu": CpuBackend}
_INSTANCES: dict[str, Backend] = {name: cls() for name, cls in BACKEND_CLASSES.items()}
# What "auto" tries, in order, per device type (any other type: the default).
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton",)}
DEFAULT_AUTO_ORDER = ("cpu", "torch")


def validate_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def backend_named(name: str) -> Backend:
    """The ``Backend`` of a concrete name (``"torch"``, ``"triton"``, ``"cpu"``)."""
    if name not in _INSTANCES:
        raise ValueError(f"no operations for backend {name!r}")
    return _INSTANCES[name]


def choose_backend(backend: str, device: torch.device, quant_config=None) -> Backend:
    """The backend that runs a model of ``quant_config`` (a ``QuantConfig``) on ``device`` when ``backend`` is asked."""
    validate_backend(backend)
    device = torch.device(device)
    candidates = AUTO_ORDER.get(device.type, DEFAULT_AUTO_ORDER) if backend == "auto" else (backend,)
    reasons = []
    for name in candidates:
        chosen = _INSTANCES[name]
        reason = chosen.declines(device, quant_config)
        if reason is None:
            return chosen
        reasons.append((name, reason))
    if backend != "auto":
        raise BackendUnavailable(f"backend='{backend}' cannot run this model: {reasons[0][1]}. "
                                 f"Use backend='torch' or 'auto'.")
    why = "; ".join(f"'{name}': {reason}" for name, reason in reasons)
    raise BackendUnavailable(f"backend='auto' found no backend for this model on {device}: {why}")


def resolve_backend(backend: str, device: torch.device, quant_config=None) -> str:
    """The concrete backend name (``"torch"``, ``"triton"`` or ``"cpu"``) for a model of ``quant_config`` on
    ``device``."""
    return choose_backend(backend, device, quant_config).name


def get_ops(name: str) -> Ops:
    """The operations of a concrete backend."""
    return backend_named(name).ops()
