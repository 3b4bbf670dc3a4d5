"""Per-request label sets: cached text embeddings and the rule that decides where their images may exit.

A ``/classify`` request may bring its own labels (and prompt templates). Their text embeddings come
from the model's text tower (``engine.text_features``), one row per ``(label, templates)``, kept in a
bounded LRU (:class:`LabelBank`) so repeated label sets cost no text-tower pass. A :class:`LabelSet`
is what a batch item carries: names, the ``[C, D]`` L2-normalised rows, the logit scale, and whether
it is the model's stored classifier.

Where such an image may leave (:func:`label_route`): the exit policy was calibrated on the stored
classifier; its gate reads the confidence and margin of the exit head's softmax over *that*
classifier. So a request whose labels differ from the stored classifier runs at full depth, unless
the policy says it was calibrated label-agnostically (``lra_ee.gate.is_label_agnostic``: the meta
flag, and zero gate weight on every classifier-dependent feature). docs/serving.md has the rule and
what early exit does with unseen label sets.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..gate import is_label_agnostic

MAX_CACHED_LABELS = 16_384  # text-embedding rows kept (one per label and template set)
DEFAULT_TEMPLATES = ("{}",)
MATCH_ATOL = 1e-5  # a request's rows within this of the stored classifier's are the stored classifier


@dataclass(frozen=True, eq=False)
class LabelSet:
    """Labels of one request: ``features[C, D]`` (L2-normalised rows, on the CPU, where answers are scored), their
    logit scale, and ``stored``: True when they are the model's stored classifier (same rows, same scale)."""

    names: tuple[str, ...]
    templates: tuple[str, ...]
    features: torch.Tensor
    logit_scale: float
    stored: bool

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine logits ``logit_scale * normalize(embeddings) @ features.T`` (fp32, ``[B, C]``)."""
        z = F.normalize(embeddings.float(), dim=-1)
        return self.logit_scale * (z @ self.features.to(z.device).t())  # no copy on the CPU


def text_capable(engine) -> bool:
    """Whether ``engine`` has a text tower (answers per-request labels and ``/embed_text``)."""
    return bool(getattr(engine, "has_text", False))


def early_exit_active(engine) -> bool:
    return bool(engine.describe().get("early_exit"))


def label_route(engine, labels: LabelSet) -> str:
    """``"exit"``: the image may leave early under the model's policy (its stored classifier, or a policy
    calibrated label-agnostically); ``"full"``: it runs the whole network."""
    if not early_exit_active(engine):
        return "full"
    if labels.stored or is_label_agnostic(engine.exit_policy):
        return "exit"
    return "full"


def per_request_labels(engine) -> str | None:
    """What ``/healthz`` says about per-request labels: None (no text tower), ``"early_exit"`` or ``"full_depth"``."""
    if not text_capable(engine):
        return None
    if early_exit_active(engine) and is_label_agnostic(engine.exit_policy):
        return "early_exit"
    return "full_depth"


class LabelBank:
    """A bounded LRU of text-embedding rows keyed by ``(label, templates)``, filled by ``engine.text_features``.

    ``get(names, templates)`` assembles a :class:`LabelSet`, running the text tower only for the rows not
    cached (in one call). Thread-safe; the text tower runs outside the lock.
    """

    def __init__(self, engine, max_entries: int = MAX_CACHED_LABELS):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.engine = engine
        self.max_entries = int(max_entries)
        self._rows: OrderedDict[tuple[str, tuple[str, ...]], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, names, templates=DEFAULT_TEMPLATES) -> torch.Tensor:
        """``[len(names), D]`` L2-normalised text embeddings of ``names`` under ``templates``."""
        names, templates = tuple(names), tuple(templates)
        found: dict[str, torch.Tensor] = {}
        with self._lock:
            for name in names:
                row = self._rows.get((name, templates))
                if row is not None:
                    self._rows.move_to_end((name, templates))
                    found[name] = row
            missing = list(dict.fromkeys(n for n in names if n not in found))
            self.hits += len(names) - sum(n not in found for n in names)
            self.misses += len(missing)
        if missing:
            new = self.engine.text_features(missing, templates).detach().float().cpu()
            if new.shape[0] != len(missing):
                raise RuntimeError(f"the text tower gave {new.shape[0]} rows for {len(missing)} labels")
            with self._lock:
                for name, row in zip(missing, new):
                    found[name] = row
                    self._rows[(name, templates)] = row
                    self._rows.move_to_end((name, templates))
                while len(self._rows) > self.max_entries:
                    self._rows.popitem(last=False)
        return torch.stack([found[n] for n in names]) if names else torch.zeros(0, self.engine.text_dim)

    def get(self, names, templates=DEFAULT_TEMPLATES) -> LabelSet:
        names, templates = tuple(names), tuple(templates)
        features = self.rows(names, templates)
        scale = float(self.engine.text_logit_scale)
        return LabelSet(names, templates, features, scale, self._is_stored(features, scale))

    def _is_stored(self, features: torch.Tensor, scale: float) -> bool:
        stored = self.engine.stored_classifier
        if stored is None or tuple(stored.shape) != tuple(features.shape):
            return False
        if abs(float(self.engine.stored_logit_scale) - scale) > 1e-4 * max(1.0, abs(scale)):
            return False
        return bool(torch.allclose(stored.float().cpu(), features, atol=MATCH_ATOL, rtol=0))

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._rows), "max_entries": self.max_entries, "hits": self.hits,
                    "misses": self.misses}
