"""Reports: ``report.json``, PNG plots and ``report.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x


def write_json(path: Path, report: dict) -> Path:
    path.write_text(json.dumps(_jsonable(report), indent=2))
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path: Path, title: str, *, grid: bool = True, legend: bool = True) -> Path:
    ax.set_title(title, fontsize=10)
    if grid:
        ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def plot_qirc(curves: dict[str, list[float]], path: Path, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, nsr in curves.items():
        ax.plot(range(len(nsr)), [100 * v for v in nsr], marker="o", ms=3, label=name)
    ax.set_xlabel("blocks run (0 = embedding)")
    ax.set_ylabel("NSR vs FP32 (%)")
    return _finish(fig, ax, path, title)


def plot_exit_histogram(hist: dict, path: Path, title: str) -> Path:
    plt = _plt()
    layers = sorted(int(k) for k in hist)
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    heights = [100 * hist[layer] if layer in hist else 100 * hist[str(layer)] for layer in layers]
    ax.bar([str(layer) for layer in layers], heights, color="#4c72b0")
    ax.set_xlabel("exit layer (blocks run; last = full depth)")
    ax.set_ylabel("samples (%)")
    return _finish(fig, ax, path, title, grid=False, legend=False)


def plot_quadrants(quadrants: dict[str, dict], path: Path, title: str) -> Path:
    """One stacked bar per scheme: both right / rescued / hurt / both wrong (% of evaluation images)."""
    plt = _plt()
    names = list(quadrants)
    parts = [("both_right", "#55a868"), ("rescued", "#4c72b0"), ("hurt", "#c44e52"), ("both_wrong", "#8c8c8c")]
    fig, ax = plt.subplots(figsize=(6.4, 1.6 + 0.6 * len(names)))
    left = np.zeros(len(names))
    for key, color in parts:
        vals = np.array([100 * quadrants[n][key] for n in names])
        ax.barh(names, vals, left=left, color=color, label=key.replace("_", " "))
        for i, v in enumerate(vals):
            if v >= 4:
                ax.text(left[i] + v / 2, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white")
        left += vals
    ax.set_xlim(0, 100)
    ax.set_xlabel("evaluation images (%)  — early exit vs INT8 full depth")
    ax.set_title(title, fontsize=10, pad=24)
    ax.legend(ncol=4, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pareto(sweeps: dict[str, dict], path: Path, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for name, s in sweeps.items():
        pts = sorted(s["points"], key=lambda p: p["relative_flops"])
        (line,) = ax.plot([100 * p["relative_flops"] for p in pts], [100 * p["acc_ee"] for p in pts], marker=".",
                          label=f"{name}: early exit, tau0 sweep")
        color = line.get_color()
        if s.get("operating") is not None:
            op = s["operating"]
            ax.scatter([100 * op["relative_flops"]], [100 * op["acc_ee"]], marker="*", s=180, zorder=5, color=color,
                       edgecolor="black", label=f"{name}: calibrated operating point")
        if s.get("acc_full") is not None:
            ax.scatter([100.0], [100 * s["acc_full"]], marker="s", s=50, zorder=5, color=color, edgecolor="black",
                       label=f"{name}: INT8 full depth")
    ax.set_xlabel("mean FLOPs (% of INT8 full depth, overhead included)")
    ax.set_ylabel("top-1 accuracy (%)")
    return _finish(fig, ax, path, title)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v)))


def _fmt(v, pct=True, digits=2):
    if _missing(v):
        return "–"
    return f"{100 * v:.{digits}f}%" if pct else f"{v:.{digits}f}"


def _pp(v, ci=None) -> str:
    if _missing(v):
        return "–"
    out = f"{100 * v:+.2f}"
    if ci and not _missing(ci[0]) and not _missing(ci[1]):
        out += f" [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"
    return out


def _section(r, name: str):
    """An optional section of a report (None when this kind of report has none: a model-directory evaluation
    has no seeds, ablations or schemes)."""
    return getattr(r, name, None)


def split_sentence(r) -> str:
    """Calibration / evaluation sizes, saying "disjoint" only when it was checked."""
    check = r.split_check or {}
    if check.get("checked"):
        how = check.get("method", "checked")
        excluded = check.get("n_excluded")
        extra = f", {excluded} calibration images left out" if excluded else ""
        disjoint = f"disjoint — checked: {how}{extra}"
    else:
        disjoint = f"disjointness NOT checked: {check.get('reason', 'no record of the calibration images')}"
    return (f"Calibration images: {r.n_calibration}, evaluation images: {r.n_eval} ({disjoint}); "
            f"seeds {r.seeds}; unreadable images skipped: {r.n_skipped or 0}.")


def controls_markdown(controls: dict) -> list[str]:
    """The controls as one table, with 95% CIs (paired bootstrap; for the random gate the spread of
    its random draws)."""
    from .controls import table_rows

    rows = table_rows(controls)
    if not rows:
        return []
    lines = ["| control | scheme | setting | top-1 | Δ vs reference, pp (95% CI) | rescued / hurt | FLOPs saved | "
             "reference | note |", "|---|---|---|---|---|---|---|---|---|"]
    for w in rows:
        rh = "–" if w["rescued"] is None else f"{_fmt(w['rescued'], digits=1)} / {_fmt(w['hurt'], digits=1)}"
        lines.append(f"| {w['control']} | {w['scheme']} | {w['setting']} | {_fmt(w['top1'])} | "
                     f"{_pp(w['delta'], w['ci95'])} | {rh} | {_fmt(w['flops_saving'], digits=1)} | "
                     f"{w['reference']} | {w['note']} |")
    return lines


def _quadrant_lines(r) -> list[str]:
    q = r.quadrants
    lines = ["| | both right | rescued (EE right, full wrong) | hurt (EE wrong, full right) | both wrong |",
             "|---|---|---|---|---|",
             f"| all | {_fmt(q['both_right'])} | {_fmt(q['rescued'])} | {_fmt(q['hurt'])} | {_fmt(q['both_wrong'])} |"]
    for name, g in (r.quadrants_by_exit or {}).items():
        lines.append(f"| {name} ({_fmt(g['fraction'], digits=1)} of images) | {_fmt(g['both_right'])} | "
                     f"{_fmt(g['rescued'])} | {_fmt(g['hurt'])} | {_fmt(g['both_wrong'])} |")
    return lines + ["", "Rows \"exited\" / \"continued\": samples that left at an early exit / ran all blocks, "
                        "as fractions of all evaluation images. A continued sample ran the same blocks under both "
                        "systems, so rescued or hurt there comes from the batch it shared (batch-dependent "
                        "quantization), not from the exit.", ""]


def _seed_lines(per_seed) -> list[str]:
    lines = ["| seed | exit layers | tau0 | INT8 full | INT8 + EE | Δ | FLOPs saved | sim = executor |",
             "|---|---|---|---|---|---|---|---|"]
    for s in per_seed:
        chk = s.executor_check or {}
        tau = "no early exit" if s.no_early_exit else s.tau0
        lines.append(f"| {s.seed} | {s.exit_layers} | {tau} | {_fmt(s.acc_full)} | {_fmt(s.acc_ee)} | "
                     f"{_pp(s.delta)} pp | {_fmt(s.flops_saving)} | "
                     f"{_fmt(chk.get('prediction_agreement'), digits=1)} |")
    return lines + [""]


def markdown(report, plots: dict[str, str]) -> str:
    """``report.md`` of an ``ExperimentReport`` / ``DemoReport`` / ``ModelEvaluationReport``: the numbers and the
    pictures a reader of the paper would look for."""
    r = report
    lines = [f"# LRA-EE report — {r.model} ({r.weights} weights)", ""]
    if _section(r, "note"):
        lines += [f"> {r.note}", ""]
    for flag in r.flags or []:
        lines += [f"> **Flag:** {flag}", ""]
    lines += [f"Data: {r.data}. Scheme: **{r.scheme}**. Target: {r.target}.", "", split_sentence(r), ""]
    b = r.executor_batches or {}
    how = (f"through the executor (`classify`), {b.get('n_batches')} recorded batches of {b.get('batch_size')} "
           f"({b.get('order')}, seed {b.get('seed')}, digest {b.get('digest')}); INT8 full depth = the disabled policy "
           f"on the same batches") if r.measured_by == "executor" else "from exit tables (simulation)"
    lines += ["## Accuracy and FLOPs (evaluation split)", "", f"Measured {how}.", "",
              "| | top-1 | top-5 | mean GFLOPs / image |", "|---|---|---|---|",
              f"| FP32 | {_fmt(r.acc_fp32)} | {_fmt(r.top5_fp32)} | – |",
              f"| INT8 full depth | {_fmt(r.acc_full)} | {_fmt(r.top5_full)} | {r.flops_full / 1e9:.3f} |",
              f"| INT8 + LRA-EE | {_fmt(r.acc_ee)} | {_fmt(r.top5_ee)} | {r.flops_ee / 1e9:.3f} |", "",
              f"Δ top-1 (LRA-EE − INT8 full): **{_pp(r.delta)} pp**, paired bootstrap 95% CI "
              f"[{_pp(r.delta_ci95[0])}, {_pp(r.delta_ci95[1])}] pp; "
              f"FLOPs saved: **{_fmt(r.flops_saving)}** (exit heads and gates included); "
              f"McNemar p (rescued vs hurt, exact) = {r.mcnemar_p:.3g}.", ""]
    over_seeds = _section(r, "over_seeds")
    if over_seeds:
        lines += ["Over calibration seeds (mean ± std): " + ", ".join(
            f"{k} {100 * v['mean']:.2f} ± {100 * v['std']:.2f}%" for k, v in over_seeds.items()) + ".", ""]
    per_seed = _section(r, "per_seed")
    if per_seed:
        lines += ["### Per seed", ""] + _seed_lines(per_seed)
    lines += ["## Four quadrants (vs INT8 full depth, per-sample correctness against the target)", ""]
    lines += _quadrant_lines(r)
    q = r.quadrants
    lines += [f"Identity check: acc_EE − acc_full = {100 * r.delta:+.3f} pp = rescued − hurt = "
              f"{100 * (q['rescued'] - q['hurt']):+.3f} pp.", ""]
    if "quadrants" in plots:
        lines += [f"![quadrants]({plots['quadrants']})", ""]
    if r.controls:
        lines += ["## Controls: would they confirm or refute the rescue effect?", ""] + controls_markdown(r.controls)
        lines += ["", "Early-exit rows are ordered by the scheme's NSR after the last block (FP32 = 0): if "
                  "rescued − hurt does not grow with the noise, the effect is not quantization collapse. Static "
                  "exit, oracle, random gate and head confound are computed on the exit tables of the first seed's "
                  "evaluation split; batch sensitivity runs the executor.", ""]
    schemes = _section(r, "schemes")
    if schemes:
        lines += ["## Schemes: the paper's INT8, a better quantizer, and early exit on each", "",
                  "| scheme | FP32 | INT8 full | INT8 + EE | Δ (95% CI) | rescued | hurt | FLOPs saved | final NSR |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, s in schemes.items():
            lines.append(f"| {name} | {_fmt(s.get('acc_fp32'))} | {_fmt(s['acc_full'])} | {_fmt(s['acc_ee'])} | "
                         f"{_pp(s['delta'], s['delta_ci95'])} | {_fmt(s['quadrants']['rescued'])} | "
                         f"{_fmt(s['quadrants']['hurt'])} | {_fmt(s['flops_saving'])} | "
                         f"{_fmt(s['nsr_per_layer'][-1], digits=1)} |")
        lines.append("")
    lines += ["## QIRC: noise-to-signal ratio per layer", ""]
    if "qirc" in plots:
        lines += [f"![QIRC]({plots['qirc']})", ""]
    if r.nsr_per_layer:
        lines += ["NSR after each block (report's scheme): "
                  + ", ".join(f"{100 * v:.1f}%" for v in r.nsr_per_layer), ""]
    tau = "no early exit" if r.no_early_exit else r.tau0
    lines += ["## Exits", "",
              f"Exit layers {r.exit_layers}, INR {[round(v, 2) for v in r.inr_per_exit or []]}, "
              f"thresholds {[round(v, 3) for v in r.thresholds]} (tau0 = {tau}, alpha = {r.alpha}).", ""]
    if "exit_histogram" in plots:
        lines += [f"![exit histogram]({plots['exit_histogram']})", ""]
    if "pareto" in plots:
        lines += ["## Accuracy vs FLOPs (simulated on exit tables)", "", f"![pareto]({plots['pareto']})", ""]
    ablations = _section(r, "ablations")
    if ablations:
        lines += ["## Ablations (each re-calibrated on the calibration split; simulated on exit tables)", "",
                  "| variant | top-1 EE | Δ vs full | FLOPs saved |", "|---|---|---|---|"]
        for name, a in ablations.items():
            lines.append(f"| {name} | {_fmt(a['acc_ee'])} | {100 * a['delta']:+.2f} pp | {_fmt(a['flops_saving'])} |")
        lines.append("")
    alpha_sweep = _section(r, "alpha_sweep")
    if alpha_sweep:
        lines += ["Alpha sweep (0 = flat threshold): " + "; ".join(
            f"α={a['alpha']}: {_fmt(a['acc_ee'])}, saved {_fmt(a['flops_saving'])}"
            for a in alpha_sweep) + ".", ""]
    if r.executor_check:
        e = r.executor_check
        verdict = ("exact: the simulation is what the executor does" if e.get("exact") else
                   "NOT exact: the numbers above are the executor's; simulated ones (ablations, sweeps, table "
                   "controls) are approximations")
        lines += [f"Simulation check ({e.get('scope', 'evaluation images')}; {e['n']} images of the first seed): the "
                  f"exit-table simulation agreed with the executor on {_fmt(e['exit_layer_agreement'])} of exit "
                  f"layers, "
                  f"{_fmt(e['prediction_agreement'])} of predictions and {_fmt(e.get('full_depth_agreement'))} of "
                  f"full-depth predictions — {verdict}.", ""]
    throughput = _section(r, "throughput")
    if throughput:
        t = throughput
        lines += [f"## Throughput ({t.get('device')}, batch {t.get('batch_size')}, {t.get('threads')} threads)", "",
                  "| | img/s |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in t["img_per_s"].items()] + [""]
    return "\n".join(lines)


def write_report(out_dir: str | Path, report, qirc_curves: dict[str, list[float]] | None = None,
                 quadrants: dict[str, dict] | None = None, sweeps: dict[str, dict] | None = None) -> dict[str, Path]:
    """Write ``report.json`` (``report.to_dict()``), the plots and ``report.md`` of a typed report into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label = f"{report.model}, {report.weights} weights"
    plots: dict[str, str] = {}
    curves = qirc_curves or {report.scheme: report.nsr_per_layer}
    plots["qirc"] = plot_qirc(curves, out / "qirc_nsr.png", f"QIRC: NSR per layer ({label})").name
    plots["exit_histogram"] = plot_exit_histogram(report.exit_histogram, out / "exit_histogram.png",
                                                  f"exits, {report.scheme} ({label})").name
    plots["quadrants"] = plot_quadrants(quadrants or {report.scheme: report.quadrants}, out / "quadrants.png",
                                        f"four quadrants ({label})").name
    tau0_sweep = _section(report, "tau0_sweep")
    if sweeps or tau0_sweep:
        operating = {"relative_flops": 1 - report.flops_saving, "acc_ee": report.acc_ee}
        sw = sweeps or {report.scheme: {**tau0_sweep, "acc_full": report.acc_full, "operating": operating}}
        plots["pareto"] = plot_pareto(sw, out / "pareto.png", f"accuracy vs FLOPs ({label})").name
    files = {k: out / v for k, v in plots.items()}
    files["json"] = write_json(out / "report.json", report.to_dict())
    (out / "report.md").write_text(markdown(report, plots))
    files["md"] = out / "report.md"
    return files
