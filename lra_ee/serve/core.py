"""The inference core: everything a replica does except HTTP plumbing and Ray.

``InferenceCore.prepare(body)`` decodes one request; ``run_batch(items)`` runs a batch of
``(endpoint, image)`` or ``(endpoint, image, LabelSet)`` through as few passes as it can (one
``classify`` pass: the early-exit executor, whose compaction pays off under load) and answers each
item; an item with its own labels is scored against them (``lra_ee.serve.labels``). Rows do not
depend on the rest of the batch, so a served result equals what the model gives for that image alone.
"""

from __future__ import annotations

import threading
from collections import Counter as _Tally
from dataclasses import dataclass

import torch

from .decode import build_transform, preprocess_body
from .engines import Engine, EngineOutput
from .labels import LabelBank, early_exit_active, label_route, text_capable

TOP_K = 5
ENDPOINTS = ("embed", "classify")


def classify_answer(logits: torch.Tensor, names: list[str] | None, exit_layer: int) -> dict:
    """The ``/classify`` answer for one row of logits ``[C]``."""
    probs = torch.softmax(logits.float().cpu(), dim=-1)
    top_p, top_i = torch.topk(probs, min(TOP_K, probs.shape[0]))
    label = int(top_i[0])
    return {
        "label": label,
        "name": names[label] if names else None,
        "score": float(top_p[0]),
        "top5": [[int(c), float(p)] for c, p in zip(top_i.tolist(), top_p.tolist())],
        "exit_layer": exit_layer,
    }


def plan_passes(engine, routes: list[str]) -> list[tuple]:
    """The model passes that answer a batch, as ``[(engine method, rows), ...]`` covering every row once.

    routes[i]: ``"embed"`` / ``"classify"`` (raw bodies, the stored classifier), ``"label_exit"`` (own
    labels, the policy applies) or ``"label_full"`` (own labels, full depth). One ``classify`` pass takes
    every row it can answer (its embeddings, when it gives them, are /embed's and the exit embeddings);
    ``embed`` the rest, with the full-depth label rows when the model does not exit early; ``embed_full``
    the full-depth label rows of an early-exit model.
    """
    exits = early_exit_active(engine)
    gives = engine.classify_gives_embedding
    taken = set()
    passes = []
    cls = [i for i, r in enumerate(routes) if r in ("classify", "label_exit")]
    if cls:
        cls += [i for i, r in enumerate(routes) if gives and (r == "embed" or (r == "label_full" and not exits))]
        passes.append((engine.classify, sorted(cls)))
        taken.update(cls)
    emb = [i for i, r in enumerate(routes) if i not in taken and (r == "embed" or (r == "label_full" and not exits))]
    if emb:
        passes.append((engine.embed, emb))
        taken.update(emb)
    full = [i for i, r in enumerate(routes) if i not in taken]
    if full:
        passes.append((engine.embed_full, full))
    return passes


def _on_cpu(out: EngineOutput) -> EngineOutput:
    return EngineOutput(*(None if t is None else t.cpu() for t in (out.logits, out.embeddings, out.exit_layer)))


@dataclass
class ItemResult:
    """One request's answer: an HTTP status and a JSON body."""

    status: int
    body: dict


class InferenceCore:
    """Everything a replica does except HTTP plumbing and Ray: preprocess one body, run a batch.

    ``run_batch(items)`` takes ``[(endpoint, image[3, H, W]), ...]`` and returns one
    :class:`ItemResult` per item, in order. A model failure fails that batch's items with 500,
    never another batch.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.transform = build_transform(engine.preprocess_cfg, engine.image_size)
        self.batch_sizes: _Tally[int] = _Tally()
        self.exit_layers: _Tally[int] = _Tally()
        self._lock = threading.Lock()
        self.labels = LabelBank(engine) if text_capable(engine) else None  # per-request label sets

    @property
    def has_classifier(self) -> bool:
        return self.engine.num_classes > 0

    def prepare(self, body: bytes) -> torch.Tensor:
        return preprocess_body(body, self.transform)

    @torch.no_grad()
    def run_batch(self, items: list[tuple]) -> list[ItemResult]:
        if not items:
            return []
        kinds = [item[0] for item in items]
        if any(k not in ENDPOINTS for k in kinds):
            raise ValueError(f"unknown endpoint in {sorted(set(kinds))}")
        label_sets = [item[2] if len(item) > 2 else None for item in items]
        if any(k == "classify" and ls is None for k, ls in zip(kinds, label_sets)) and not self.has_classifier:
            raise RuntimeError("classify requested from a model without a classifier")
        if any(ls is not None for ls in label_sets) and self.labels is None:
            raise RuntimeError("per-request labels sent to a model without a text tower")
        engine = self.engine
        images = torch.stack([item[1] for item in items]).to(engine.device)
        routes = [k if ls is None else "label_" + label_route(engine, ls) for k, ls in zip(kinds, label_sets)]
        B = len(items)
        where: list[tuple[EngineOutput, int] | None] = [None] * B
        for fn, rows in plan_passes(engine, routes):
            x = images if len(rows) == B else images.index_select(0, torch.tensor(rows, device=images.device))
            out = _on_cpu(fn(x))  # one copy per pass, not one per row
            for k, i in enumerate(rows):
                where[i] = (out, k)
        results, layers = [], []
        names = engine.class_names
        for i, route in enumerate(routes):
            out, k = where[i]
            layer = int(out.exit_layer[k])
            layers.append(layer)
            if route == "embed":
                results.append(ItemResult(200, {"embedding": out.embeddings[k].float().tolist(), "exit_layer": layer}))
            elif route == "classify":
                results.append(ItemResult(200, classify_answer(out.logits[k], names, layer)))
            else:
                ls = label_sets[i]
                if route == "label_exit" and ls.stored:  # the stored classifier's own logits
                    logits = out.logits[k]
                else:
                    logits = ls.logits(out.embeddings[k : k + 1])[0]
                results.append(ItemResult(200, classify_answer(logits, list(ls.names), layer)))
        with self._lock:
            self.batch_sizes[B] += 1
            self.exit_layers.update(layers)
        return results

    def stats(self) -> dict:
        with self._lock:
            sizes = dict(sorted(self.batch_sizes.items()))
            layers = dict(sorted(self.exit_layers.items()))
        batches = sum(sizes.values())
        items = sum(k * v for k, v in sizes.items())
        return {
            "batches": batches,
            "images": items,
            "mean_batch_size": items / batches if batches else None,
            "max_batch_size_seen": max(sizes) if sizes else 0,
            "batch_sizes": {str(k): v for k, v in sizes.items()},
            "exit_layers": {str(k): v for k, v in layers.items()},
            **({"label_cache": self.labels.stats()} if self.labels is not None else {}),
        }
