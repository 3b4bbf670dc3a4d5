"""Kernels: each file holds a Triton kernel, its pure-torch ``*_ref`` and a validating launcher.

``triton_ops()`` returns the operation namespace of the ``"triton"`` backend (see
``lra_kernels.backend``); it imports Triton, so it is only called when that backend is used.
"""


def triton_ops():
    raise NotImplementedError(
        "the Triton backend's kernels are not built yet; use backend='torch' (or 'auto' on CPU)"
    )
