"""Kernels: one file per operation, holding its Triton kernel, its pure-torch ``*_ref`` and a validating launcher.

``attention`` and ``matmul_rows`` have a reference only (every backend but the CPU kernels runs it).
The backends that collect them are in ``lra_kernels.ops``; importing this package imports no backend.
"""
