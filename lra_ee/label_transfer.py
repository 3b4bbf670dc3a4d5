"""What early exit does with label sets it was not calibrated on (the serving rule's evidence, docs/serving.md).

``measure_label_transfer`` calibrates exit policies on one label set of the built-in synthetic task
(the gate over all features, and a gate over the label-free spatial variance alone, which
calibration marks ``label_agnostic``) and runs each through the executor on held-out images of the
same label set and on other label sets (new prototype classes, other class counts, their own
images): how many images leave early, accuracy with early exit against the full-depth INT8 model
on the same labels, their top-1 agreement, and the FLOPs saved. Synthetic task and, in the
documented run, random weights: the figures show the mechanism, not CLIP's accuracy.
"""

from __future__ import annotations

import torch

from lra_kernels import ExitPolicy
from lra_kernels.flops import flops_model

from .api import calibrate
from .data import TensorSource
from .gate import LABEL_FREE_FEATURES, is_label_agnostic
from .synthetic import builtin_task

GATES = {"all_features": None, "label_free": LABEL_FREE_FEATURES}


@torch.no_grad()
def outcome(qvit, policy: ExitPolicy, images: torch.Tensor, labels: torch.Tensor, text_features: torch.Tensor,
            batch_size: int = 64) -> dict:
    """``policy`` through the executor on ``images`` scored against ``text_features``, beside the full depth."""
    qvit.set_classifier(text_features, qvit.logit_scale)
    ee_top, full_top, layers = [], [], []
    for chunk in images.split(batch_size):
        ee = qvit.classify(chunk, policy=policy)
        full = qvit.classify(chunk, policy=ExitPolicy.disabled())
        ee_top.append(ee.logits.argmax(-1))
        full_top.append(full.logits.argmax(-1))
        layers.append(ee.exit_layer)
    ee_top, full_top, layer = torch.cat(ee_top).cpu(), torch.cat(full_top).cpu(), torch.cat(layers).cpu()
    fm = flops_model(qvit.arch, text_features.shape[0], policy.head)
    flops = fm.per_sample(layer, policy.exit_layers).double()
    return {
        "classes": int(text_features.shape[0]),
        "n": int(images.shape[0]),
        "exited_early": float((layer < qvit.depth).float().mean()),
        "exit_histogram": {int(v): float((layer == v).float().mean()) for v in (*policy.exit_layers, qvit.depth)},
        "acc_full": float((full_top == labels).float().mean()),
        "acc_ee": float((ee_top == labels).float().mean()),
        "agreement_with_full": float((ee_top == full_top).float().mean()),
        "flops_saving": 1.0 - float(flops.mean()) / fm.full(),
    }


def measure_label_transfer(visual, *, n_images: int = 400, n_classes: int = 20, other_classes=(20, 50),
                           seed: int = 0, scheme: str = "smoothquant", exit_layers="auto",
                           flops_budget: float | None = None, batch_size: int = 32) -> dict:
    """Calibrate on label set A (``n_classes`` prototypes, ``n_images`` images) and measure on held-out images
    of A and on label sets with ``other_classes`` new prototypes (``n_images`` images each). ``flops_budget``
    (a fraction of the full-depth FLOPs, as ``calibrate``'s) puts both gates at a comparable operating point.

    Returns ``{"gates": {gate: {"label_agnostic", "exit_layers", "thresholds", "sets": {name: outcome}}},
    "description"}``; set names: ``"A (calibrated)"`` and ``"B<k> (unseen)"``.
    """
    task = builtin_task(visual, n_classes=n_classes, n_images=2 * n_images, seed=seed)
    calib = TensorSource(task.images[:n_images], task.labels[:n_images], task.class_names, name="label set A")
    sets = {"A (calibrated)": (task.images[n_images:], task.labels[n_images:], task.text_features)}
    for j, k in enumerate(other_classes):
        other = builtin_task(visual, n_classes=k, n_images=n_images, seed=seed + 1000 + j)
        sets[f"B{k} (unseen)"] = (other.images, other.labels, other.text_features)
    out = {}
    for gate, features in GATES.items():
        qvit, report = calibrate(visual, calib, task.text_features, scheme=scheme, exit_layers=exit_layers,
                                 batch_size=batch_size, seed=seed, gate_features=features,
                                 flops_budget=flops_budget)
        policy = qvit.exit_policy
        out[gate] = {"label_agnostic": is_label_agnostic(policy), "features": list(report.features),
                     "exit_layers": list(policy.exit_layers), "thresholds": [float(t) for t in policy.threshold],
                     "sets": {name: outcome(qvit, policy, *s, batch_size=batch_size) for name, s in sets.items()}}
    return {"gates": out, "scheme": scheme, "seed": seed, "flops_budget": flops_budget,
            "description": f"synthetic task: calibrated on {n_classes} prototype classes ({n_images} images), "
                           f"measured on {n_images} held-out images of them and on {list(other_classes)} new "
                           f"prototype classes"}


def markdown_table(result: dict) -> str:
    lines = ["| gate | label set | classes | exited early | INT8 full | INT8 + EE | agreement with full | "
             "FLOPs saved |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for gate, g in result["gates"].items():
        name = f"{gate} ({'label-agnostic' if g['label_agnostic'] else 'reads the classifier'})"
        for set_name, o in g["sets"].items():
            lines.append(f"| {name} | {set_name} | {o['classes']} | {100 * o['exited_early']:.1f}% | "
                         f"{100 * o['acc_full']:.1f}% | {100 * o['acc_ee']:.1f}% | "
                         f"{100 * o['agreement_with_full']:.1f}% | {100 * o['flops_saving']:.1f}% |")
    return "\n".join(lines)
