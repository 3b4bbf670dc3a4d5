"""The ``lra-ee`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_report, run_demo

    report = run_demo(args.out, model=args.model, seed=args.seed, batch_size=args.batch_size,
                      bench_seconds=args.bench_seconds)
    print(format_report(report))
    print(f"\nreport: {args.out}/report.json")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import serve_main

    return serve_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lra-ee",
        description="INT8 OpenCLIP vision towers with layer-wise early exits (LRA-EE).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job on a built-in ViT-B-32 with seeded random weights (no download)")
    demo.add_argument("--out", default="lra-ee-demo", help="output directory (default: %(default)s)")
    demo.add_argument("--model", default="ViT-B-32", help="open_clip architecture (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--bench-seconds", type=float, default=4.0, help="timing per throughput measurement")
    demo.set_defaults(func=_demo)

    serve = sub.add_parser("serve", help="serve a saved model directory over HTTP on Ray Serve (extra: serve)")
    serve.add_argument("--model-dir", required=True, help="directory written by QuantEarlyExitViT.save / lra-ee calibrate")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--replicas", type=int, default=1)
    serve.add_argument("--max-batch-size", type=int, default=64)
    serve.add_argument("--batch-wait-ms", type=float, default=5.0)
    serve.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
