"""Exit tables: every candidate exit evaluated on every image, once; early exit simulated from them.

Running the INT8 tower once per image set and keeping, per exit layer, the top-5 predictions and
the gate features lets calibration, threshold sweeps and ablations re-decide exits without
re-running the network. A sample's early-exit result *is* its exit head's result at the layer
it leaves (tests/test_executor.py checks that equality bit for bit), and
``verify_with_executor`` checks it again on real data with the real executor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lra_kernels.executor import exit_head as _exit_head, final_head

HEADS = ("patch_mean", "cls")


@dataclass
class ExitTable:
    """Predictions and gate features of one image set.

    layers: candidate exit layers, then ``depth``. top5[len(layers), N, k] (k = min(5, C)),
    features[len(layers) - 1, N, 3], labels[N] (-1: unlabelled), fp32_top5[N, k] (the FP32
    tower's predictions, or None), index[N] (positions in the source).
    """

    layers: tuple[int, ...]
    head: str
    top5: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    fp32_top5: np.ndarray | None
    index: np.ndarray
    n_skipped: int = 0

    @property
    def n(self) -> int:
        return self.labels.shape[0]

    @property
    def depth(self) -> int:
        return self.layers[-1]

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return self.layers[:-1]

    def target(self, kind: str) -> np.ndarray:
        """Per-sample target class: ``"labels"`` or ``"fp32"`` (the FP32 full-depth prediction)."""
        if kind == "labels":
            if (self.labels < 0).any():
                raise ValueError("these images have no labels; use the FP32 prediction as target")
            return self.labels
        if kind == "fp32":
            if self.fp32_top5 is None:
                raise ValueError("no FP32 predictions were collected")
            return self.fp32_top5[:, 0]
        raise ValueError(f"target must be 'labels' or 'fp32', got {kind!r}")

    def correct(self, target: np.ndarray) -> np.ndarray:
        """``[len(layers), N]``: is each exit's (and the full depth's) top-1 right."""
        return self.top5[:, :, 0] == target[None, :]

    def subset(self, rows: np.ndarray) -> "ExitTable":
        rows = np.asarray(rows)
        return replace(self, top5=self.top5[:, rows], features=self.features[:, rows], labels=self.labels[rows],
                       fp32_top5=None if self.fp32_top5 is None else self.fp32_top5[rows], index=self.index[rows])

    def restrict(self, exit_layers: tuple[int, ...]) -> "ExitTable":
        """Keep only some exit layers (and the full depth)."""
        pos = {layer: i for i, layer in enumerate(self.layers)}
        missing = [layer for layer in exit_layers if layer not in pos]
        if missing:
            raise ValueError(f"exit layers {missing} were not collected (have {self.exit_layers})")
        keep = [pos[layer] for layer in exit_layers]
        return replace(self, layers=tuple(exit_layers) + (self.depth,), top5=self.top5[keep + [len(self.layers) - 1]],
                       features=self.features[keep])


def _topk(logits: torch.Tensor, k: int) -> np.ndarray:
    return logits.topk(k, dim=-1).indices.cpu().numpy()


@torch.no_grad()
def collect_tables(qvit, source, layers: tuple[int, ...], heads: tuple[str, ...] = HEADS, fp32_visual=None,
                   batch_size: int = 32, desc: str | None = None) -> dict[str, ExitTable]:
    """Run the INT8 tower (and the FP32 tower, for its predictions) over ``source`` once."""
    text = qvit._require_classifier()
    C = text.shape[0]
    k = min(5, C)
    layers = tuple(sorted(set(int(x) for x in layers)))
    if layers and (layers[0] < 1 or layers[-1] >= qvit.depth):
        raise ValueError(f"exit layers must lie in 1..{qvit.depth - 1}, got {layers}")
    ops = qvit.ops()
    out = {h: {"top5": [], "features": []} for h in heads}
    final, labels, index, fp32 = [], [], [], []
    for images, lab, idx in tqdm(source.batches(batch_size), total=-(-len(source) // batch_size), desc=desc,
                                 disable=desc is None, leave=False):
        states = qvit.hidden_states(images.to(qvit.device))
        for h in heads:
            t5, fe = [], []
            for layer in layers:
                logits, _ = _exit_head(qvit, ops, states[layer], text, qvit.logit_scale, h)
                t5.append(_topk(logits, k))
                fe.append(ops.gate_features(logits, states[layer]).cpu().numpy())
            out[h]["top5"].append(np.stack(t5) if t5 else np.zeros((0, images.shape[0], k), np.int64))
            out[h]["features"].append(np.stack(fe) if fe else np.zeros((0, images.shape[0], 3), np.float32))
        logits, _ = final_head(qvit, states[-1], text, qvit.logit_scale)
        final.append(_topk(logits, k))
        labels.append(lab.numpy())
        index.append(idx.numpy())
        if fp32_visual is not None:
            dev = next(fp32_visual.parameters()).device
            z = F.normalize(fp32_visual(images.to(dev)).float(), dim=-1)
            fp32.append(_topk(z @ text.to(dev).t(), k))
    final_arr = np.concatenate(final)[None]
    tables = {}
    for h in heads:
        top5 = np.concatenate([np.concatenate(out[h]["top5"], axis=1), final_arr], axis=0)
        tables[h] = ExitTable(layers + (qvit.depth,), h, top5, np.concatenate(out[h]["features"], axis=1),
                              np.concatenate(labels), np.concatenate(fp32) if fp32 else None, np.concatenate(index),
                              getattr(source, "n_skipped", 0))
    return tables


@dataclass
class Simulation:
    exit_layer: np.ndarray  # [N] blocks run
    top5: np.ndarray  # [N, k] predictions of the exit each sample took


def simulate(table: ExitTable, scores: np.ndarray, taus: np.ndarray) -> Simulation:
    """Exit decisions from per-exit gate scores ``[L, N]`` and thresholds ``[L]`` (NaN never exits)."""
    L, N = scores.shape
    with np.errstate(invalid="ignore"):
        leave = scores >= np.asarray(taus)[:, None]  # NaN compares False
    first = np.where(leave.any(0), leave.argmax(0), L)  # L: ran the full depth
    exit_layer = np.asarray(table.layers)[first]
    top5 = table.top5[first, np.arange(N)]
    return Simulation(exit_layer, top5)


def verify_with_executor(qvit, source, sim_exit_layer: np.ndarray, sim_top1: np.ndarray, batch_size: int = 32,
                         limit: int = 256) -> dict:
    """Run the real executor (``qvit.classify``) on up to ``limit`` images of ``source`` and compare
    with the simulated exits; ``sim_*[i]`` belong to position ``i`` of ``source``."""
    n, agree_layer, agree_pred = 0, 0, 0
    for images, _, idx in source.batches(batch_size):
        res = qvit.classify(images.to(qvit.device))
        rows = idx.numpy()
        agree_layer += int((res.exit_layer.cpu().numpy() == sim_exit_layer[rows]).sum())
        agree_pred += int((res.logits.argmax(-1).cpu().numpy() == sim_top1[rows]).sum())
        n += len(rows)
        if n >= limit:
            break
    return {"n": n, "exit_layer_agreement": agree_layer / max(n, 1), "prediction_agreement": agree_pred / max(n, 1)}
