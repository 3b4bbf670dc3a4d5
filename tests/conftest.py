"""Shared fixtures: seeded RNG, tiny open_clip towers, shape tables."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads the
# variable when a kernel is decorated, so it is set here, before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random

import numpy as np
import pytest
import torch
import torch.nn as nn

# Awkward row counts (1, primes, ViT-B/32 and ViT-B/16 token counts) and widths that are not block multiples.
M_SIZES = (1, 13, 50, 197)
K_SIZES = (8, 24, 72, 136)
N_SIZES = (8, 40, 96)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


def make_tower(
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 64,
    layers: int = 3,
    heads: int = 4,
    output_dim: int = 32,
    act: str = "gelu",
    seed: int = 0,
    **kwargs,
) -> nn.Module:
    """A small open_clip VisionTransformer with seeded random weights (eval mode)."""
    from open_clip.transformer import QuickGELU, VisionTransformer

    torch.manual_seed(seed)
    act_layer = QuickGELU if act == "quick_gelu" else nn.GELU
    v = VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        width=width,
        layers=layers,
        heads=heads,
        mlp_ratio=4.0,
        output_dim=output_dim,
        act_layer=act_layer,
        **kwargs,
    )
    # open_clip leaves biases at zero and LayerNorms at identity; randomise them so the tests see them.
    with torch.no_grad():
        for name, p in v.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
                p.add_(0.1 * torch.randn_like(p))
    return v.eval()


@pytest.fixture
def tower():
    return make_tower()


def images_for(visual: nn.Module, n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    h, w = visual.image_size
    return torch.randn(n, 3, h, w, generator=gen)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - test).pow(2).sum()))
