"""Summary table of a GPU check: test phases (JUnit XML) and benchmark figures (JSON lines).

    python scripts/gpu_summary.py --bench bench.jsonl --tests "kernel tests=k.xml" "gpu tests=g.xml"

Reads what ``scripts/gpu_check.sh`` writes; prints plain text (also fine inside Markdown).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def test_line(label: str, path: Path) -> str:
    if not path.exists():
        return f"{label:<28} no report (phase did not run or crashed)"
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    secs = sum(float(s.get("time", 0)) for s in suites)
    line = f"{label:<28} {tests - failed - skipped} passed, {failed} failed, {skipped} skipped ({secs:.0f} s)"
    names = [
        f"{c.get('classname', '')}::{c.get('name')}"
        for c in root.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    return line + "".join(f"\n    FAILED {n}" for n in names[:15])


def bench_lines(path: Path) -> list[str]:
    if not path.exists():
        return ["benchmarks: no results (phase did not run or crashed)"]
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out: list[str] = []
    if rows:
        r0 = rows[0]
        out.append(f"device: {r0.get('device')}  (dense peaks used: INT8 {r0.get('int8_peak_tops')} TOPS, FP16 {r0.get('fp16_peak_tflops')} TFLOPS)")

    def target(r):
        return "" if "meets_target" not in r else ("  MEETS " if r["meets_target"] else "  MISSES ") + r.get("target", "")

    gemms = [r for r in rows if r.get("kind") == "gemm"]
    if gemms:
        out.append("")
        out.append("INT8 GEMM, fused epilogue: weight as stored today ([K, N] contiguous) | weight K-major ([N, K].t())")
        head = (
            f"{'shape':<58} {'ms':>8} {'TOPS':>6} {'%pk':>5} {'/int_mm':>7} {'/fp16':>6} |"
            f" {'ms':>8} {'TOPS':>6} {'%pk':>5} {'/int_mm':>7} {'/fp16':>6}"
        )
        out += [head, "-" * len(head)]
        for r in gemms:
            line = (
                f"{r['label'][10:]:<58} {r['ms']:8.4f} {r['tops']:6.0f} {_fmt(r.get('pct_int8_peak'), '5.1f')} "
                f"{r['vs_int_mm_dequant']:7.2f} {r['vs_fp16_cublas']:6.2f} |"
                f" {r['ms_kmajor']:8.4f} {r['tops_kmajor']:6.0f} {_fmt(r.get('pct_int8_peak_kmajor'), '5.1f')} "
                f"{r['vs_int_mm_dequant_kmajor']:7.2f} {r['vs_fp16_cublas_kmajor']:6.2f}"
            )
            if "meets_target" in r:
                yes = lambda ok: "MEETS" if ok else "MISSES"  # noqa: E731
                line += f"  target {r['target']}: {yes(r['meets_target'])} | {yes(r['meets_target_kmajor'])}"
            out.append(line)
        out.append("/int_mm: speedup vs torch._int_mm + dequant ops (cuBLASLt, its faster layout); /fp16: vs FP16 torch.matmul (cuBLAS)")
    ops = [r for r in rows if r.get("kind") == "op"]
    if ops:
        out.append("")
        head = f"{'kernel vs torch reference':<62} {'ms':>8} {'torch ms':>9} {'speedup':>8} {'GB/s':>7}"
        out += [head, "-" * len(head)]
        for r in ops:
            out.append(f"{r['label']:<62} {r['ms']:8.4f} {r['ms_torch_ref']:9.4f} {r['vs_torch_ref']:8.2f} {r['gb_per_s']:7.0f}")
    e2e = [r for r in rows if r.get("kind") == "e2e"]
    if e2e:
        out.append("")
        names = []
        for r in e2e:
            names += [n for n in r["providers"] if n not in names]
        head = f"{'end to end (random weights)':<28}" + "".join(f" {n[:30]:>30}" for n in names) + f" {'ours/fp16':>10}"
        out += [head + "   (img/s)", "-" * len(head)]
        for r in e2e:
            cells = "".join(f" {_fmt(r['providers'].get(n, {}).get('img_per_s'), '30.0f')}" for n in names)
            out.append(f"{r['label']:<28}{cells} {r['vs_fp16']:10.2f}{target(r)}")
        for r in e2e[:1]:
            for n, why in r.get("unavailable", {}).items():
                out.append(f"  {n}: {why}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=Path, required=True)
    ap.add_argument("--tests", nargs="*", default=[], help='"label=path.xml" pairs')
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    try:
        import torch
        import triton

        versions = f"torch {torch.__version__}, triton {triton.__version__}"
    except ImportError:
        versions = ""
    lines = [f"GPU check, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit or '?'}, {versions}", ""]
    for pair in args.tests:
        label, _, path = pair.partition("=")
        lines.append(test_line(label, Path(path)))
    lines.append("")
    lines += bench_lines(args.bench)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
