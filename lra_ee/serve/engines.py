"""Engines: the seam between the server and a model.

:class:`QuantEngine` serves a ``QuantEarlyExitViT``, :class:`OpenClipEngine` a plain FP32 open_clip
``visual`` with an optional zero-shot classifier, so the same server code serves both (the
benchmark compares them). ``load_engine`` builds the one a replica serves from a model directory,
a model, an engine, or a callable returning one of those.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lra_kernels import QuantEarlyExitViT


@dataclass
class EngineOutput:
    """One batch through an engine: rows in input order.

    logits[B, C] (None from ``embed``); embeddings[B, E]: what ``/embed`` answers, or None when a
    ``classify`` pass does not yield it; exit_layer[B] int64 (blocks run; depth = full network).
    """

    logits: torch.Tensor | None
    embeddings: torch.Tensor | None
    exit_layer: torch.Tensor


class QuantEngine:
    """``QuantEarlyExitViT`` behind the deployment.

    ``/embed`` answers ``model(images)``: with an exit policy and a classifier, the normalised
    embedding at the layer the sample left; otherwise the full-depth (unnormalised) embedding.
    ``/classify`` answers ``model.classify(images)``.
    """

    def __init__(self, model):
        if not isinstance(model, QuantEarlyExitViT):
            raise TypeError(f"QuantEngine wraps a QuantEarlyExitViT, got {type(model).__name__}")
        self.model = model.eval()

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.model.image_size)

    @property
    def preprocess_cfg(self) -> dict:
        return dict(self.model.preprocess_cfg)

    @property
    def class_names(self) -> list[str] | None:
        return self.model.class_names

    @property
    def num_classes(self) -> int:
        return 0 if self.model.classifier is None else int(self.model.classifier.shape[0])

    @property
    def depth(self) -> int:
        return self.model.depth

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def classify_gives_embedding(self) -> bool:
        return self.model.early_exit_active

    def describe(self) -> dict:
        policy = self.model.exit_policy
        return {
            "model": "QuantEarlyExitViT",
            "act_quant": self.model.quant_config.act_quant,
            "early_exit": self.model.early_exit_active,
            "exit_layers": list(policy.exit_layers) if self.model.early_exit_active else [],
        }

    def to(self, device) -> "QuantEngine":
        self.model = self.model.to(device)
        return self

    def embed(self, images: torch.Tensor) -> EngineOutput:
        if self.model.early_exit_active:
            res = self.model.classify(images)
            return EngineOutput(res.logits, res.embeddings, res.exit_layer)
        emb = self.model(images)
        if isinstance(emb, tuple):  # a tower built with output_tokens
            emb = emb[0]
        return EngineOutput(None, emb, torch.full((images.shape[0],), self.depth, dtype=torch.int64))

    def classify(self, images: torch.Tensor) -> EngineOutput:
        res = self.model.classify(images)
        emb = res.embeddings if self.model.early_exit_active else None
        return EngineOutput(res.logits, emb, res.exit_layer)


class OpenClipEngine:
    """A plain open_clip vision tower (``clip.visual``, FP32) with an optional zero-shot classifier.

    ``visual`` may be the module or a no-argument callable building it (so a Ray replica builds
    it itself instead of receiving pickled weights). ``/embed`` answers ``visual(images)``;
    ``/classify`` the cosine logits ``logit_scale * normalize(visual(images)) @ text_features.T``.
    """

    def __init__(
        self,
        visual: nn.Module | Callable[[], nn.Module],
        text_features: torch.Tensor | None = None,
        logit_scale: float = 100.0,
        class_names: list[str] | None = None,
        preprocess_cfg: dict | None = None,
    ):
        if not isinstance(visual, nn.Module):
            visual = visual()
        self.visual = visual.eval().requires_grad_(False)
        if text_features is not None:
            if text_features.ndim != 2:
                raise ValueError(f"text_features must be [C, E], got {tuple(text_features.shape)}")
            if class_names is not None and len(class_names) != text_features.shape[0]:
                raise ValueError(f"{len(class_names)} class names for {text_features.shape[0]} classes")
            text_features = F.normalize(text_features.detach().float(), dim=-1)
        self.text_features = text_features
        self.logit_scale = float(logit_scale)
        self._class_names = list(class_names) if class_names is not None else None
        cfg = dict(preprocess_cfg or getattr(visual, "preprocess_cfg", None) or {})
        for key in ("mean", "std"):
            if key not in cfg and getattr(visual, f"image_{key}", None):
                cfg[key] = tuple(getattr(visual, f"image_{key}"))
        self._preprocess_cfg = cfg

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def preprocess_cfg(self) -> dict:
        return dict(self._preprocess_cfg)

    @property
    def class_names(self) -> list[str] | None:
        return self._class_names

    @property
    def num_classes(self) -> int:
        return 0 if self.text_features is None else int(self.text_features.shape[0])

    @property
    def depth(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def device(self) -> torch.device:
        return next(self.visual.parameters()).device

    classify_gives_embedding = True

    def describe(self) -> dict:
        return {"model": f"open_clip {type(self.visual).__name__} (fp32)", "early_exit": False, "exit_layers": []}

    def to(self, device) -> "OpenClipEngine":
        self.visual = self.visual.to(device)
        if self.text_features is not None:
            self.text_features = self.text_features.to(device)
        return self

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> EngineOutput:
        emb = self.visual(images)
        if isinstance(emb, tuple):
            emb = emb[0]
        return EngineOutput(None, emb, torch.full((images.shape[0],), self.depth, dtype=torch.int64))

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> EngineOutput:
        if self.text_features is None:
            raise RuntimeError("no classifier: build the OpenClipEngine with text_features")
        out = self.embed(images)
        z = F.normalize(out.embeddings.float(), dim=-1)
        out.logits = self.logit_scale * (z @ self.text_features.t())
        return out


Engine = Union[QuantEngine, OpenClipEngine]
# What a deployment serves: a saved model directory, an engine, a QuantEarlyExitViT, or a
# no-argument callable returning one of those (built inside the replica).
ModelSource = Union[str, Path, Engine, nn.Module, Callable[[], Any]]


def as_engine(obj) -> Engine:
    if isinstance(obj, (QuantEngine, OpenClipEngine)):
        return obj
    if isinstance(obj, QuantEarlyExitViT):
        return QuantEngine(obj)
    raise TypeError(
        f"cannot serve a {type(obj).__name__}: expected a model directory, a QuantEarlyExitViT, "
        "a QuantEngine/OpenClipEngine, or a callable returning one"
    )


def load_engine(source: ModelSource, device: str = "cpu", compile_blocks: bool | None = None) -> Engine:
    """Build the engine a replica serves from ``source``, on ``device``."""
    if isinstance(source, (str, Path)):
        obj = QuantEarlyExitViT.load(source, device=device)
    elif isinstance(source, (QuantEngine, OpenClipEngine, nn.Module)):
        obj = source
    elif callable(source):
        obj = source()
    else:
        obj = source
    engine = as_engine(obj).to(device)
    if compile_blocks is not None and isinstance(engine, QuantEngine):
        engine.model.compile_blocks = compile_blocks
    return engine
