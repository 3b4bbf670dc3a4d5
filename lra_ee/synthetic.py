"""Synthetic stand-ins for what these machines cannot download: towers with seeded random
weights, with and without the activation outlier channels of trained CLIP.

Everything here is labelled synthetic; numbers measured on it are not accuracy on real data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lra_kernels import ExitPolicy


def random_tower(model_name: str = "ViT-B-32", seed: int = 0) -> nn.Module:
    """An open_clip vision tower of ``model_name`` (a built-in name, ``hf-hub:org/name`` or ``local-dir:/path``)
    with seeded random weights (eval mode)."""
    from .model_ids import random_visual

    return random_visual(model_name, seed)


@dataclass(frozen=True)
class OutlierPlan:
    """Which channels were made outliers and how strong they came out."""

    residual_channels: tuple[int, ...]
    ln_channels: tuple[int, ...]
    ratio: float  # median over blocks of mean |ln_1 output| in planted channels / mean elsewhere


@torch.no_grad()
def plant_outlier_channels(
    visual: nn.Module,
    n_channels: int = 4,
    ln_gain: float = 30.0,
    residual_gain: float = 40.0,
    seed: int = 0,
    probe_images: torch.Tensor | None = None,
) -> OutlierPlan:
    """Give a tower the activation outliers trained CLIP has (in place).

    Two mechanisms, as reported for trained ViTs / CLIP:

    - LayerNorm-gain outliers, function-preserving: in ``n_channels`` channels every
      ``ln_1``/``ln_2`` gain and bias is multiplied by ``ln_gain`` and the matching input columns
      of ``in_proj``/``c_fc`` divided by it. The FP32 function is unchanged; the GEMM inputs get
      channels ``ln_gain`` times larger than the rest.
    - Massive residual-stream channels: ``n_channels`` other channels get a constant offset of
      ``residual_gain`` positional-embedding standard deviations in every token, carried by the
      residual stream through every block (this one changes the function, as in trained models).

    Returns the plan with the measured outlier ratio at the LayerNorm outputs.
    """
    gen = torch.Generator().manual_seed(seed)
    D = visual.conv1.out_channels
    if not 0 < 2 * n_channels <= D:
        raise ValueError(f"n_channels must be in 1..{D // 2}, got {n_channels}")
    perm = torch.randperm(D, generator=gen)
    res, lnc = perm[:n_channels], perm[n_channels : 2 * n_channels]
    if residual_gain:
        std = visual.positional_embedding.float().std()
        sign = torch.where(torch.rand(n_channels, generator=gen) < 0.5, -1.0, 1.0)
        offset = (residual_gain * std * sign).to(visual.positional_embedding.dtype)
        visual.positional_embedding[:, res] += offset
        visual.class_embedding[res] += offset.to(visual.class_embedding.dtype)
    for blk in visual.transformer.resblocks:
        for ln, weight in ((blk.ln_1, blk.attn.in_proj_weight), (blk.ln_2, blk.mlp.c_fc.weight)):
            ln.weight[lnc] *= ln_gain
            ln.bias[lnc] *= ln_gain
            weight[:, lnc] /= ln_gain
    ratio = measure_outlier_ratio(visual, lnc, probe_images, seed)
    return OutlierPlan(tuple(res.tolist()), tuple(lnc.tolist()), ratio)


@torch.no_grad()
def measure_outlier_ratio(
    visual: nn.Module, channels: torch.Tensor, images: torch.Tensor | None = None, seed: int = 0
) -> float:
    """Median over blocks of mean |ln_1 output| in ``channels`` over the mean in the other channels."""
    if images is None:
        gen = torch.Generator().manual_seed(seed)
        h, w = visual.image_size
        images = torch.randn(2, 3, h, w, generator=gen)
    outs = []
    hooks = [b.ln_1.register_forward_hook(lambda m, i, o: outs.append(o.detach().float().abs()))
             for b in visual.transformer.resblocks]
    try:
        visual(images.to(visual.conv1.weight.device, visual.conv1.weight.dtype))
    finally:
        for h in hooks:
            h.remove()
    mask = torch.zeros(outs[0].shape[-1], dtype=torch.bool)
    mask[channels] = True
    ratios = [o[..., mask].mean() / o[..., ~mask].mean() for o in outs]
    return float(torch.stack(ratios).median())


# ---------------------------------------------------------------------- the built-in task
@dataclass(frozen=True)
class SyntheticTask:
    """A zero-shot task with a known answer, for machines without real data.

    Class "text" embeddings are the FP32 tower's own (normalised) embeddings of ``C`` generated
    prototype images; each sample is a prototype blended with a distractor image, the blend
    weight drawn per sample, labelled with its prototype's class. FP32 accuracy is well above
    chance but not perfect, so the four-quadrant table is non-trivial. Synthetic: its
    accuracies say nothing about CLIP on real images.
    """

    images: torch.Tensor  # [N, 3, H, W]
    labels: torch.Tensor  # [N]
    text_features: torch.Tensor  # [C, E]
    class_names: list[str]
    description: str


def _smooth_images(n: int, size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Random images with low- and mid-frequency structure, roughly normalised like CLIP inputs."""
    import torch.nn.functional as F

    coarse = F.interpolate(torch.randn(n, 3, 7, 7, generator=gen), size=size, mode="bicubic", align_corners=False)
    mid = F.interpolate(torch.randn(n, 3, 28, 28, generator=gen), size=size, mode="bicubic", align_corners=False)
    return coarse + 0.3 * mid


