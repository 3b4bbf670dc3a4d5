"""Embed an image collection on Ray Data (``lra-ee embed``; extra ``embed``).

    listing (driver) -> decode + preprocess (Ray tasks) -> model (actor pool) -> Parquet shards

1. The driver lists the inputs (a folder tree, a file list or tar shards: ``lra_ee.embed_inputs``)
   and builds a dataset of ``(path, file, offset, size, error)`` rows.
2. ``map_batches(decode_batch)`` runs as stateless Ray tasks: each reads the bytes, decodes them
   with ``lra_ee.serve.decode_image`` and applies open_clip's eval transform of the saved model
   (``preprocess_from_cfg``) up to its last two steps; an unreadable or corrupt input keeps its
   row with ``error`` set. The pixels travel as uint8; the actor applies to-tensor + ``Normalize``
   to the batch (the same float32 operations, so the same values as the whole transform per image).
3. ``map_batches(Embedder, compute=ActorPoolStrategy(size=workers))``: each actor loads the
   saved ``QuantEarlyExitViT`` once and embeds batches of ``batch_size`` rows. Full depth unless
   ``early_exit``: then the model's exit policy runs and ``exit_layer`` records where each image left.
4. ``write_parquet``: shards of about ``rows_per_shard`` rows, ``path, embedding, exit_layer, error``.

Decoding and the model are separate operators (their Ray resources differ, so Ray Data does not
fuse them): decode tasks run on other cores, or other nodes, while the actors compute.
A killed actor is restarted and its batch retried by Ray; a killed decode task is retried. After
the run the driver reads the ``path`` column back and checks that every input has exactly one
row (``lra_ee.embed_output``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .embed_inputs import EmbedError, InputListing, list_inputs, read_input
from .embed_output import check_output, finish_manifest, model_fingerprint, output_schema, prepare_output

__all__ = ["EmbedConfig", "EmbedError", "EmbedFailed", "EmbedReport", "Embedder", "decode_batch", "run_embed",
           "embed_main"]

INSTALL_HINT = 'pip install "lra-kernels[embed]"  (or: pip install "ray[data]")'
DECODE_BLOCK_ROWS = 64  # rows per input block: one decode task's work (64 ViT-B/32 inputs: 9.6 MB of pixels)


class EmbedFailed(RuntimeError):
    """The run started but did not produce one row per input (exit code 1)."""


@dataclass(frozen=True)
class EmbedConfig:
    model_dir: str
    data: str
    out: str
    batch_size: int = 256
    workers: int = 1
    num_gpus_per_worker: float = 0.0
    threads_per_worker: int | None = None  # CPU: torch threads per actor (default: the node's cores / workers)
    early_exit: bool = False
    resume: bool = False
    ray_address: str | None = None
    rows_per_shard: int = 10_000
    compile_blocks: bool | None = None  # None: the runtime's default (TorchInductor on CPU when a compiler exists)
    decode_block_rows: int = DECODE_BLOCK_ROWS

    def __post_init__(self):
        for name in ("batch_size", "workers", "rows_per_shard", "decode_block_rows"):
            if getattr(self, name) < 1:
                raise EmbedError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.num_gpus_per_worker < 0:
            raise EmbedError(f"--num-gpus-per-worker must be >= 0, got {self.num_gpus_per_worker}")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise EmbedError(f"--threads-per-worker must be at least 1, got {self.threads_per_worker}")

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus_per_worker > 0 else "cpu"


@dataclass
class EmbedReport:
    out: str
    inputs: int  # inputs the listing names
    embedded: int  # rows written by this run
    kept: int  # rows kept from an earlier run (--resume)
    rows: int
    error_rows: int
    shards: int
    seconds: float  # this run, from Ray start to the checked output
    stale_rows: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------- decode (Ray tasks)
_TRANSFORMS: dict[str, object] = {}


def _transform(preprocess_cfg: dict, image_size: tuple[int, int]):
    from .data import preprocess_from_cfg

    key = json.dumps([preprocess_cfg, list(image_size)], sort_keys=True)
    if key not in _TRANSFORMS:  # one per worker process, reused by every task it runs
        _TRANSFORMS[key] = preprocess_from_cfg(preprocess_cfg, tuple(image_size))
    return _TRANSFORMS[key]


def split_transform(transform):
    """``(pil_stage, mean, std)`` when ``transform`` ends with to-tensor and ``Normalize`` after an RGB
    conversion, as open_clip's eval transform does; else None.

    The decode tasks then run only the PIL stage (resize, crop, RGB) and ship uint8 pixels, a
    quarter of the float32 bytes; the actor applies to-tensor and ``Normalize`` to the whole batch
    (:func:`normalize_pixels`), the same elementwise float32 operations, so the same values."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = list(getattr(transform, "transforms", ()))
    if len(steps) < 3 or not isinstance(steps[-1], Normalize) or not isinstance(steps[-2], ToTensor):
        return None
    return Compose(steps[:-2]), tuple(float(v) for v in steps[-1].mean), tuple(float(v) for v in steps[-1].std)


