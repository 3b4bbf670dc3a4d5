"""Engines: the seam between the server and a model.

:class:`QuantEngine` serves a ``QuantEarlyExitViT``, :class:`OpenClipEngine` a plain FP32 open_clip
``visual`` with an optional zero-shot classifier, so the same server code serves both (the
benchmark compares them). :class:`ClipEngine` serves a whole CLIP (a ``QuantCLIP``, or an open_clip
``CLIP``): the engine of its image tower plus its text tower, for per-request labels and ``/embed_text``.
``load_engine`` builds the one a replica serves from a model directory, a model, an engine, or a
callable returning one of those.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lra_kernels import ExitPolicy, QuantEarlyExitViT

try:  # the whole CLIP (INT8 image and text towers)
    from lra_kernels.clip import QuantCLIP, is_quant_clip_dir
except ImportError:  # pragma: no cover - an lra_kernels without QuantCLIP serves image models only
    QuantCLIP = None

    def is_quant_clip_dir(path) -> bool:
        return False


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


class ClipEngine:
    """A whole CLIP behind the deployment: the image engine of ``clip.visual`` (a :class:`QuantEngine` for a
    ``QuantEarlyExitViT``, else an :class:`OpenClipEngine`) and the text tower (``clip.encode_text``).

    ``clip``: a ``QuantCLIP`` or an open_clip ``CLIP`` (anything with ``visual``, ``encode_text`` and a log
    ``logit_scale``). The stored classifier is the visual tower's (``QuantEarlyExitViT.set_classifier``), or
    ``text_features`` for an FP32 tower. ``text_features(names, templates)`` gives the zero-shot rows of
    per-request labels, through ``clip.zero_shot_classifier`` where the model has one.
    """

    has_text = True

    def __init__(self, clip: nn.Module, tokenizer: Callable | None = None, text_features: torch.Tensor | None = None,
                 class_names: list[str] | None = None):
        for attr in ("visual", "encode_text", "logit_scale"):
            if not hasattr(clip, attr):
                raise TypeError(f"ClipEngine wraps a CLIP with .visual, .encode_text and .logit_scale; "
                                f"a {type(clip).__name__} lacks .{attr}")
        self.clip = clip.eval().requires_grad_(False)
        if isinstance(clip.visual, QuantEarlyExitViT):
            if text_features is not None:
                clip.visual.set_classifier(text_features, self.text_logit_scale, class_names)
            self.image: Engine = QuantEngine(clip.visual)
        else:
            self.image = OpenClipEngine(clip.visual, text_features, self.text_logit_scale, class_names)
        self.tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(clip)

    # the image side, as the image engine
    image_size = property(lambda self: self.image.image_size)
    preprocess_cfg = property(lambda self: self.image.preprocess_cfg)
    class_names = property(lambda self: self.image.class_names)
    num_classes = property(lambda self: self.image.num_classes)
    depth = property(lambda self: self.image.depth)
    device = property(lambda self: self.image.device)
    classify_gives_embedding = property(lambda self: self.image.classify_gives_embedding)

    def embed(self, images: torch.Tensor) -> EngineOutput:
        return self.image.embed(images)

    def classify(self, images: torch.Tensor) -> EngineOutput:
        return self.image.classify(images)

    @property
    def exit_policy(self) -> ExitPolicy:
        return self.image.model.exit_policy if isinstance(self.image, QuantEngine) else ExitPolicy.disabled()

    @torch.no_grad()
    def embed_full(self, images: torch.Tensor) -> EngineOutput:
        """Full-depth embeddings (the model's own head; their direction is what zero-shot scoring reads)."""
        if isinstance(self.image, QuantEngine) and self.image.model.early_exit_active:
            res = self.image.model.classify(images, policy=ExitPolicy.disabled())
            return EngineOutput(None, res.embeddings, res.exit_layer)
        return self.image.embed(images)

    @property
    def stored_classifier(self) -> torch.Tensor | None:
        if isinstance(self.image, QuantEngine):
            return self.image.model.classifier
        return self.image.text_features

    @property
    def stored_logit_scale(self) -> float:
        return float(self.image.model.logit_scale if isinstance(self.image, QuantEngine) else self.image.logit_scale)

    # the text side
    @property
    def text_logit_scale(self) -> float:
        return float(torch.as_tensor(self.clip.logit_scale).detach().float().exp().reshape(-1)[0])

    @property
    def context_length(self) -> int:
        return int(getattr(self.clip, "context_length", None) or getattr(self.tokenizer, "context_length", 77))

    @property
    def text_dim(self) -> int:
        return int(getattr(self.clip, "output_dim", None) or self.clip.text_projection.shape[-1])

    @torch.no_grad()
    def text_features(self, names: list[str], templates=("{}",)) -> torch.Tensor:
        """``[len(names), D]`` L2-normalised zero-shot rows: per name, the mean of its normalised prompt
        embeddings (``template`` with ``{}`` replaced by the name), normalised."""
        names, templates = list(names), tuple(templates)
        if hasattr(self.clip, "zero_shot_classifier"):
            rows = self.clip.zero_shot_classifier(names, templates, tokenizer=self.tokenizer)
            return rows.detach().float()
        prompts = [t.replace("{}", name) for name in names for t in templates]
        tokens = self.tokenizer(prompts).to(self.device)
        feats = torch.cat([self.clip.encode_text(chunk).float() for chunk in tokens.split(256)]) if prompts else \
            torch.zeros(0, self.text_dim, device=self.device)
        feats = F.normalize(feats, dim=-1).view(len(names), len(templates), -1).mean(1)
        return F.normalize(feats, dim=-1)

    def describe(self) -> dict:
        return {**self.image.describe(), "model": f"{type(self.clip).__name__} ({self.image.describe()['model']})",
                "text_tower": True, "context_length": self.context_length}

    def to(self, device) -> "ClipEngine":
        self.clip = self.clip.to(device)
        self.image = self.image.to(device)
        return self


def _tokenizer_of(clip):
    """The model's recorded tokenizer (``QuantCLIP.get_tokenizer``), else open_clip's default BPE tokenizer."""
    if hasattr(clip, "get_tokenizer"):
        try:
            return clip.get_tokenizer()
        except ValueError:  # no tokenizer name recorded with the model
            pass
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=int(getattr(clip, "context_length", 77) or 77))


