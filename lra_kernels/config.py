"""Frozen configuration records: the quantization recipe and the vision tower's architecture."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .names import ACT_QUANT, ACTIVATIONS, POOL_TYPES


@dataclass(frozen=True)
class QuantConfig:
    """How the tower is quantized.

    act_quant: ``per_token`` (dynamic, one scale per token, default), ``per_tensor_static``
        (one calibrated scale per GEMM input) or ``paper`` (emulation of the paper's baseline,
        ``torch.ao.quantization.quantize_dynamic`` on ``nn.Linear``: MLP GEMMs only, per-tensor
        weights, dynamic per-tensor activations; attention projections stay float).
    smooth_alpha: SmoothQuant migration strength in [0, 1], or None for no smoothing.
    static_percentile: for ``per_tensor_static``, the percentile of |x| taken as the clipping
        range (None: the maximum).
    int8_patch_embed: run the patch embedding (``conv1``) as a per-patch INT8 GEMM instead of a
        float convolution. None (default): yes, except under ``act_quant="paper"`` (the paper's
        baseline left it float). See docs/quantization.md.
    """

    act_quant: str = "per_token"
    smooth_alpha: float | None = None
    static_percentile: float | None = None
    int8_patch_embed: bool | None = None

    def __post_init__(self):
        if self.act_quant not in ACT_QUANT:
            raise ValueError(f"act_quant must be one of {ACT_QUANT}, got {self.act_quant!r}")
        if self.smooth_alpha is not None:
            if self.act_quant == "paper":
                raise ValueError("smooth_alpha cannot be combined with act_quant='paper' "
                                 "(the paper's scheme has no smoothing)")
            if not 0.0 <= float(self.smooth_alpha) <= 1.0:
                raise ValueError(f"smooth_alpha must lie in [0, 1], got {self.smooth_alpha}")
        if self.static_percentile is not None:
            if self.act_quant != "per_tensor_static":
                raise ValueError("static_percentile applies to act_quant='per_tensor_static' only")
            if not 0.0 < float(self.static_percentile) <= 100.0:
                raise ValueError(f"static_percentile must lie in (0, 100], got {self.static_percentile}")
        if self.int8_patch_embed is None:
            object.__setattr__(self, "int8_patch_embed", self.act_quant != "paper")
        if self.int8_patch_embed and self.act_quant == "paper":
            raise ValueError("int8_patch_embed cannot be combined with act_quant='paper'")

    @property
    def needs_calibration(self) -> bool:
        return self.act_quant == "per_tensor_static" or self.smooth_alpha is not None

    @property
    def attn_mode(self) -> str:
        return "float" if self.act_quant == "paper" else self.act_quant

    @property
    def mlp_mode(self) -> str:
        return self.act_quant

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        return cls(**d)


@dataclass(frozen=True)
class VisionArch:
    """What is needed to rebuild a quantized open_clip ``VisionTransformer`` without open_clip."""

    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    width: int
    layers: int
    heads: int
    mlp_hidden: int
    activation: str
    output_dim: int
    has_proj: bool = True
    pool_type: str = "tok"
    final_ln_after_pool: bool = False
    no_ln_pre: bool = False
    eps: float = 1e-5
    attn_bias: bool = True
    output_tokens: bool = False
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS[1:]:
            raise ValueError(f"activation must be one of {ACTIVATIONS[1:]}, got {self.activation!r}")
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type must be one of {POOL_TYPES}, got {self.pool_type!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        for name in ("image_size", "patch_size"):
            v = getattr(self, name)
            object.__setattr__(self, name, tuple(int(t) for t in v))
        if any(i % p for i, p in zip(self.image_size, self.patch_size)):
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def num_tokens(self) -> int:
        gh, gw = self.grid_size
        return gh * gw + 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"], d["patch_size"] = list(self.image_size), list(self.patch_size)
        d["preprocess_cfg"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.preprocess_cfg.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionArch":
        d = dict(d)
        d["preprocess_cfg"] = {k: tuple(v) if isinstance(v, list) else v
                               for k, v in d.get("preprocess_cfg", {}).items()}
        return cls(**d)