def normalize_pixels(pixels: np.ndarray, mean, std):
    """uint8 ``[B, H, W, 3]`` -> float32 ``[B, 3, H, W]``: ``ToTensor`` then ``Normalize``, batched."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _pil_pixels(body: bytes, pil_stage, h: int, w: int) -> np.ndarray:
    from .serve.decode import BadImage, decode_image

    image = decode_image(body)
    try:
        out = np.asarray(pil_stage(image))
    except Exception as err:  # an image PIL opened but cannot convert/resize
        raise BadImage(f"cannot preprocess the {image.format} image (mode {image.mode}): {err}") from None
    if out.shape != (h, w, 3) or out.dtype != np.uint8:
        raise BadImage(f"preprocessing gave {out.shape} {out.dtype}, the model takes ({h}, {w}, 3) uint8")
    return out


def decode_batch(batch, preprocess_cfg: dict, image_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Input rows (an Arrow table: path, file, offset, size, error) -> ``path``, ``pixels`` and ``error``.

    ``pixels``: uint8 ``[B, H, W, 3]`` after open_clip's PIL steps (see :func:`split_transform`), or,
    for a transform that does not split so, float32 ``[B, 3, H, W]`` after all of it; zeros where
    ``error`` is set (unreadable bytes, or ``lra_ee.serve.decode_image`` / the transform refused them)."""
    from .serve.decode import BadImage, preprocess_body

    transform = _transform(preprocess_cfg, image_size)
    split = split_transform(transform)
    cols = {name: batch.column(name).to_pylist() for name in ("path", "file", "offset", "size", "error")}
    n = len(cols["path"])
    h, w = image_size
    pixels = np.zeros((n, h, w, 3), np.uint8) if split else np.zeros((n, 3, h, w), np.float32)
    errors: list[str | None] = list(cols["error"])
    for i in range(n):
        if errors[i] is not None:
            continue
        try:
            body = read_input(cols["file"][i], cols["offset"][i], cols["size"][i])
            if split:
                pixels[i] = _pil_pixels(body, split[0], h, w)
                continue
            x = preprocess_body(body, transform)
            if tuple(x.shape) != (3, h, w):
                raise BadImage(f"preprocessing gave {tuple(x.shape)}, the model takes (3, {h}, {w})")
            pixels[i] = x.numpy()
        except BadImage as err:
            errors[i] = str(err)
        except OSError as err:
            errors[i] = f"cannot read {cols['file'][i]}: {err.strerror or err}"
    return {"path": np.asarray(cols["path"], dtype=object), "pixels": pixels, "error": np.asarray(errors, dtype=object)}


