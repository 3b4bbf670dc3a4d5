"""The operations contract (``contract``) and the backends that fulfil it.

- ``reference``: the ``"torch"`` backend, the pure-torch references (the contract itself, the
  tests' oracle and the CPU fallback);
- ``triton_ops``: the ``"triton"`` backend, the Triton launchers of ``lra_kernels.kernels``;
- ``cpu_ops``: the ``"cpu"`` backend, the C++ kernels of ``lra_kernels.cpu``.

Which one a model runs on is decided in ``lra_kernels.backend``, nowhere else.
"""

from .contract import Backend, BackendUnavailable, Ops

__all__ = ["Backend", "BackendUnavailable", "Ops"]
