"""The inference core: everything a replica does except HTTP plumbing and Ray.

``InferenceCore.prepare(body)`` decodes one request; ``run_batch(items)`` runs a batch of
``(endpoint, image)`` through one ``classify`` (the early-exit executor, whose compaction pays off
under load) or ``embed`` pass and answers each item. Rows do not depend on the rest of the batch, so
a served result equals what the model gives for that image alone.
"""

from __future__ import annotations

import threading
from collections import Counter as _Tally
from dataclasses import dataclass

import torch

from .decode import build_transform, preprocess_body
from .engines import Engine

TOP_K = 5
ENDPOINTS = ("embed", "classify")


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

    @property
    def has_classifier(self) -> bool:
        return self.engine.num_classes > 0

    def prepare(self, body: bytes) -> torch.Tensor:
        return preprocess_body(body, self.transform)

    @torch.no_grad()
    def run_batch(self, items: list[tuple[str, torch.Tensor]]) -> list[ItemResult]:
        if not items:
            return []
        kinds = [kind for kind, _ in items]
        if any(k not in ENDPOINTS for k in kinds):
            raise ValueError(f"unknown endpoint in {sorted(set(kinds))}")
        if "classify" in kinds and not self.has_classifier:
            raise RuntimeError("classify requested from a model without a classifier")
        engine = self.engine
        images = torch.stack([x for _, x in items]).to(engine.device)
        want_logits = torch.tensor([k == "classify" for k in kinds])
        B = len(items)
        logits = embeddings = None
        exit_layer = torch.empty(B, dtype=torch.int64)
        if not want_logits.any():
            out = engine.embed(images)
            embeddings, exit_layer = out.embeddings.cpu(), out.exit_layer.cpu()
        elif want_logits.all() or engine.classify_gives_embedding:
            out = engine.classify(images)  # one pass answers every row
            logits, exit_layer = out.logits.cpu(), out.exit_layer.cpu()
            embeddings = None if out.embeddings is None else out.embeddings.cpu()
        else:  # mixed batch, and the classify pass does not give /embed's embedding: two passes
            cls_rows = want_logits.nonzero().squeeze(1)
            emb_rows = (~want_logits).nonzero().squeeze(1)
            c = engine.classify(images.index_select(0, cls_rows.to(images.device)))
            e = engine.embed(images.index_select(0, emb_rows.to(images.device)))
            logits = torch.zeros(B, c.logits.shape[1])
            logits[cls_rows] = c.logits.cpu().float()
            embeddings = torch.zeros(B, e.embeddings.shape[1])
            embeddings[emb_rows] = e.embeddings.cpu().float()
            exit_layer[cls_rows] = c.exit_layer.cpu()
            exit_layer[emb_rows] = e.exit_layer.cpu()

        top_p = top_i = probs = None
        if logits is not None:
            probs = torch.softmax(logits.float(), dim=-1)
            top_p, top_i = torch.topk(probs, min(TOP_K, probs.shape[1]), dim=-1)
        names = engine.class_names
        results = []
        for i, kind in enumerate(kinds):
            layer = int(exit_layer[i])
            if kind == "embed":
                results.append(ItemResult(200, {"embedding": embeddings[i].float().tolist(), "exit_layer": layer}))
            else:
                label = int(top_i[i, 0])
                results.append(ItemResult(200, {
                    "label": label,
                    "name": names[label] if names else None,
                    "score": float(top_p[i, 0]),
                    "top5": [[int(c), float(p)] for c, p in zip(top_i[i].tolist(), top_p[i].tolist())],
                    "exit_layer": layer,
                }))
        with self._lock:
            self.batch_sizes[B] += 1
            self.exit_layers.update(exit_layer.tolist())
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
        }
