"""Regenerate the README's demo section from a demo's ``report.json``.

    lra-ee demo --out lra-ee-demo
    python scripts/readme_demo_table.py --report lra-ee-demo/report.json --images   # rewrite README.md
    python scripts/readme_demo_table.py --report lra-ee-demo/report.json --check    # exit 1 if README is stale

Everything between ``<!-- demo-table:begin -->`` and ``<!-- demo-table:end -->`` is replaced:
the per-scheme table, the controls, throughput and run time, all read from the report, so the
README cannot drift from what the demo measured. ``--images`` also copies the demo's QIRC and
quadrant plots to ``docs/img/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

BEGIN, END = "<!-- demo-table:begin -->", "<!-- demo-table:end -->"
ROOT = Path(__file__).resolve().parents[1]
LABELS = {"paper": "the paper's INT8 (`quantize_dynamic` emulation)", "smoothquant": "per-token + SmoothQuant (ours)",
          "per_token": "per-token (ours)", "per_tensor_static": "static per-tensor + SmoothQuant", "fp32": "FP32 tower"}


def _pct(v, digits=1):
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def _pp(v, ci=None):
    if v is None:
        return "–"
    s = f"{100 * v:+.2f} pp".replace("-", "−")
    if ci and None not in ci:
        s += f" [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]".replace("-", "−")
    return s


def scheme_table(r: dict) -> list[str]:
    depth = len(next(iter(r["schemes"].values()))["nsr_per_layer"]) - 1
    lines = [f"| scheme | FP32 | INT8 full depth | INT8 + LRA-EE | Δ (95% CI) | rescued / hurt | FLOPs saved | "
             f"NSR after block {depth} |", "|---|---|---|---|---|---|---|---|"]
    for name, s in r["schemes"].items():
        q = s["quadrants"]
        lines.append(f"| {LABELS.get(name, name)} | {_pct(s['acc_fp32'])} | {_pct(s['acc_full'])} | "
                     f"{_pct(s['acc_ee'])} | {_pp(s['delta'], s['delta_ci95'])} | {_pct(q['rescued'])} / "
                     f"{_pct(q['hurt'])} | {_pct(s['flops_saving'])} | {_pct(s['nsr_per_layer'][-1])} |")
    return lines


def controls_table(c: dict) -> list[str]:
    order = [e["scheme"] for e in c.get("rescued_minus_hurt_by_nsr", [])]
    if not order:
        return []
    nsr = {e["scheme"]: e for e in c["rescued_minus_hurt_by_nsr"]}
    head = "| control | " + " | ".join(f"{LABELS.get(s, s).split(' (')[0]} (NSR {_pct(nsr[s]['final_nsr'])})"
                                        for s in order) + " |"
    lines = [head, "|---|" + "---|" * len(order)]

    def row(name, cell):
        lines.append(f"| {name} | " + " | ".join(cell(s) for s in order) + " |")

    row("early exit: rescued − hurt (95% CI)", lambda s: _pp(nsr[s]["rescued_minus_hurt"], nsr[s]["ci95"]))
    rg = c.get("random_gate", {})
    row("random gate, same exit histogram: rescued − hurt (95% range)",
        lambda s: _pp(rg[s]["random_mean"], rg[s]["random_ci95"]) if s in rg else "–")
    orc = c.get("oracle", {})
    row("oracle over the same exits: rescued (upper bound)",
        lambda s: _pct(orc[s]["exit_set"]["rescued"]) if s in orc else "–")
    st = c.get("static_exit", {})

    def static(s):
        if s not in st:
            return "–"
        layers = st[s]["layers"]
        best = max(layers, key=lambda k: layers[k]["delta"])
        return f"{_pp(layers[best]['delta'])} (block {best})"

    row("best static exit, everyone leaves: Δ", static)
    hc = c.get("head_confound", {})
    row("patch mean vs own head at full depth: Δ",
        lambda s: _pp(hc[s]["delta"], hc[s]["delta_ci95"]) if s in hc else "–")
    bs = c.get("batch_sensitivity", {})

    def sens(s):
        if s not in bs:
            return "–"
        b = bs[s]
        return (f"INT8 full {_pct(b['acc_full_range'][0])}..{_pct(b['acc_full_range'][1])}, "
                f"EE {_pct(b['acc_ee_range'][0])}..{_pct(b['acc_ee_range'][1])} ({b['n']} images)")

    row("batch 1 / 32 / 256, sorted / shuffled: top-1 range", sens)
    return lines


def render(r: dict) -> str:
    t = r.get("throughput", {})
    speed = ", ".join(f"{k} {v:.0f} img/s" for k, v in t.get("img_per_s", {}).items())
    flags = r.get("flags") or []
    lines = [BEGIN, "", f"What the demo found — **seeded random weights, synthetic task**: the machinery at work, "
             f"not a claim about CLIP ({r.get('n_eval')} evaluation images, seeds {r.get('seeds')}; accuracy, "
             f"quadrants and FLOPs measured through the executor). Generated from `report.json` by "
             f"`scripts/readme_demo_table.py`.", ""]
    lines += scheme_table(r) + [""]
    ctl = controls_table(r.get("controls") or {})
    if ctl:
        lines += ["The controls of the same run (`report.md` has each with its confidence interval):", ""] + ctl + [""]
    if flags:
        lines += ["Flags raised by the run: " + "; ".join(flags) + ".", ""]
    lines += [f"CPU throughput in the same run (batch {t.get('batch_size')}, {t.get('threads')} threads): {speed}. "
              f"The demo took {r.get('seconds_total', 0):.0f} s.", "", END]
    return "\n".join(lines)


def replace_section(readme: str, block: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README has no {BEGIN} ... {END} section to replace")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + block + tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report", default="lra-ee-demo/report.json")
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--check", action="store_true", help="exit 1 when the README's section differs from the report")
    p.add_argument("--images", action="store_true", help="also copy the demo's plots to docs/img/")
    args = p.parse_args(argv)
    report_path = Path(args.report)
    r = json.loads(report_path.read_text())
    readme = Path(args.readme)
    new = replace_section(readme.read_text(), render(r))
    if args.check:
        if new != readme.read_text():
            print(f"{readme} is stale: run python scripts/readme_demo_table.py --report {report_path}", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    if args.images:
        for src, dst in (("qirc_nsr.png", "demo_qirc.png"), ("quadrants.png", "demo_quadrants.png")):
            shutil.copyfile(report_path.parent / src, ROOT / "docs" / "img" / dst)
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
