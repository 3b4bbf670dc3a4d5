"""The Ray Serve deployment: HTTP in, batches through the inference core, JSON out.

    POST /embed      body: a JPEG/PNG/WebP file -> {"embedding": [...], "exit_layer": int}
    POST /classify   body: a JPEG/PNG/WebP file -> {"label", "name", "score", "top5", "exit_layer"}
    GET  /healthz    -> {"status": "ok", ...model and replica batching statistics}

JSON bodies (base64 images, several images, per-request labels, ``POST /embed_text``) are parsed and
answered by ``lra_ee.serve.requests``.

Valid images are collected by ``@serve.batch`` (``max_batch_size``, ``batch_wait_timeout_s``) and,
while the model is busy, everything that arrives meanwhile forms the next batch. Ray is imported
here, lazily where it can be: this module imports, and ``build_app`` reports a clear error, without it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from . import requests as json_requests
from .core import InferenceCore, ItemResult
from .decode import BadImage
from .engines import ModelSource, load_engine
from .http import PROXY_TIMEOUT_MARGIN_S, READ_TIMEOUT_S, REQUEST_TIMEOUT_S, BodyError, json_response, read_body
from .labels import per_request_labels

try:  # optional extra: pip install "lra-kernels[serve]"
    with warnings.catch_warnings():  # Ray's own pydantic-v1-style fields warn at import
        warnings.simplefilter("ignore", DeprecationWarning)
        from ray import serve as _ray_serve
except ImportError:  # pragma: no cover - exercised where ray is missing
    _ray_serve = None

MAX_BODY_BYTES = 32 * 1024 * 1024
# Request slots per replica beyond what batching needs: a slow or stalled upload holds one (for at most the
# read timeout), so this many of them cannot keep good requests from a replica.
SLOW_CLIENT_SLOTS = 64
DEPLOYMENT_NAME = "LraEEServer"
APP_NAME = "lra-ee"
INSTALL_HINT = 'pip install "lra-kernels[serve]"  (or: pip install "ray[serve]")'


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
            "lra_ee_requests", description="HTTP requests answered, by endpoint and status",
            tag_keys=("endpoint", "status")
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
        read_timeout_s: float = READ_TIMEOUT_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ):
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
        self.threads = max(1, int(cpus)) if cpus else torch.get_num_threads()
        torch.set_num_threads(self.threads)
        self.device = device
        self.core = InferenceCore(load_engine(source, device, compile_blocks))
        self.max_batch_size, self.batch_wait_ms = int(max_batch_size), float(batch_wait_ms)
        self.read_timeout_s, self.request_timeout_s = float(read_timeout_s), float(request_timeout_s)
        self._infer.set_max_batch_size(self.max_batch_size)
        self._infer.set_batch_wait_timeout_s(self.batch_wait_ms / 1000.0)
        # One thread runs the model (the torch thread pool is not shared between callers); the
        # event loop meanwhile keeps decoding requests on the default executor.
        self._model_thread = ThreadPoolExecutor(1, "lra-ee-model", initializer=torch.set_num_threads,
                                                initargs=(self.threads,))
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
        start = time.perf_counter()
        path = request.url.path
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        endpoint = path.strip("/") or "/"
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        try:
            result = await asyncio.wait_for(self._handle(request, endpoint), self.request_timeout_s)
        except asyncio.TimeoutError:
            result = ItemResult(503, {"error": f"the request took longer than {self.request_timeout_s:g} s "
                                               f"(server busy); retry later"})
        except Exception as err:  # a server bug: still one JSON answer, and the replica keeps serving
            logging.getLogger("ray.serve").exception("request failed")
            result = ItemResult(500, {"error": f"internal error: {type(err).__name__}: {err}"})
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)
        tag = endpoint if endpoint in (*json_requests.JSON_ROUTES, "healthz") else "other"
        self.metrics.requests.inc(tags={"endpoint": tag, "status": str(result.status)})
        self.metrics.latency.observe((time.perf_counter() - start) * 1000.0, tags={"endpoint": tag})
        return json_response(result.status, result.body)

    async def _handle(self, request, endpoint: str) -> ItemResult:
        method = request.method.upper()
        if endpoint == "healthz":
            if method not in ("GET", "HEAD"):
                return ItemResult(405, {"error": "use GET /healthz"})
            return ItemResult(200, self.health())
        if endpoint not in json_requests.JSON_ROUTES:
            return ItemResult(404, {"error": f"no endpoint {request.url.path!r}: POST /embed, POST /classify, "
                                             f"POST /embed_text, GET /healthz"})
        if method != "POST":
            return ItemResult(405, {"error": f"use POST /{endpoint} with an image file or a JSON object as the body"})
        try:  # streamed: 413 as soon as the limit is passed, 408 when the client stalls
            body = await read_body(request, MAX_BODY_BYTES, self.read_timeout_s, self.request_timeout_s / 2)
        except BodyError as err:
            return ItemResult(err.status, {"error": str(err)})
        if endpoint == "embed_text" or json_requests.looks_like_json(request.headers.get("content-type"), body):
            return await json_requests.answer(self, endpoint, body)
        if endpoint == "classify" and not self.core.has_classifier:
            return ItemResult(400, {"error": "this model has no classifier (set_classifier was not called before "
                                             "saving): use /embed, or send JSON with \"labels\" to a CLIP model"})
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
            "per_request_labels": per_request_labels(engine),
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
    read_timeout_s: float = READ_TIMEOUT_S,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
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
        # enough requests per replica to fill a batch while the previous one runs, and slots for slow clients
        max_ongoing_requests=2 * max_batch_size + 8 + SLOW_CLIENT_SLOTS,
        max_constructor_retry_count=3,  # a model that fails to load fails fast
    )
    if isinstance(source, Path):
        source = str(source)
    return deployment.bind(source, max_batch_size, batch_wait_ms, device, compile_blocks, read_timeout_s,
                           request_timeout_s)


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


def start(app, *, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME, route_prefix: str = "/",
          request_timeout_s: float = REQUEST_TIMEOUT_S):
    """Start Serve's HTTP proxy on ``host:port`` (Ray must be initialised) and run ``app``; returns its handle.

    The proxy's own request timeout lies ``PROXY_TIMEOUT_MARGIN_S`` beyond the replicas' (``request_timeout_s``),
    so a slow request is answered by the replica in JSON, and the proxy's text answer is only a backstop."""
    _, serve = _require_ray()
    serve.start(http_options={"host": host, "port": int(port), "keep_alive_timeout_s": 5,
                              "request_timeout_s": float(request_timeout_s) + PROXY_TIMEOUT_MARGIN_S})
    return serve.run(app, name=name, route_prefix=route_prefix)