@torch.no_grad()
def builtin_task(visual: nn.Module, n_classes: int = 20, n_images: int = 1000, seed: int = 0,
                 blend: tuple[float, float] = (0.2, 0.9), batch_size: int = 64) -> SyntheticTask:
    """Build the synthetic task for ``visual`` (its FP32 embeddings define the classes)."""
    gen = torch.Generator().manual_seed(seed)
    size = tuple(visual.image_size)
    prototypes = _smooth_images(n_classes, size, gen)
    dev = next(visual.parameters()).device
    text = torch.nn.functional.normalize(visual(prototypes.to(dev)).float().cpu(), dim=-1)
    labels = torch.randint(0, n_classes, (n_images,), generator=gen)
    w = torch.empty(n_images).uniform_(*blend, generator=gen)[:, None, None, None]
    distractors = _smooth_images(n_images, size, gen)
    images = w * prototypes[labels] + (1 - w) * distractors
    desc = (f"synthetic: {n_classes} prototype classes, {n_images} blended samples (blend {blend[0]}..{blend[1]}), "
            f"class embeddings = FP32 tower embeddings of the prototypes; seed {seed}")
    return SyntheticTask(images, labels, text, [f"prototype {i}" for i in range(n_classes)], desc)


@torch.no_grad()
def policy_with_exit_fractions(qvit, images: torch.Tensor, exit_layers: tuple[int, ...], fractions) -> ExitPolicy:
    """An ``ExitPolicy`` under which ``fractions[j]`` of ``images`` leave at ``exit_layers[j]`` (benchmarks:
    known exit distributions on random weights). The gate scores confidence and margin; each
    threshold sits midway between two neighbouring scores of the rows still running."""
    res = qvit.all_exits(images, exit_layers)
    mean, std = res.features.mean(1), res.features.std(1).clamp_min(1e-6)
    L = len(exit_layers)
    p = ExitPolicy(tuple(exit_layers), torch.tensor([[4.0, 1.0, 0.0]] * L), torch.zeros(L), mean, std, torch.ones(L))
    remaining = torch.ones(images.shape[0], dtype=torch.bool, device=res.features.device)
    taus = []
    for j, frac in enumerate(fractions):
        scores = p.gate_scores(j, res.features[j])
        cand = scores[remaining].sort(descending=True).values
        k = round(frac * images.shape[0])
        if k <= 0:
            tau = 2.0  # nobody leaves
        elif k >= len(cand):
            tau = 0.0  # everybody still running leaves
        else:
            tau = float(cand[k - 1] + cand[k]) / 2
        taus.append(tau)
        remaining &= scores < tau
    return p.with_thresholds(taus)
