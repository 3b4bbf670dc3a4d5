"""Exit tables: every candidate exit evaluated on every image, once; early exit simulated from them.

Running the INT8 tower once per image set and keeping, per exit layer, the top-5 predictions and
the gate features lets calibration, threshold sweeps and ablations re-decide exits without
re-running the network. A sample's early-exit result *is* its exit head's result at the layer
it leaves when rows do not depend on the batch (tests/test_executor.py checks that equality bit
for bit); the experiment re-checks it on the whole evaluation split against the real executor
(``lra_ee.measure``), whose results are the ones reported.

``collect_fp32_table`` builds the same table for the FP32 open_clip tower (pure-torch exit head
and gate features on its hidden states): the FP32 early-exit control.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lra_kernels.kernels.exit_head import exit_head_ref
from lra_kernels.kernels.gate_features import gate_features_ref
from lra_kernels.names import HEADS, N_FEATURES
from lra_kernels.policy import check_exit_layers

from .qirc import fp32_hidden_states


@dataclass
class ExitTable:
    """Predictions and gate features of one image set.

    layers: candidate exit layers, then ``depth``. top5[len(layers), N, k] (k = min(5, C)),
    features[len(layers) - 1, N, N_FEATURES], labels[N] (-1: unlabelled), fp32_top5[N, k] (the FP32
    tower's predictions, or None), index[N] (positions in the source), depth_patch_top5[N, k]
    (the patch-mean exit head applied after the last block, or None: the head confound).
    """

    layers: tuple[int, ...]
    head: str
    top5: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    fp32_top5: np.ndarray | None
    index: np.ndarray
    n_skipped: int = 0
    depth_patch_top5: np.ndarray | None = None

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
                       fp32_top5=None if self.fp32_top5 is None else self.fp32_top5[rows], index=self.index[rows],
                       depth_patch_top5=None if self.depth_patch_top5 is None else self.depth_patch_top5[rows])

    def rows_of(self, index: np.ndarray) -> np.ndarray:
        """Rows holding the source positions ``index`` (ValueError naming any that are missing)."""
        pos = {int(i): r for r, i in enumerate(self.index)}
        missing = [int(i) for i in index if int(i) not in pos]
        if missing:
            raise ValueError(f"source positions {missing[:5]} are not in this table (unreadable, or another source)")
        return np.array([pos[int(i)] for i in index], dtype=np.int64)

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
    k = min(5, qvit.require_classifier().shape[0])
    layers = check_exit_layers(layers, qvit.depth)
    ops = qvit.ops()
    out = {h: {"top5": [], "features": []} for h in heads}
    final, depth_patch, labels, index, fp32 = [], [], [], [], []
    for images, lab, idx in tqdm(source.batches(batch_size), total=-(-len(source) // batch_size), desc=desc,
                                 disable=desc is None, leave=False):
        states = qvit.hidden_states(images.to(qvit.device))
        for h in heads:
            t5, fe = [], []
            for layer in layers:
                logits, _ = qvit.exit_head(states[layer], h, ops)
                t5.append(_topk(logits, k))
                fe.append(qvit.gate_features(logits, states[layer], ops).cpu().numpy())
            out[h]["top5"].append(np.stack(t5) if t5 else np.zeros((0, images.shape[0], k), np.int64))
            out[h]["features"].append(np.stack(fe) if fe else np.zeros((0, images.shape[0], N_FEATURES), np.float32))
        logits, _ = qvit.final_head(states[-1], ops)
        final.append(_topk(logits, k))
        logits, _ = qvit.exit_head(states[-1], "patch_mean", ops)
        depth_patch.append(_topk(logits, k))
        labels.append(lab.numpy())
        index.append(idx.numpy())
        if fp32_visual is not None:
            dev = next(fp32_visual.parameters()).device
            z = F.normalize(fp32_visual(images.to(dev)).float(), dim=-1)
            fp32.append(_topk(z @ qvit.classifier.to(dev).t(), k))
    final_arr = np.concatenate(final)[None]
    tables = {}
    for h in heads:
        top5 = np.concatenate([np.concatenate(out[h]["top5"], axis=1), final_arr], axis=0)
        tables[h] = ExitTable(layers + (qvit.depth,), h, top5, np.concatenate(out[h]["features"], axis=1),
                              np.concatenate(labels), np.concatenate(fp32) if fp32 else None, np.concatenate(index),
                              getattr(source, "n_skipped", 0), np.concatenate(depth_patch))
    return tables


@torch.no_grad()
def collect_fp32_table(visual, source, text: torch.Tensor, layers: tuple[int, ...], logit_scale: float = 100.0,
                       batch_size: int = 32, desc: str | None = None) -> ExitTable:
    """The exit table of the FP32 open_clip tower: the patch-mean exit head (``exit_head_ref``) and
    the gate features (``gate_features_ref``) on its tokens after each of ``layers``, its own
    head's predictions (``top5[-1]``, also ``fp32_top5``) and the patch-mean head at full depth."""
    dev = next(visual.parameters()).device
    text = text.to(dev).float()
    k = min(5, text.shape[0])
    depth = len(visual.transformer.resblocks)
    layers = check_exit_layers(layers, depth)
    ln, proj = visual.ln_post, visual.proj
    head = dict(ln_weight=ln.weight.float(), ln_bias=ln.bias.float(), eps=ln.eps,
                proj=None if proj is None else proj.float(), text=text, logit_scale=logit_scale)
    top5, feats, final, depth_patch, labels, index = [], [], [], [], [], []
    for images, lab, idx in tqdm(source.batches(batch_size), total=-(-len(source) // batch_size), desc=desc,
                                 disable=desc is None, leave=False):
        states, out = fp32_hidden_states(visual, images.to(dev), return_output=True)
        t5, fe = [], []
        for layer in layers:
            logits, _ = exit_head_ref(states[layer], pool="patch_mean", **head)
            t5.append(_topk(logits, k))
            fe.append(gate_features_ref(logits, states[layer]).cpu().numpy())
        top5.append(np.stack(t5) if t5 else np.zeros((0, images.shape[0], k), np.int64))
        feats.append(np.stack(fe) if fe else np.zeros((0, images.shape[0], N_FEATURES), np.float32))
        z = F.normalize((out[0] if isinstance(out, tuple) else out).float(), dim=-1)
        final.append(_topk(logit_scale * z @ text.t(), k))
        depth_patch.append(_topk(exit_head_ref(states[-1], pool="patch_mean", **head)[0], k))
        labels.append(lab.numpy())
        index.append(idx.numpy())
    final_arr = np.concatenate(final)
    return ExitTable(layers + (depth,), "patch_mean", np.concatenate([np.concatenate(top5, axis=1), final_arr[None]]),
                     np.concatenate(feats, axis=1), np.concatenate(labels), final_arr.copy(), np.concatenate(index),
                     getattr(source, "n_skipped", 0), np.concatenate(depth_patch))


@torch.no_grad()
def fp32_predictions(visual, source, text: torch.Tensor, batch_size: int = 32,
                     desc: str | None = None) -> dict[int, np.ndarray]:
    """Top-5 of the FP32 tower for every readable image of ``source``, keyed by source position."""
    k = min(5, text.shape[0])
    dev = next(visual.parameters()).device
    out = {}
    for images, _, idx in tqdm(source.batches(batch_size), total=-(-len(source) // batch_size), desc=desc,
                               disable=desc is None, leave=False):
        z = F.normalize(visual(images.to(dev)).float(), dim=-1)
        top = (z @ text.to(dev).t()).topk(k, dim=-1).indices.cpu().numpy()
        out.update({int(i): t for i, t in zip(idx, top)})
    return out


def attach_fp32(table: ExitTable, fp32: dict[int, np.ndarray]) -> ExitTable:
    """Set ``table.fp32_top5`` from ``fp32_predictions`` (every row's position must be there)."""
    table.fp32_top5 = np.stack([fp32[int(i)] for i in table.index])
    return table


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
