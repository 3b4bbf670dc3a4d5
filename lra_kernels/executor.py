"""The batched early-exit executor.

    x = embed(images)                                   [B, T, D]; active = arange(B)
    for l in 1..depth:
        x = block_l(x)                                  (active rows only)
        if l is an exit point j:
            logits, z = exit_head(x); f = gate_features(logits, x)
            leave = sigmoid(w_j . standardise(f) + b_j) >= tau_j
            write the leaving rows' results to their original positions
            x, active = x[~leave], active[~leave]       (compaction)
            stop if no row is left
    remaining rows: the model's own head (CLS or patch mean -> ln_post -> proj), exit_layer = depth

One host synchronisation per exit point (the count of leaving rows); no Python loop over
samples. Row results do not depend on the batch: the blocks are row-local (exact INT8 GEMMs,
per-token scales) and the heads compute each row alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .heads import exit_head, final_head
from .names import N_FEATURES
from .policy import ExitPolicy


@dataclass
class ClassifyResult:
    """Per-sample results, rows in input order.

    logits[B, C] fp32; embeddings[B, E] fp32, L2-normalised; exit_layer[B] int64 (blocks run,
    ``depth`` = the whole network and the model's own head). With ``return_gate``:
    gate_features[B, L, N_FEATURES] and gate_scores[B, L] at each exit point, NaN where the sample had
    already left.
    """

    logits: torch.Tensor
    embeddings: torch.Tensor
    exit_layer: torch.Tensor
    gate_features: torch.Tensor | None = None
    gate_scores: torch.Tensor | None = None

    @classmethod
    def cat(cls, parts: list["ClassifyResult"]) -> "ClassifyResult":
        """Rows of several results, in order (chunks of one batch)."""
        def join(name):
            ts = [getattr(p, name) for p in parts]
            return None if ts[0] is None else torch.cat(ts)

        return cls(*(join(n) for n in ("logits", "embeddings", "exit_layer", "gate_features", "gate_scores")))


@dataclass
class AllExitsResult:
    """Every exit evaluated on every sample (no early stop): what calibration and evaluation need.

    layers: the exit layers, then ``depth``. logits[len(layers), B, C], embeddings[len(layers), B, E]
    (normalised), features[len(layers) - 1, B, N_FEATURES] (gate features at the exits).
    """

    layers: tuple[int, ...]
    logits: torch.Tensor
    embeddings: torch.Tensor
    features: torch.Tensor

    @classmethod
    def cat(cls, parts: list["AllExitsResult"]) -> "AllExitsResult":
        """Samples of several results, in order (dimension 1)."""
        return cls(parts[0].layers, *(torch.cat([getattr(p, n) for p in parts], dim=1)
                                      for n in ("logits", "embeddings", "features")))


def run_early_exit(
    model,
    images: torch.Tensor,
    policy: ExitPolicy,
    text: torch.Tensor,
    logit_scale: float,
    return_gate: bool = False,
    trace: list | None = None,
) -> ClassifyResult:
    """Classify ``images`` (already checked) with early exits. ``trace`` (tests) collects
    ``(layer, original row indices)`` for every write."""
    ops = model.ops()
    B, device = images.shape[0], images.device
    C, E, L = text.shape[0], text.shape[1], len(policy.exit_layers)
    logits_out = torch.full((B, C), float("nan"), device=device)
    emb_out = torch.full((B, E), float("nan"), device=device)
    exit_layer = torch.full((B,), model.depth, dtype=torch.int64, device=device)
    feats_out = torch.full((B, L, N_FEATURES), float("nan"), device=device) if return_gate else None
    scores_out = torch.full((B, L), float("nan"), device=device) if return_gate else None
    exit_index = {layer: j for j, layer in enumerate(policy.exit_layers)}
    if B == 0:
        return ClassifyResult(logits_out, emb_out, exit_layer, feats_out, scores_out)

    active = torch.arange(B, device=device)
    x = model.embed(images, ops)
    for layer in range(1, model.depth + 1):
        x = model.run_block(layer - 1, x, ops)
        j = exit_index.get(layer)
        if j is None:
            continue
        logits, z = exit_head(model, ops.exit_head, x, text, logit_scale, policy.head)
        feats = ops.gate_features(logits, x)
        scores = policy.gate_scores(j, feats)
        leave = scores >= policy.resident(device)["threshold"][j]  # NaN scores stay
        if return_gate:
            feats_out[active, j] = feats
            scores_out[active, j] = scores
        n_leave = int(leave.sum())  # the one host synchronisation of this exit point
        if n_leave == 0:
            continue
        n_stay = x.shape[0] - n_leave
        order = torch.argsort(leave.to(torch.int8), stable=True)  # staying rows first, in order
        stay, go = order[:n_stay], order[n_stay:]
        rows = active[go]
        logits_out.index_copy_(0, rows, logits.index_select(0, go))
        emb_out.index_copy_(0, rows, z.index_select(0, go))
        exit_layer.index_fill_(0, rows, layer)
        if trace is not None:
            trace.append((layer, rows.clone()))
        active, x = active[stay], x.index_select(0, stay)
        if n_stay == 0:
            break
    if active.numel():
        logits, z = final_head(model, x, text, logit_scale, ops.matmul_rows)
        logits_out.index_copy_(0, active, logits)
        emb_out.index_copy_(0, active, z)
        if trace is not None:
            trace.append((model.depth, active.clone()))
    return ClassifyResult(logits_out, emb_out, exit_layer, feats_out, scores_out)


def run_all_exits(
    model, images: torch.Tensor, layers: tuple[int, ...], text: torch.Tensor, logit_scale: float,
    head: str = "patch_mean",
) -> AllExitsResult:
    """Run the full depth on every sample and evaluate the exit head + gate features at ``layers``."""
    ops = model.ops()
    wanted = set(layers)
    logits_all, emb_all, feats_all = [], [], []
    x = model.embed(images, ops)
    for layer in range(1, model.depth + 1):
        x = model.run_block(layer - 1, x, ops)
        if layer in wanted:
            logits, z = exit_head(model, ops.exit_head, x, text, logit_scale, head)
            logits_all.append(logits)
            emb_all.append(z)
            feats_all.append(ops.gate_features(logits, x))
    logits, z = final_head(model, x, text, logit_scale, ops.matmul_rows)
    logits_all.append(logits)
    emb_all.append(z)
    B = images.shape[0]
    feats = torch.stack(feats_all) if feats_all else torch.zeros(0, B, N_FEATURES, device=images.device)
    return AllExitsResult(tuple(sorted(wanted)) + (model.depth,), torch.stack(logits_all), torch.stack(emb_all), feats)
