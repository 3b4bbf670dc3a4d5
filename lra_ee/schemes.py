"""The quantization schemes an experiment compares, by name, and how a tower is quantized under one.

    paper              the paper's baseline: quantize_dynamic emulation (MLP GEMMs only, per-tensor)
    per_token          W8A8, per-token dynamic activations
    smoothquant        W8A8 per-token + SmoothQuant (alpha 0.5)
    per_tensor_static  W8A8 per-tensor static activations + SmoothQuant (alpha 0.5)

A new scheme is one entry in each of the three tables below (``QuantEarlyExitViT.from_open_clip``
keywords, a label for plots, a line of help); see docs/architecture.md.
"""

from __future__ import annotations

import torch

from lra_kernels import QuantEarlyExitViT

SCHEMES = {
    "paper": dict(act_quant="paper"),
    "per_token": dict(act_quant="per_token"),
    "smoothquant": dict(act_quant="per_token", smooth_alpha=0.5),
    "per_tensor_static": dict(act_quant="per_tensor_static", smooth_alpha=0.5),
}
SCHEME_LABEL = {
    "paper": "paper (quantize_dynamic)",
    "per_token": "per-token",
    "smoothquant": "per-token + SmoothQuant",
    "per_tensor_static": "static per-tensor + SmoothQuant",
}
SCHEME_HELP = {
    "paper": "the paper's baseline: torch.ao quantize_dynamic emulation (MLP only, per-tensor)",
    "per_token": "W8A8, per-token dynamic activations",
    "smoothquant": "W8A8 per-token + SmoothQuant (alpha 0.5)",
    "per_tensor_static": "W8A8 per-tensor static activations + SmoothQuant (alpha 0.5)",
}


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {tuple(SCHEMES)}, got {scheme!r}")
    return scheme


def quantize(visual, scheme: str, calibration_images: torch.Tensor | None, backend: str = "auto") -> QuantEarlyExitViT:
    """``visual`` (an open_clip tower) quantized under ``scheme``; ``calibration_images`` for the schemes
    that calibrate (static scales, SmoothQuant)."""
    kwargs = dict(SCHEMES[check_scheme(scheme)])
    if kwargs.get("act_quant") == "per_tensor_static" or "smooth_alpha" in kwargs:
        kwargs["calibration_images"] = calibration_images
    return QuantEarlyExitViT.from_open_clip(visual, backend=backend, **kwargs)