# ---------------------------------------------------------------------- model (actor pool)
class Embedder:
    """One model per actor: ``QuantEarlyExitViT.load(model_dir)``, batches through ``QuantEngine.embed``
    (the same call as ``POST /embed``): full depth -> ``model(images)``, early exit -> ``classify``."""

    def __init__(self, model_dir: str, early_exit: bool, device: str = "cpu", threads: int | None = None,
                 workers: int = 1, compile_blocks: bool | None = None):
        import torch

        from lra_kernels import ExitPolicy, QuantEarlyExitViT

        from .serve.engines import QuantEngine

        if device == "cpu":
            torch.set_num_threads(threads or max(1, _cpus() // workers))
        model = QuantEarlyExitViT.load(model_dir, device=device)
        if compile_blocks is not None:
            model.compile_blocks = compile_blocks
        if not early_exit:
            model.exit_policy = ExitPolicy.disabled()
        self.engine = QuantEngine(model)
        self.device = device
        self.split = split_transform(_transform(dict(model.preprocess_cfg), tuple(model.image_size)))

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa
        import torch

        errors = [None if e is None or e != e else str(e) for e in batch["error"]]  # nulls may arrive as None/NaN
        ok = np.array([e is None for e in errors], dtype=bool)
        n = len(errors)
        embeddings: list = [None] * n
        exit_layer: list = [None] * n
        if ok.any():
            pixels = batch["pixels"][ok]
            if pixels.dtype == np.uint8:
                if self.split is None:
                    raise ValueError("uint8 pixels for a model whose transform does not end with ToTensor + Normalize")
                images = normalize_pixels(pixels, self.split[1], self.split[2])
            else:
                images = torch.from_numpy(np.ascontiguousarray(pixels))
            res = self.engine.embed(images.to(self.device))
            emb = res.embeddings.float().cpu().numpy()
            layers = res.exit_layer.cpu().numpy()
            for j, i in enumerate(np.flatnonzero(ok)):
                embeddings[i] = emb[j]
                exit_layer[i] = int(layers[j])
        return pa.table([pa.array(list(batch["path"]), pa.string()),
                         pa.array(embeddings, pa.list_(pa.float32())),
                         pa.array(exit_layer, pa.int64()),
                         pa.array(errors, pa.string())], schema=output_schema())


# ---------------------------------------------------------------------- the run
def _require_ray():
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise EmbedError(f"Ray Data is not installed ({err}): {INSTALL_HINT}") from None
    return ray


def _load_model_info(cfg: EmbedConfig) -> dict:
    from lra_kernels import QuantEarlyExitViT

    if not Path(cfg.model_dir).is_dir():
        raise EmbedError(f"--model-dir {cfg.model_dir} is not a directory (write one with QuantEarlyExitViT.save "
                         "or lra-ee calibrate)")
    try:
        model = QuantEarlyExitViT.load(cfg.model_dir)
    except (FileNotFoundError, ValueError) as err:
        raise EmbedError(str(err).splitlines()[0]) from None
    if cfg.early_exit and not model.early_exit_active:
        raise EmbedError(f"--early-exit: {cfg.model_dir} has no classifier or no exit policy (write it with "
                         "lra-ee calibrate); without --early-exit it embeds at full depth")
    return {"preprocess_cfg": dict(model.preprocess_cfg), "image_size": tuple(model.image_size),
            "depth": model.depth, "embedding_dim": int(model.output_dim)}


def decode_memory(image_size: tuple[int, int], rows: int = DECODE_BLOCK_ROWS) -> int:
    """Bytes one decode task reserves: its block of pixels as float32, twice (the most a block takes,
    for a transform that does not split), plus room for the decoded images."""
    h, w = image_size
    return int(rows * 3 * h * w * 4 * 2 + 256 * 1024**2)


def build_dataset(listing: InputListing, cfg: EmbedConfig, info: dict, *, embedder_cls=Embedder,
                  decode_fn=decode_batch):
    """The Ray Data pipeline up to the model's output rows (not executed).

    The decode tasks reserve memory and the actors do not: with different resources Ray Data keeps
    the two operators apart (it fuses adjacent maps with equal resources, which would decode inside
    the actor, serially with the model); ``tests/test_embed.py`` checks the physical plan. Ray's
    defaults retry a decode task whose process died (3 times) and restart a dead actor and retry
    its batch (without limit)."""
    import ray.data

    ds = ray.data.from_arrow(listing.tables(cfg.decode_block_rows))
    ds = ds.map_batches(decode_fn, batch_size=None, batch_format="pyarrow", num_cpus=1,
                        memory=decode_memory(info["image_size"], cfg.decode_block_rows),
                        fn_kwargs={"preprocess_cfg": info["preprocess_cfg"], "image_size": info["image_size"]})
    return ds.map_batches(
        embedder_cls,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        num_cpus=1,  # a token on CPU: the actor's torch threads share the cores with the decode tasks
        num_gpus=cfg.num_gpus_per_worker or None,
        fn_constructor_kwargs={"model_dir": str(Path(cfg.model_dir).absolute()), "early_exit": cfg.early_exit,
                               "device": cfg.device, "threads": cfg.threads_per_worker, "workers": cfg.workers,
                               "compile_blocks": cfg.compile_blocks},
    )


def _shard_names():
    from ray.data.datasource import FilenameProvider

    class ShardNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{write_uuid}-{task_index:06}"  # Ray appends "-<i>.parquet"

    return ShardNames()


def _start_ray(ray, cfg: EmbedConfig) -> bool:
    """Start or join Ray; True when this call started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, log_to_driver=False)
    else:  # one machine; at least one CPU is left for decoding beside the model actors
        ray.init(address="local", num_cpus=max(_cpus(), cfg.workers + 1), include_dashboard=False,
                 log_to_driver=False)
    return True


def _check_cluster(ray, cfg: EmbedConfig) -> None:
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    if cpus < cfg.workers + 1:
        raise EmbedError(f"the Ray cluster has {cpus:g} CPUs: {cfg.workers} model worker(s) take {cfg.workers}, "
                         "none is left to decode images; lower --workers or add CPUs")
    if cfg.num_gpus_per_worker and gpus < cfg.workers * cfg.num_gpus_per_worker:
        raise EmbedError(f"the Ray cluster has {gpus:g} GPUs: {cfg.workers} worker(s) x {cfg.num_gpus_per_worker:g} "
                         "GPU do not fit")


def run_embed(cfg: EmbedConfig, *, embedder_cls=Embedder, decode_fn=decode_batch, log=None) -> EmbedReport:
    """Embed everything ``cfg.data`` names into ``cfg.out``; :class:`EmbedError` before anything runs,
    :class:`EmbedFailed` if the output misses or repeats an input. Joins a running Ray if there is one."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    info = _load_model_info(cfg)
    listing = list_inputs(cfg.data)
    ray = _require_ray()
    out = Path(cfg.out)
    job = {"model_dir": str(Path(cfg.model_dir).absolute()), "model_fingerprint": model_fingerprint(cfg.model_dir),
           "early_exit": cfg.early_exit, "normalized": cfg.early_exit, "embedding_dim": info["embedding_dim"],
           "depth": info["depth"], "data": cfg.data}
    manifest, done, notes = prepare_output(out, job, cfg.resume)
    todo = listing.take(lambda p: p not in done) if done else listing
    if listing.n_duplicates:
        notes.append(f"{listing.n_duplicates} input(s) listed more than once: embedded once")
    if done:
        notes.append(f"resuming: {len(listing) - len(todo)} input(s) already have a row, {len(todo)} to embed")
    for note in notes:
        log(f"lra-ee embed: {note}")
    t0 = time.perf_counter()
    if len(todo):
        started = _start_ray(ray, cfg)
        try:
            _check_cluster(ray, cfg)
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = sys.stderr.isatty()
            ds = build_dataset(todo, cfg, info, embedder_cls=embedder_cls, decode_fn=decode_fn)
            ds.write_parquet(str(out.absolute()), filename_provider=_shard_names(), schema=output_schema(),
                             min_rows_per_file=cfg.rows_per_shard, max_rows_per_file=cfg.rows_per_shard)
        except EmbedError:
            raise
        except Exception as err:  # Ray failed, or a batch failed past its retries
            raise EmbedFailed(f"the run failed ({type(err).__name__}: {str(err).splitlines()[0][:300]}); the rows "
                              f"written so far are kept: rerun with --resume to embed the rest") from err
        finally:
            if started:
                ray.shutdown()
    seconds = time.perf_counter() - t0
    check = check_output(out, listing.path)
    finish_manifest(out, manifest, check, len(todo), seconds)
    if not check.ok:
        raise EmbedFailed(f"output check failed in {out}: {len(check.missing)} input(s) without a row "
                          f"(e.g. {check.missing[:1]}), {len(check.duplicated)} with more than one "
                          f"(e.g. {check.duplicated[:1]}); rerun with --resume to fill the gaps")
    if check.stale:
        notes.append(f"{check.stale} row(s) of inputs this --data no longer names are kept")
    return EmbedReport(str(out), len(listing), len(todo), len(done & set(listing.path)) if done else 0, check.rows,
                       check.errors, check.shards, seconds, check.stale, notes)


# ---------------------------------------------------------------------- command line
def config_from_args(args) -> EmbedConfig:
    compile_blocks = {"auto": None, "true": True, "false": False}[args.compile_blocks]
    return EmbedConfig(model_dir=args.model_dir, data=args.data, out=args.out, batch_size=args.batch_size,
                       workers=args.workers, num_gpus_per_worker=args.num_gpus_per_worker,
                       threads_per_worker=args.threads_per_worker, early_exit=args.early_exit, resume=args.resume,
                       ray_address=args.ray_address, rows_per_shard=args.rows_per_shard, compile_blocks=compile_blocks)


def embed_main(args) -> int:
    """``lra-ee embed``: 0 when every input has one row (some may carry an error), 1 when the run
    failed; :class:`EmbedError` (exit code 2 from the CLI) for bad arguments, before Ray starts."""
    cfg = config_from_args(args)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        rep = run_embed(cfg)
    except EmbedFailed as err:
        print(f"lra-ee: error: {err}", file=sys.stderr)
        return 1
    for note in rep.notes[-1:] if rep.stale_rows else []:
        print(f"lra-ee embed: {note}", file=sys.stderr)
    what = "early exit (exit_layer recorded)" if cfg.early_exit else "full depth"
    print(f"lra-ee embed: {rep.rows} rows ({rep.error_rows} with an error) for {rep.inputs} inputs in {rep.shards} "
          f"shard(s) under {rep.out}; this run embedded {rep.embedded} in {rep.seconds:.1f} s "
          f"({rep.images_per_s:.1f} img/s), {what}")
    return 0