Engine = Union[QuantEngine, OpenClipEngine, ClipEngine]
# What a deployment serves: a saved model directory, an engine, a QuantEarlyExitViT, or a
# no-argument callable returning one of those (built inside the replica).
ModelSource = Union[str, Path, Engine, nn.Module, Callable[[], Any]]


def as_engine(obj) -> Engine:
    if isinstance(obj, (QuantEngine, OpenClipEngine, ClipEngine)):
        return obj
    if isinstance(obj, QuantEarlyExitViT):
        return QuantEngine(obj)
    if isinstance(obj, nn.Module) and all(hasattr(obj, a) for a in ("visual", "encode_text", "logit_scale")):
        return ClipEngine(obj)  # a QuantCLIP or an open_clip CLIP
    raise TypeError(
        f"cannot serve a {type(obj).__name__}: expected a model directory, a QuantEarlyExitViT, a QuantCLIP, "
        "an open_clip CLIP, a QuantEngine/OpenClipEngine/ClipEngine, or a callable returning one"
    )


def load_engine(source: ModelSource, device: str = "cpu", compile_blocks: bool | None = None) -> Engine:
    """Build the engine a replica serves from ``source``, on ``device``."""
    if isinstance(source, (str, Path)):
        obj = QuantCLIP.load(source, device=device) if is_quant_clip_dir(source) else \
            QuantEarlyExitViT.load(source, device=device)
    elif isinstance(source, (QuantEngine, OpenClipEngine, ClipEngine, nn.Module)):
        obj = source
    elif callable(source):
        obj = source()
    else:
        obj = source
    engine = as_engine(obj).to(device)
    image = engine.image if isinstance(engine, ClipEngine) else engine
    if compile_blocks is not None and isinstance(image, QuantEngine):
        image.model.compile_blocks = compile_blocks
    return engine
