"""QIRC diagnostics: how quantization noise grows with depth.

    NSR_l = ||h_l^int8 - h_l^fp32||_F / ||h_l^fp32||_F      (all tokens of the same images)

for l = 0 (the embedding, after ln_pre) .. depth, plus the NSR and cosine of the exit
embeddings (patch mean -> ln_post -> proj, L2-normalised) at every layer and of the model's
own head at full depth. Sums of squares accumulate over batches, so the figure is the NSR of
the whole image set, not a mean of per-batch ratios.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lra_kernels.heads import exit_head, own_head
from lra_kernels.kernels.exit_head import exit_head_ref

from .results import QIRCReport


@torch.no_grad()
def fp32_hidden_states(visual: nn.Module, images: torch.Tensor, return_output: bool = False):
    """Tokens of the FP32 open_clip tower after the embedding and after each block (batch-first);
    with ``return_output``, ``(states, visual(images))`` from the same forward pass."""
    states: list[torch.Tensor] = []
    batch_first = getattr(visual.transformer, "batch_first", True)

    def grab(_m, _i, out):
        states.append(out if batch_first else out.transpose(0, 1))

    def grab_in(_m, args):
        x = args[0]
        states.append(x if batch_first else x.transpose(0, 1))

    blocks = visual.transformer.resblocks
    hooks = [blocks[0].register_forward_pre_hook(grab_in)] + [b.register_forward_hook(grab) for b in blocks]
    try:
        out = visual(images)
    finally:
        for h in hooks:
            h.remove()
    states = [s.float() for s in states]
    return (states, out) if return_output else states


def fp32_reference(visual: nn.Module, images: torch.Tensor, batch_size: int = 16) -> list[list[torch.Tensor]]:
    """FP32 hidden states of ``images`` in batches of ``batch_size`` (on the CPU), for ``diagnose``:
    computed once, they serve every quantization scheme of the same images."""
    dev = next(visual.parameters()).device
    return [[t.cpu() for t in fp32_hidden_states(visual, images[s : s + batch_size].to(dev))]
            for s in range(0, images.shape[0], batch_size)]


def _head_embedding(tower, x: torch.Tensor, head_pool: str | None) -> torch.Tensor:
    """The L2-normalised embedding of ``tower`` (the FP32 open_clip tower or its INT8 version) on tokens ``x``:
    its own head (``head_pool`` None) or an exit head; plain products (``torch.matmul``), the same for both towers."""
    if head_pool is None:
        return F.normalize(own_head(tower, x, matmul=torch.matmul)[0], dim=-1)
    dummy_text = torch.zeros(1, tower.proj.shape[1] if tower.proj is not None else x.shape[-1])
    _, z = exit_head(tower, exit_head_ref, x, dummy_text, 1.0, head_pool)
    return z


@torch.no_grad()
def diagnose(visual: nn.Module, qvit, images: torch.Tensor, scheme: str, batch_size: int = 16,
             reference: list[list[torch.Tensor]] | None = None) -> QIRCReport:
    """NSR / cosine per layer between the FP32 tower and its INT8 version ``qvit`` on ``images``
    (``reference``: ``fp32_reference(visual, images, batch_size)``, when already computed)."""
    depth = qvit.depth
    err2 = np.zeros(depth + 1)
    ref2 = np.zeros(depth + 1)
    cos_sum = np.zeros(depth + 1)
    eerr2, eref2, ecos = np.zeros(depth), np.zeros(depth), np.zeros(depth)
    n_tok = 0
    n = 0
    if reference is None:
        reference = fp32_reference(visual, images, batch_size)
    for b, start in enumerate(range(0, images.shape[0], batch_size)):
        x = images[start : start + batch_size]
        ref = reference[b]
        got = qvit.hidden_states(x.to(qvit.device))
        for layer, (r, g) in enumerate(zip(ref, got)):
            r, g = r.cpu().double(), g.cpu().double()
            err2[layer] += float((g - r).pow(2).sum())
            ref2[layer] += float(r.pow(2).sum())
            cos_sum[layer] += float(F.cosine_similarity(g, r, dim=-1).sum())
            if layer == 0:
                continue
            pool = None if layer == depth else "patch_mean"
            zr = _head_embedding(visual, r.float(), pool).double()
            zg = _head_embedding(qvit, g.float(), pool).double()
            eerr2[layer - 1] += float((zg - zr).pow(2).sum())
            eref2[layer - 1] += float(zr.pow(2).sum())
            ecos[layer - 1] += float(F.cosine_similarity(zg, zr, dim=-1).sum())
        n_tok += ref[0].shape[0] * ref[0].shape[1]
        n += x.shape[0]
    return QIRCReport(
        scheme=scheme,
        nsr_per_layer=np.sqrt(err2 / ref2).tolist(),
        cos_per_layer=(cos_sum / n_tok).tolist(),
        exit_nsr=np.sqrt(eerr2 / eref2).tolist(),
        exit_cos=(ecos / n).tolist(),
        n_images=n,
    )
