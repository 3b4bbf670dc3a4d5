"""Kernels: each file holds a Triton kernel, its pure-torch ``*_ref`` and a validating launcher."""
