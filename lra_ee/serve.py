"""Serve a saved ``QuantEarlyExitViT`` over HTTP on Ray Serve (``lra-ee serve``; extra ``serve``).

    POST /embed      body: a JPEG/PNG/WebP file -> {"embedding": [...], "exit_layer": int}
    POST /classify   body: a JPEG/PNG/WebP file -> {"label", "name", "score", "top5", "exit_layer"}
    GET  /healthz    -> {"status": "ok", ...model and replica batching statistics}

Each request is decoded and preprocessed on its own (open_clip's eval transform, built from the
model's saved ``preprocess_cfg``), before batching: a corrupt body gets ``400 {"error": ...}``
and never reaches the batch. Valid images are collected by ``@serve.batch`` (``max_batch_size``,
``batch_wait_timeout_s``) and, while the model is busy, everything that arrives meanwhile forms
the next batch; each batch runs through one ``classify`` (the early-exit executor, whose
compaction pays off under load) or ``forward`` call. Rows do not depend on the rest of the
batch, so a served result equals what the model gives for that image alone.

The deployment talks to the model through an *engine* (:class:`QuantEngine` for
``QuantEarlyExitViT``, :class:`OpenClipEngine` for a plain FP32 open_clip ``visual`` with an
optional zero-shot classifier), so the same code serves both (the benchmark compares them).

Ray is imported lazily: this module imports, and ``serve_main`` reports a clear error, without it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections import Counter as _Tally
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import preprocess_from_cfg

try:  # optional extra: pip install "lra-kernels[serve]"
    with warnings.catch_warnings():  # Ray's own pydantic-v1-style fields warn at import
        warnings.simplefilter("ignore", DeprecationWarning)
        from ray import serve as _ray_serve
except ImportError:  # pragma: no cover - exercised where ray is missing
    _ray_serve = None

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_PIXELS = 64_000_000  # decoded size limit (a small compressed file can expand to gigabytes)
TOP_K = 5
ENDPOINTS = ("embed", "classify")
DEPLOYMENT_NAME = "LraEEServer"
APP_NAME = "lra-ee"
INSTALL_HINT = 'pip install "lra-kernels[serve]"  (or: pip install "ray[serve]")'


class BadImage(ValueError):
    """The request body is not an image this server can read (answered with HTTP 400)."""


# ---------------------------------------------------------------------- preprocessing
build_transform = preprocess_from_cfg  # open_clip's eval transform for a saved preprocess_cfg


def _sniff_format(body: bytes) -> str | None:
    if body.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if body.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(body: bytes):
    """Decode a JPEG/PNG/WebP body into a PIL image (fully loaded); :class:`BadImage` otherwise.

    The image keeps its mode (RGBA, L, P, CMYK, I;16, ...): open_clip's transform resizes first
    and converts to RGB afterwards, and so do we.
    """
    from PIL import Image, UnidentifiedImageError

    if not body:
        raise BadImage("empty request body: send a JPEG, PNG or WebP image file as the body")
    try:
        image = Image.open(io.BytesIO(body), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        fmt = _sniff_format(body)
        if fmt:
            raise BadImage(f"corrupt or truncated {fmt} image: PIL cannot identify it") from None
        raise BadImage("the request body is not a JPEG, PNG or WebP image") from None
    except Image.DecompressionBombError as err:
        raise BadImage(f"image too large: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise BadImage(f"cannot read the image: {err}") from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise BadImage(f"image of {width} x {height} pixels is outside 1..{MAX_PIXELS} pixels")
    try:
        image.load()
    except Exception as err:  # truncated or corrupt data: PIL raises OSError/SyntaxError/ValueError/...
        raise BadImage(f"corrupt {image.format} image: {err}") from None
    return image


def preprocess_body(body: bytes, transform: Callable) -> torch.Tensor:
    """Request body -> ``[3, H, W]`` fp32 through ``transform``; :class:`BadImage` if unreadable."""
    image = decode_image(body)
    try:
        x = transform(image)
    except Exception as err:  # an image PIL opened but cannot convert/resize
        raise BadImage(f"cannot preprocess the {image.format} image (mode {image.mode}): {err}") from None
    if not torch.isfinite(x).all():
        raise BadImage("the image gives non-finite pixel values after preprocessing")
    return x


# ---------------------------------------------------------------------- engines (the model seam)
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
        from lra_kernels import QuantEarlyExitViT

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
    from lra_kernels import QuantEarlyExitViT

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
    from lra_kernels import QuantEarlyExitViT

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


# ---------------------------------------------------------------------- the Ray-free core
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


# ---------------------------------------------------------------------- the Ray Serve deployment
def _batch(**kwargs):
    """``serve.batch`` when Ray is installed (the decorator needs it at class creation)."""
    if _ray_serve is None:
        return lambda fn: fn
    return _ray_serve.batch(**kwargs)


# Batches Ray has formed that may wait for the model at once (see ImageModelServer._infer); the
# requests in them are bounded by max_ongoing_requests, not by this.
MAX_WAITING_BATCHES = 4096


def _quiet_batch_bound_warning(record) -> bool:
    # Ray warns when max_batch_size * max_concurrent_batches exceeds max_ongoing_requests; here
    # the concurrent "batches" only wait to be merged, so the bound it warns about does not apply.
    return "max_concurrent_batches" not in record.getMessage()


LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class _Metrics:
    """Our Ray Serve metrics (Ray adds deployment/replica/application tags and a ``ray_`` prefix)."""

    def __init__(self, depth: int):
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "lra_ee_requests", description="HTTP requests answered, by endpoint and status", tag_keys=("endpoint", "status")
        )
        self.latency = metrics.Histogram(
            "lra_ee_request_latency_ms", description="request latency inside the replica (decode, queue, model, reply)",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("endpoint",),
        )
        self.batch_size = metrics.Histogram(
            "lra_ee_batch_size", description="images per model call", boundaries=BATCH_BOUNDARIES
        )
        self.batch_latency = metrics.Histogram(
            "lra_ee_batch_latency_ms", description="model time per batch", boundaries=LATENCY_BOUNDARIES_MS
        )
        self.exit_layer = metrics.Histogram(
            "lra_ee_exit_layer", description="blocks run per image (depth = full network)",
            boundaries=list(range(1, depth + 1)),
        )
        self.in_flight = metrics.Gauge("lra_ee_requests_in_flight", description="requests being decoded, queued or run")


class ImageModelServer:
    """The Ray Serve deployment class (see :func:`build_app`)."""

    def __init__(
        self,
        source: ModelSource,
        max_batch_size: int = 64,
        batch_wait_ms: float = 5.0,
        device: str = "cpu",
        compile_blocks: bool | None = None,
    ):
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
        self.threads = max(1, int(cpus)) if cpus else torch.get_num_threads()
        torch.set_num_threads(self.threads)
        self.device = device
        self.core = InferenceCore(load_engine(source, device, compile_blocks))
        self.max_batch_size, self.batch_wait_ms = int(max_batch_size), float(batch_wait_ms)
        self._infer.set_max_batch_size(self.max_batch_size)
        self._infer.set_batch_wait_timeout_s(self.batch_wait_ms / 1000.0)
        # One thread runs the model (the torch thread pool is not shared between callers); the
        # event loop meanwhile keeps decoding requests on the default executor.
        self._model_thread = ThreadPoolExecutor(1, "lra-ee-model", initializer=torch.set_num_threads, initargs=(self.threads,))
        self._decode_pool = ThreadPoolExecutor(max(2, self.threads), "lra-ee-decode")
        self.metrics = _Metrics(self.core.engine.depth)
        self._in_flight = 0
        self._pending: deque[tuple[tuple[str, torch.Tensor], asyncio.Future]] = deque()
        self._runner: asyncio.Task | None = None
        logging.getLogger("ray.serve").addFilter(_quiet_batch_bound_warning)
        self._warm_up()

    def _warm_up(self) -> None:
        H, W = self.core.engine.image_size
        gen = torch.Generator().manual_seed(0)
        kind = "classify" if self.core.has_classifier else "embed"
        for n in (1, 2):
            x = torch.randn(n, 3, H, W, generator=gen)
            self._model_thread.submit(self.core.run_batch, [(kind, row) for row in x]).result()
        self.core.batch_sizes.clear()
        self.core.exit_layers.clear()

    @_batch(max_batch_size=64, batch_wait_timeout_s=0.005, max_concurrent_batches=MAX_WAITING_BATCHES)
    async def _infer(self, items: list[tuple[str, torch.Tensor]]) -> list[ItemResult]:
        # Ray forms the next batch while the model is still busy with the previous one, so under
        # load its batches are small (whatever arrived within batch_wait_ms). They all wait here
        # instead, and the model takes everything waiting (up to max_batch_size) when it is free.
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futures))
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run_pending())
        return list(await asyncio.gather(*futures))

    async def _run_pending(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            chunk = [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch_size))]
            items = [item for item, _ in chunk]
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._model_thread, self.core.run_batch, items)
            except Exception as err:  # the model failed on this batch: 500 to its requests only
                msg = f"inference failed: {type(err).__name__}: {err}"
                results = [ItemResult(500, {"error": msg}) for _ in items]
            else:
                self.metrics.batch_latency.observe((time.perf_counter() - start) * 1000.0)
                self.metrics.batch_size.observe(len(items))
                for r in results:
                    self.metrics.exit_layer.observe(r.body["exit_layer"])
            for (_, future), result in zip(chunk, results):
                if not future.done():  # a client that went away cancels its future
                    future.set_result(result)

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        start = time.perf_counter()
        path = request.url.path
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        endpoint = path.strip("/") or "/"
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        try:
            result = await self._handle(request, endpoint)
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)
        tag = endpoint if endpoint in (*ENDPOINTS, "healthz") else "other"
        self.metrics.requests.inc(tags={"endpoint": tag, "status": str(result.status)})
        self.metrics.latency.observe((time.perf_counter() - start) * 1000.0, tags={"endpoint": tag})
        return JSONResponse(result.body, status_code=result.status)

    async def _handle(self, request, endpoint: str) -> ItemResult:
        method = request.method.upper()
        if endpoint == "healthz":
            if method not in ("GET", "HEAD"):
                return ItemResult(405, {"error": "use GET /healthz"})
            return ItemResult(200, self.health())
        if endpoint not in ENDPOINTS:
            return ItemResult(404, {"error": f"no endpoint {request.url.path!r}: POST /embed, POST /classify, GET /healthz"})
        if method != "POST":
            return ItemResult(405, {"error": f"use POST /{endpoint} with an image file as the body"})
        if endpoint == "classify" and not self.core.has_classifier:
            return ItemResult(400, {"error": "this model has no classifier (set_classifier was not called before saving); use /embed"})
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return ItemResult(413, {"error": f"body of {length} bytes exceeds {MAX_BODY_BYTES} bytes"})
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return ItemResult(413, {"error": f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES} bytes"})
        loop = asyncio.get_running_loop()
        try:
            image = await loop.run_in_executor(self._decode_pool, self.core.prepare, body)
        except BadImage as err:
            return ItemResult(400, {"error": str(err)})
        return await self._infer((endpoint, image))

    def health(self) -> dict:
        engine = self.core.engine
        return {
            "status": "ok",
            **engine.describe(),
            "depth": engine.depth,
            "image_size": list(engine.image_size),
            "num_classes": engine.num_classes,
            "device": str(engine.device),
            "threads": self.threads,
            "max_batch_size": self.max_batch_size,
            "batch_wait_ms": self.batch_wait_ms,
            "replica": self.core.stats(),
        }


def _require_ray():
    if _ray_serve is None:
        raise RuntimeError(f"Ray Serve is not installed: {INSTALL_HINT}")
    import ray

    return ray, _ray_serve


def build_app(
    source: ModelSource,
    *,
    max_batch_size: int = 64,
    batch_wait_ms: float = 5.0,
    device: str = "cpu",
    replicas: int = 1,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    compile_blocks: bool | None = None,
    name: str = DEPLOYMENT_NAME,
):
    """A Ray Serve application (``serve.run(build_app(...))``) serving ``source``.

    ``source``: a model directory written by ``QuantEarlyExitViT.save`` (loaded inside each
    replica; on a multi-node cluster it must be readable from every node), or a callable building
    a ``QuantEarlyExitViT`` / engine in the replica. ``num_cpus``/``num_gpus`` per replica: the
    replica runs torch with as many threads as CPUs it was given.
    """
    _, serve = _require_ray()
    actor_options: dict[str, Any] = {"num_cpus": 1 if num_cpus is None else num_cpus}
    if num_gpus:
        actor_options["num_gpus"] = num_gpus
    deployment = serve.deployment(ImageModelServer, name=name).options(
        num_replicas=replicas,
        ray_actor_options=actor_options,
        # enough requests per replica to fill a batch while the previous one runs
        max_ongoing_requests=2 * max_batch_size + 8,
        max_constructor_retry_count=3,  # a model that fails to load fails fast
    )
    if isinstance(source, Path):
        source = str(source)
    return deployment.bind(source, max_batch_size, batch_wait_ms, device, compile_blocks)


def app_builder(args: dict):
    """Application builder for ``serve run`` / ``serve deploy`` configs (``import_path: lra_ee.serve:app_builder``).

    args: model_dir (required), max_batch_size (64), batch_wait_ms (5), device ("cpu"),
    num_cpus (1), num_gpus (0 on cpu, 1 on cuda), compile_blocks (auto). Replicas and
    ``ray_actor_options`` can be overridden per deployment in the config.
    """
    if "model_dir" not in args:
        raise ValueError("app_builder needs args.model_dir (a directory written by QuantEarlyExitViT.save)")
    device = str(args.get("device", "cpu"))
    compile_arg = args.get("compile_blocks")
    if isinstance(compile_arg, str):
        compile_arg = {"true": True, "false": False, "auto": None, "none": None}[compile_arg.lower()]
    return build_app(
        str(args["model_dir"]),
        max_batch_size=int(args.get("max_batch_size", 64)),
        batch_wait_ms=float(args.get("batch_wait_ms", 5.0)),
        device=device,
        replicas=int(args.get("replicas", 1)),
        num_cpus=float(args.get("num_cpus", 1)),
        num_gpus=float(args.get("num_gpus", 1 if device == "cuda" else 0)),
        compile_blocks=compile_arg,
    )


def start(app, *, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME, route_prefix: str = "/"):
    """Start Serve's HTTP proxy on ``host:port`` (Ray must be initialised) and run ``app``; returns its handle."""
    _, serve = _require_ray()
    serve.start(http_options={"host": host, "port": int(port)})
    return serve.run(app, name=name, route_prefix=route_prefix)


