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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
