"""``lra-ee serve --model-dir DIR``: check the arguments, start Ray Serve, serve until Ctrl-C / SIGTERM.

``add_parser(sub)`` declares the command for ``lra_ee.cli``; a bad argument or model is one
``UserError`` line and exit code 2, as for every other command.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import EXIT_USAGE, UserError
from .http import READ_TIMEOUT_S, REQUEST_TIMEOUT_S
from .labels import text_capable


def add_parser(sub) -> argparse.ArgumentParser:
    serve = sub.add_parser("serve", help="serve a saved model directory over HTTP on Ray Serve (extra: serve)")
    serve.add_argument("--model-dir", required=True,
                       help="directory written by QuantEarlyExitViT.save / lra-ee calibrate, or by QuantCLIP.save "
                            "(then /classify also takes per-request labels and /embed_text answers)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--replicas", type=int, default=1)
    serve.add_argument("--max-batch-size", type=int, default=64)
    serve.add_argument("--batch-wait-ms", type=float, default=5.0)
    serve.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    serve.add_argument("--read-timeout-s", type=float, default=READ_TIMEOUT_S,
                       help="longest wait for the next chunk of a request body, then 408 (default: %(default)s)")
    serve.add_argument("--request-timeout-s", type=float, default=REQUEST_TIMEOUT_S,
                       help="longest a request may take in a replica, then 503 (default: %(default)s)")
    serve.set_defaults(func=serve_main)
    return serve


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def _load_model(model_dir: Path):
    """The model a replica will serve, loaded (and so validated) once here: a ``QuantCLIP`` directory whole (both
    towers), else the image tower."""
    from lra_kernels import QuantEarlyExitViT
    from lra_kernels.clip import QuantCLIP, is_quant_clip_dir

    return QuantCLIP.load(model_dir) if is_quant_clip_dir(model_dir) else QuantEarlyExitViT.load(model_dir)


def _check_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.replicas < 1:
        raise UserError(f"--replicas must be >= 1, got {args.replicas}")
    if args.max_batch_size < 1:
        raise UserError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if not (args.batch_wait_ms >= 0) or args.batch_wait_ms > 60_000:
        raise UserError(f"--batch-wait-ms must lie in 0..60000, got {args.batch_wait_ms}")
    for flag, value in (("--read-timeout-s", args.read_timeout_s), ("--request-timeout-s", args.request_timeout_s)):
        if not 0 < value <= 3600:
            raise UserError(f"{flag} must lie in (0, 3600], got {value}")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must lie in 1..65535, got {args.port}")
    if args.device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {args.device!r}")
    model_dir = Path(args.model_dir).expanduser().resolve()
    try:
        model = _load_model(model_dir)  # catches bad weights here, not in every replica
    except (FileNotFoundError, ValueError, KeyError, TypeError, OSError) as err:
        raise UserError(f"cannot load model from --model-dir {args.model_dir}: {err}") from None
    num_gpus = 0.0
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise UserError("--device cuda but no CUDA device is visible")
        num_gpus = 1.0 if args.replicas <= gpus else gpus / args.replicas  # pack replicas on shared GPUs
        num_cpus = 1.0
    else:
        num_cpus = float(max(1, (os.cpu_count() or 1) // args.replicas))
    _check_port_free(args.host, args.port)
    return {"model_dir": str(model_dir), "model": model, "num_cpus": num_cpus, "num_gpus": num_gpus}


def serve_main(args: argparse.Namespace) -> int:
    """``lra-ee serve``: serve ``--model-dir`` until Ctrl-C / SIGTERM. Exit 2 on bad arguments."""
    from .deployment import INSTALL_HINT, _ray_serve, build_app, start  # imports Ray: only when serving
    from .engines import as_engine

    try:
        if _ray_serve is None:
            raise UserError(f"Ray Serve is not installed: {INSTALL_HINT}")
        checked = _check_args(args)
    except UserError as err:
        print(f"lra-ee serve: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    import ray

    model = checked.pop("model")
    engine = as_engine(model)  # a QuantEngine, or a ClipEngine for a QuantCLIP
    del model
    app = build_app(
        checked["model_dir"],
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        device=args.device,
        replicas=args.replicas,
        num_cpus=checked["num_cpus"],
        num_gpus=checked["num_gpus"],
        read_timeout_s=args.read_timeout_s,
        request_timeout_s=args.request_timeout_s,
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
        start(app, host=args.host, port=args.port, request_timeout_s=args.request_timeout_s)
        info = engine.describe()
        what = "early exit at layers " + ",".join(map(str, info["exit_layers"])) if info["early_exit"] else "full depth"
        routes = "POST /embed, POST /classify" + (", POST /embed_text" if text_capable(engine) else "")
        print(
            f"lra-ee serve: {checked['model_dir']} ({what}, {engine.num_classes or 'no'} classes) on "
            f"http://{args.host}:{args.port}  [{routes}, GET /healthz]; Ctrl-C stops",
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