# ---------------------------------------------------------------------- lra-ee serve
class UsageError(Exception):
    """A bad argument or a missing model: one line, exit code 2."""


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise UsageError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def _check_args(args: argparse.Namespace) -> dict[str, Any]:
    from lra_kernels import QuantEarlyExitViT
    from lra_kernels.serialization import read_config

    if args.replicas < 1:
        raise UsageError(f"--replicas must be >= 1, got {args.replicas}")
    if args.max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if not (args.batch_wait_ms >= 0) or args.batch_wait_ms > 60_000:
        raise UsageError(f"--batch-wait-ms must lie in 0..60000, got {args.batch_wait_ms}")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must lie in 1..65535, got {args.port}")
    if args.device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {args.device!r}")
    model_dir = Path(args.model_dir).expanduser().resolve()
    try:
        read_config(model_dir)
        model = QuantEarlyExitViT.load(model_dir)  # catches bad weights here, not in every replica
    except (FileNotFoundError, ValueError, KeyError, TypeError, OSError) as err:
        raise UsageError(f"cannot load model from --model-dir {args.model_dir}: {err}") from None
    num_gpus = 0.0
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise UsageError("--device cuda but no CUDA device is visible")
        num_gpus = 1.0 if args.replicas <= gpus else gpus / args.replicas  # pack replicas on shared GPUs
        num_cpus = 1.0
    else:
        num_cpus = float(max(1, (os.cpu_count() or 1) // args.replicas))
    _check_port_free(args.host, args.port)
    return {"model_dir": str(model_dir), "model": model, "num_cpus": num_cpus, "num_gpus": num_gpus}


def serve_main(args: argparse.Namespace) -> int:
    """``lra-ee serve``: serve ``--model-dir`` until Ctrl-C / SIGTERM. Exit 2 on bad arguments."""
    try:
        if _ray_serve is None:
            raise UsageError(f"Ray Serve is not installed: {INSTALL_HINT}")
        checked = _check_args(args)
    except UsageError as err:
        print(f"lra-ee serve: error: {err}", file=sys.stderr)
        return 2
    import ray

    model = checked.pop("model")
    engine = QuantEngine(model)
    del model
    app = build_app(
        checked["model_dir"],
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        device=args.device,
        replicas=args.replicas,
        num_cpus=checked["num_cpus"],
        num_gpus=checked["num_gpus"],
    )
    shutting_down = False

    def on_signal(signum, frame):
        # SIGTERM stops like Ctrl-C; a second signal during the shutdown is ignored (no traceback).
        if not shutting_down:
            raise KeyboardInterrupt

    previous: dict = {}
    code = 0
    try:
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"))  # a running cluster if RAY_ADDRESS is set
        # after ray.init, which installs a SIGTERM handler that aborts the driver
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        start(app, host=args.host, port=args.port)
        info = engine.describe()
        what = "early exit at layers " + ",".join(map(str, info["exit_layers"])) if info["early_exit"] else "full depth"
        print(
            f"lra-ee serve: {checked['model_dir']} ({what}, {engine.num_classes or 'no'} classes) on "
            f"http://{args.host}:{args.port}  [POST /embed, POST /classify, GET /healthz]; Ctrl-C stops",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        shutting_down = True
        print("lra-ee serve: shutting down", file=sys.stderr, flush=True)
    except Exception as err:  # Ray failed to start or the replicas failed to come up
        shutting_down = True
        print(f"lra-ee serve: error: serving failed: {type(err).__name__}: {err}", file=sys.stderr)
        code = 1
    finally:
        shutting_down = True
        try:
            if ray.is_initialized():
                try:
                    _ray_serve.shutdown()
                finally:
                    ray.shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return code
