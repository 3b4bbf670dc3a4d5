"""Summary table of a GPU check: test phases (JUnit XML), compile check, benchmark figures (JSON lines).

    python scripts/gpu_summary.py --bench bench.jsonl --compile-check cc.txt --tests "kernel tests=k.xml"

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
        return f"{label:<32} no report (phase did not run, selected nothing, or crashed)"
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    secs = sum(float(s.get("time", 0)) for s in suites)
    line = f"{label:<32} {tests - failed - skipped} passed, {failed} failed, {skipped} skipped ({secs:.0f} s)"
    names = [f"{c.get('classname', '')}::{c.get('name')}" for c in root.iter("testcase")
             if c.find("failure") is not None or c.find("error") is not None]
    return line + "".join(f"\n    FAILED {n}" for n in names[:15])


def compile_lines(path: Path | None) -> list[str]:
    if path is None or not path.exists():
        return ["compile check: no report"]
    lines = path.read_text().splitlines()
    bad = [line for line in lines if "PROBLEM" in line]
    last = next((line for line in reversed(lines) if "variants compiled" in line), "compile check: did not finish")
    return [f"compile check (sm_90): {last}"] + [f"    {line}" for line in bad[:10]]


def _target(r) -> str:
    return "" if "meets_target" not in r else ("  MEETS " if r["meets_target"] else "  MISSES ") + r.get("target", "")


def bench_lines(path: Path) -> list[str]:
    if not path.exists():
        return ["benchmarks: no results (phase did not run or crashed)"]
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kind = lambda k: [r for r in rows if r.get("kind") == k]  # noqa: E731
    out: list[str] = []
    if rows:
        r0 = rows[0]
        out.append(f"device: {r0.get('device')}  (data-sheet dense peaks: INT8 {r0.get('int8_peak_tops')} TOPS, "
                   f"FP16 {r0.get('fp16_peak_tflops')} TFLOPS)")
    for r in kind("ceiling"):
        out.append(f"ceilings {r['label'][9:]}: torch._int_mm {r['int_mm_tops']:.0f} TOPS, fp16 matmul "
                   f"{r['fp16_tflops']:.0f} TFLOPS, device copy {r['copy_gb_per_s']:.0f} GB/s (read + write)")
    sweep = kind("gemm_config")
    if sweep:
        out += ["", "INT8 GEMM, every config x weight layout (batch 256 shapes)"]
        head = f"{'shape':<44} {'config':<34} {'layout':<8} {'ms':>8} {'TOPS':>6} {'%pk':>5} {'1st s':>6}"
        out += [head, "-" * len(head)]
        for r in sorted(sweep, key=lambda r: (r["label"], r["ms"])):
            out.append(f"{r['label']:<44} {r['config']:<34} {r['layout']:<8} {r['ms']:8.4f} {r['tops']:6.0f} "
                       f"{_fmt(r.get('pct_int8_peak'), '5.1f')} {r['first_call_s']:6.1f}")
    gemms = kind("gemm")
    if gemms:
        out += ["", "INT8 GEMM + epilogue, tuned, against peers (speedup = peer ms / ours)"]
        head = (f"{'shape':<50} {'ms':>8} {'TOPS':>6} {'%pk':>5} {'/int_mm':>7} {'/+deq':>6} {'/fp16':>6} "
                f"{'tune s':>6}  config")
        out += [head, "-" * len(head)]
        for r in gemms:
            cfg = r.get("config") or {}
            c = (f"{cfg.get('kernel', '?')} {cfg.get('BLOCK_M')}x{cfg.get('BLOCK_N')}x{cfg.get('BLOCK_K')}"
                 if cfg else "-")
            out.append(f"{r['label']:<50} {r['ms']:8.4f} {r['tops']:6.0f} {_fmt(r.get('pct_int8_peak'), '5.1f')} "
                       f"{r['vs_int_mm_only']:7.2f} {r['vs_int_mm_dequant']:6.2f} {r['vs_fp16']:6.2f} "
                       f"{r['tune_s']:6.1f}  {c}{_target(r)}")
        out.append("/int_mm: torch._int_mm alone (no epilogue); /+deq: _int_mm + dequant ops (the torch backend); "
                   "/fp16: F.linear fp16 (cuBLAS)")
    ops = kind("op")
    if ops:
        out.append("")
        head = f"{'kernel vs torch reference':<62} {'ms':>8} {'torch ms':>9} {'speedup':>8} {'GB/s':>7}"
        out += [head, "-" * len(head)]
        for r in ops:
            out.append(f"{r['label']:<62} {r['ms']:8.4f} {r['ms_torch_ref']:9.4f} {r['vs_torch_ref']:8.2f} "
                       f"{r['gb_per_s']:7.0f}")
    e2e = kind("e2e")
    if e2e:
        names = list(dict.fromkeys(n for r in e2e for n in r["providers"]))
        out += ["", f"{'end to end (random weights), img/s':<36}" + "".join(f" {n[:16]:>16}" for n in names)
                + f" {'graph/fp16':>10} {'1st call s':>10} {'tune s':>7} {'capture s':>9}"]
        for r in e2e:
            cells = "".join(f" {_fmt(r['providers'].get(n, {}).get('img_per_s'), '16.0f')}" for n in names)
            out.append(f"{r['label']:<36}{cells} {r['vs_fp16']:10.2f} {r['first_call_s']:10.1f} {r['tune_s']:7.1f} "
                       f"{r['capture_s']:9.1f}{_target(r)}")
        cos = e2e[0]["providers"]
        out.append("cosine to FP32: " + ", ".join(f"{n} {v['cosine_fp32']:.5f}" for n, v in cos.items()))
    for r in kind("classify"):
        modes = ", ".join(f"{m} {v['ms']:.2f} ms ({v['syncs']} host syncs, first call {v['first_call_s']:.1f} s)"
                          for m, v in r["modes"].items())
        out += ["", f"{r['label']}: {modes}; full depth through graphs {r['full_depth_graph_ms']:.2f} ms; "
                f"{r['exit_points']} exit points; exit layers {r['exit_histogram']}"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=Path, required=True)
    ap.add_argument("--compile-check", type=Path, default=None)
    ap.add_argument("--tests", nargs="*", default=[], help='"label=path.xml" pairs')
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
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
    lines += compile_lines(args.compile_check)
    lines.append("")
    lines += bench_lines(args.bench)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
