"""The quantized tower's parts: the patch embedding, the blocks under open_clip's names, and ``TowerParts``.

``TowerParts`` is everything a ``QuantEarlyExitViT`` holds besides its classifier and exit policy.
The converter (``lra_kernels.convert``) builds it from an open_clip tower in one go;
``empty_parts(arch, quant_config)`` builds the structure a saved state dict is loaded into
(``lra_kernels.serialization``). Either way the model is constructed once, from whole parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .block import QuantBlock, QuantLinear
from .config import QuantConfig, VisionArch


class PatchEmbed(nn.Module):
    """open_clip's ``conv1`` (a stride-``patch`` convolution without bias): ``[B, 3, H, W] -> [B, G, D]``.

    Float: ``F.conv2d`` on ``weight[D, 3, ph, pw]``. INT8 (``linear`` given): patches flattened in
    ``(channel, row, column)`` order, quantized per patch and multiplied with the per-channel INT8
    weight ``[D, 3 * ph * pw]``.
    """

    def __init__(self, patch_size: tuple[int, int], *, weight: torch.Tensor | None = None,
                 linear: QuantLinear | None = None):
        super().__init__()
        if (weight is None) == (linear is None):
            raise ValueError("PatchEmbed takes a float weight or an INT8 linear, not both or neither")
        self.patch_size = tuple(patch_size)
        if linear is not None:
            self.linear = linear
        else:
            self.register_buffer("weight", weight.detach().float().clone())

    @classmethod
    def empty(cls, width: int, patch_size: tuple[int, int], int8: bool) -> PatchEmbed:
        ph, pw = patch_size
        if int8:
            return cls(patch_size, linear=QuantLinear(3 * ph * pw, width, "per_token", bias=False))
        return cls(patch_size, weight=torch.zeros(width, 3, ph, pw))

    @property
    def int8(self) -> bool:
        return hasattr(self, "linear")

    def forward(self, images: torch.Tensor, ops) -> torch.Tensor:
        B, C, H, W = images.shape
        ph, pw = self.patch_size
        if not self.int8:
            x = F.conv2d(images, self.weight, stride=self.patch_size)
            return x.flatten(2).transpose(1, 2)
        gh, gw = H // ph, W // pw
        patches = images.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B * gh * gw, C * ph * pw)
        return self.linear(patches, ops).view(B, gh * gw, -1)


class QuantTransformer(nn.Module):
    """Holds the blocks under open_clip's name, ``transformer.resblocks``."""

    def __init__(self, blocks: list[QuantBlock]):
        super().__init__()
        self.resblocks = nn.ModuleList(blocks)
        self.layers = len(blocks)


@dataclass
class TowerParts:
    """The modules and tensors of a quantized tower (open_clip's names), float tensors fp32."""

    conv1: PatchEmbed
    class_embedding: torch.Tensor  # [D]
    positional_embedding: torch.Tensor  # [T, D]
    ln_pre: nn.Module  # nn.LayerNorm, or nn.Identity (no_ln_pre)
    blocks: list[QuantBlock]
    ln_post: nn.LayerNorm
    proj: torch.Tensor | None  # [D, E]

    def check(self, arch: VisionArch) -> TowerParts:
        """ValueError unless the parts have the shapes ``arch`` describes."""
        D = arch.width
        want = {"class_embedding": (D,), "positional_embedding": (arch.num_tokens, D)}
        if arch.has_proj:
            want["proj"] = (D, arch.output_dim)
        for name, shape in want.items():
            got = getattr(self, name)
            if got is None or tuple(got.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, "
                                 f"got {None if got is None else list(got.shape)}")
        if not arch.has_proj and self.proj is not None:
            raise ValueError("a tower without proj (has_proj=False) was given a proj")
        if len(self.blocks) != arch.layers:
            raise ValueError(f"{len(self.blocks)} blocks for a tower of {arch.layers} layers")
        return self


def _layer_norm(width: int, eps: float) -> nn.LayerNorm:
    return nn.LayerNorm(width, eps=eps)


def empty_parts(arch: VisionArch, quant_config: QuantConfig) -> TowerParts:
    """The structure of a tower of ``arch`` under ``quant_config``, with zero weights (to load a state dict into)."""
    D = arch.width
    blocks = [
        QuantBlock.empty(D, arch.heads, arch.mlp_hidden, arch.activation, arch.eps, quant_config.attn_mode,
                         quant_config.mlp_mode, attn_bias=arch.attn_bias,
                         smooth_proj=quant_config.smooth_alpha is not None)
        for _ in range(arch.layers)
    ]
    return TowerParts(
        conv1=PatchEmbed.empty(D, arch.patch_size, quant_config.int8_patch_embed),
        class_embedding=torch.zeros(D),
        positional_embedding=torch.zeros(arch.num_tokens, D),
        ln_pre=nn.Identity() if arch.no_ln_pre else _layer_norm(D, arch.eps),
        blocks=blocks,
        ln_post=_layer_norm(D, arch.eps),
        proj=torch.zeros(D, arch.output_dim) if arch.has_proj else None,
    )


def check_images(images, image_size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Validate an image batch for a tower of ``image_size`` on ``device``; ``TypeError``/``ValueError`` saying
    what was expected."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected images as a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    H, W = image_size
    if images.ndim != 4:
        raise ValueError(f"expected images of shape [B, 3, {H}, {W}], got {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels (images [B, 3, {H}, {W}]), got {images.shape[1]} in "
                         f"{tuple(images.shape)}")
    if tuple(images.shape[2:]) != (H, W):
        raise ValueError(
            f"expected images of height x width {H} x {W} (the tower's image_size), got "
            f"{images.shape[2]} x {images.shape[3]}; resize with the model's preprocess"
        )
    if not images.is_floating_point():
        raise TypeError(
            f"expected float images (fp32/fp16/bf16, normalised with image_mean/image_std), got {images.dtype}"
        )
    if images.device != device:
        raise ValueError(f"images are on {images.device} but the model is on {device}; move one with .to()")
    return images
