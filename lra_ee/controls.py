"""Controls: the experiments that would confirm or refute the rescue effect.

All on the evaluation split of the first seed, against the same target as the method:

- ``fp32_early_exit``: the whole method (gates, INR thresholds, tau0) on the FP32 tower. If FP32
  also "rescues", early exit helps because deep layers overthink, not because INT8 collapses.
- ``static_exit``: everyone leaves after block l (no gate).
- ``oracle``: the best any gate could do — a sample counts as right when any exit it could take is.
- ``random_gate``: the calibrated gate's exit histogram, dealt out at random: the noise floor of
  rescued - hurt.
- ``head_confound``: the patch-mean head after the last block against the model's own head; part
  of a "rescue" may be the head, not the exit.
- ``batch_sensitivity`` (``lra_ee.measure``): the paper's scheme through the executor at several
  batch sizes and orders.

Table-based controls (all but the last) use the exit tables; for a batch-dependent scheme those
are a simulation (the report says how well it matched the executor).
"""

from __future__ import annotations

import numpy as np

from . import stats
from .exits import ExitTable, simulate
from .method import evaluate, fit_policy, policy_scores

QUADRANT_KEYS = ("rescued", "hurt")


def compare(a_right: np.ndarray, b_right: np.ndarray, n_boot: int, seed: int) -> dict:
    """A against B on the same samples: accuracies, delta (= rescued - hurt) with its paired bootstrap
    95% CI, rescued / hurt fractions and McNemar's p."""
    q = stats.quadrants(a_right, b_right)
    boot = stats.paired_bootstrap(a_right, b_right, n_boot=n_boot, seed=seed)
    return {"acc": float(np.mean(a_right)), "acc_reference": float(np.mean(b_right)), "delta": q.rescued - q.hurt,
            "delta_ci95": boot["delta_ci"], "rescued": q.rescued, "hurt": q.hurt,
            "mcnemar_p": stats.mcnemar(round(q.rescued * q.n), round(q.hurt * q.n)), "n": q.n}


def static_exit(t: ExitTable, y: np.ndarray, fm, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per candidate exit layer: everyone leaves there (the exit head, no gate) vs full depth."""
    full_right = t.top5[-1, :, 0] == y
    out = {}
    for j, layer in enumerate(t.exit_layers):
        flops = fm.embed + layer * fm.block + fm.exit_head
        out[int(layer)] = {**compare(t.top5[j, :, 0] == y, full_right, n_boot, seed),
                           "flops_saving": 1.0 - flops / fm.full()}
    return out


def oracle(t: ExitTable, y: np.ndarray, layers, fm, n_boot: int = 1000, seed: int = 0) -> dict:
    """Upper bounds on rescue: ``per_layer[l]``: one exit at l that a perfect gate uses only when it is
    right and full depth is wrong; ``exit_set``: a perfect gate over all of ``layers`` (leaving at the
    first exit that is right, else running to full depth)."""
    import torch

    per_layer = {}
    full_right = t.top5[-1, :, 0] == y
    for j, layer in enumerate(t.exit_layers):
        per_layer[int(layer)] = compare((t.top5[j, :, 0] == y) | full_right, full_right, n_boot, seed)
    tt = t.restrict(tuple(layers))
    right = tt.top5[:-1, :, 0] == y[None]
    first = np.where(right.any(0), right.argmax(0), len(layers))
    exit_layer = np.asarray(tt.layers)[first]
    per = fm.per_sample(torch.from_numpy(exit_layer.astype(np.int64)), tuple(layers)).double()
    exit_set = {**compare(right.any(0) | full_right, full_right, n_boot, seed), "layers": [int(x) for x in layers],
                "flops_saving": 1.0 - float(per.mean()) / fm.full()}
    return {"per_layer": per_layer, "exit_set": exit_set}


def random_gate(t: ExitTable, y: np.ndarray, policy, n_draws: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """The gate's exit histogram on this table, dealt out at random ``n_draws`` times: where
    rescued - hurt lands when the choice of who leaves carries no information."""
    tt = t.restrict(policy.exit_layers)
    sim = simulate(tt, policy_scores(policy, t), policy.threshold.numpy())
    slot = {layer: i for i, layer in enumerate(tt.layers)}
    first = np.array([slot[int(v)] for v in sim.exit_layer], dtype=np.int64)
    right = tt.top5[:, :, 0] == y[None]  # [L + 1, N]
    full = right[-1].mean()
    n = y.size
    cols = np.arange(n)
    gate = float(right[first, cols].mean() - full)
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, n_draws, 64):
        perm = np.stack([rng.permutation(first) for _ in range(min(64, n_draws - start))])
        draws.append(right[perm, cols[None]].mean(1) - full)
    draws = np.concatenate(draws)
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return {"n_draws": int(n_draws), "gate_rescued_minus_hurt": gate, "random_mean": float(draws.mean()),
            "random_ci95": [float(np.quantile(draws, lo)), float(np.quantile(draws, hi))],
            "p_value": float((1 + (draws >= gate - 1e-12).sum()) / (n_draws + 1)),
            "exit_histogram": {int(v): float((sim.exit_layer == v).mean()) for v in tt.layers}, "n": int(n)}


def head_confound(t: ExitTable, y: np.ndarray, n_boot: int = 1000, seed: int = 0,
                  ee_rescued: np.ndarray | None = None) -> dict:
    """The patch-mean head after the last block against the model's own head (CLS for ViT-B/32).
    ``ee_rescued``: which samples early exit rescued (same rows); the share of them the patch-mean
    head at full depth gets right too is the part of the rescue the head alone could explain."""
    if t.depth_patch_top5 is None:
        raise ValueError("this exit table holds no patch-mean head at full depth")
    own = t.top5[-1, :, 0] == y
    patch = t.depth_patch_top5[:, 0] == y
    out = compare(patch, own, n_boot, seed)
    out = {"acc_own_head": out.pop("acc_reference"), "acc_patch_mean_at_depth": out.pop("acc"), **out}
    if ee_rescued is not None:
        r = np.asarray(ee_rescued, dtype=bool)
        out["ee_rescued"] = int(r.sum())
        out["ee_rescued_also_by_patch_mean_at_depth"] = float(patch[r].mean()) if r.any() else None
    return out


def fp32_early_exit(calib: ExitTable, evalt: ExitTable, *, arch, num_classes: int, exit_layers="auto",
                    alpha: float = 1.0, tau0: float | None = None, flops_budget: float | None = None,
                    target: str = "labels", n_boot: int = 1000, seed: int = 0) -> dict:
    """The method on FP32 exit tables: gates, thresholds and tau0 fitted on the calibration split
    exactly as for INT8; the FP32 tower has no quantization noise, so NSR = 0 (floored at 1e-6 in
    INR: the thresholds then follow the exits' accuracies alone)."""
    if target != "labels":
        return {"skipped": "needs labelled evaluation images (against the FP32 prediction FP32 is always right)"}
    nsr = [0.0] * (calib.depth + 1)
    policy, rep = fit_policy(calib, nsr, scheme="fp32", arch=arch, num_classes=num_classes, exit_layers=exit_layers,
                             alpha=alpha, tau0=tau0, flops_budget=flops_budget, target=target)
    ev = evaluate(evalt, policy, arch, num_classes, n_boot=n_boot, seed=seed, target=target)
    return {"exit_layers": list(policy.exit_layers), "tau0": rep.tau0, "thresholds": rep.thresholds,
            "no_early_exit": rep.no_early_exit, "acc_full": ev.acc_full, "acc_ee": ev.acc_ee, "delta": ev.delta,
            "delta_ci95": ev.delta_ci95, "rescued": ev.quadrants["rescued"], "hurt": ev.quadrants["hurt"],
            "mcnemar_p": ev.mcnemar_p, "flops_saving": ev.flops_saving, "exit_histogram": ev.exit_histogram,
            "quadrants_by_exit": ev.quadrants_by_exit, "n": ev.n_eval, "measured_by": "simulation (FP32 tables)"}


def table_controls(t: ExitTable, y: np.ndarray, policy, run, fm, scheme: str, n_boot: int = 1000, seed: int = 0,
                   random_gate_draws: int = 1000) -> dict:
    """The table-based controls of one scheme on the evaluation table ``t`` (targets ``y``), keyed by scheme
    inside each control. ``run``: the executor's run of the same images (``lra_ee.measure.ExecutorRun``), which
    says which samples early exit rescued (for the head confound)."""
    rescued = np.zeros(t.n, dtype=bool)
    rows = t.rows_of(run.index)
    rescued[rows] = (run.top5["ee"][:, 0] == y[rows]) & (run.top5["full"][:, 0] != y[rows])
    return {
        "static_exit": {scheme: {"policy_layers": list(policy.exit_layers),
                                 "layers": static_exit(t, y, fm, n_boot, seed)}},
        "oracle": {scheme: oracle(t, y, policy.exit_layers, fm, n_boot, seed)},
        "random_gate": {scheme: random_gate(t, y, policy, random_gate_draws, seed)},
        "head_confound": {scheme: head_confound(t, y, n_boot, seed, rescued)},
    }


def nsr_entry(scheme: str, final_nsr: float, ev: dict, measured_by: str) -> dict:
    """One line of ``rescued_minus_hurt_by_nsr``."""
    return {"scheme": scheme, "final_nsr": float(final_nsr), "acc_full": ev["acc_full"], "acc_ee": ev["acc_ee"],
            "rescued": ev["rescued"], "hurt": ev["hurt"], "rescued_minus_hurt": ev["rescued"] - ev["hurt"],
            "ci95": ev["delta_ci95"], "flops_saving": ev["flops_saving"], "measured_by": measured_by}


def merge_controls(per_scheme: list[dict]) -> dict:
    """One ``controls`` section from several schemes' (each keyed by scheme inside every control);
    ``fp32_early_exit`` is scheme-independent (the first one is kept), the NSR ordering is redone."""
    out: dict = {}
    for c in per_scheme:
        for name, value in c.items():
            if name == "fp32_early_exit":
                out.setdefault(name, value)
            elif name == "rescued_minus_hurt_by_nsr":
                seen = {e["scheme"] for e in out.get(name, [])}
                out.setdefault(name, []).extend(e for e in value if e["scheme"] not in seen)
            elif isinstance(value, dict):
                out.setdefault(name, {}).update(value)
            else:
                out.setdefault(name, value)
    if "rescued_minus_hurt_by_nsr" in out:
        out["rescued_minus_hurt_by_nsr"].sort(key=lambda e: e["final_nsr"])
    return out


def _row(control, scheme, setting, top1, d, note="", reference=None):
    return {"control": control, "scheme": scheme, "setting": setting, "top1": top1, "delta": d.get("delta"),
            "ci95": d.get("delta_ci95"), "rescued": d.get("rescued"), "hurt": d.get("hurt"),
            "flops_saving": d.get("flops_saving"), "note": note, "reference": reference}


def table_rows(controls: dict, exit_layers: dict[str, list[int]] | None = None) -> list[dict]:
    """The controls as rows of one table (report.md, README). ``exit_layers[scheme]``: the layers
    whose static-exit and oracle rows are shown (default: each scheme's policy layers, recorded)."""
    rows = []
    f = controls.get("fp32_early_exit") or {}
    for e in controls.get("rescued_minus_hurt_by_nsr", []):
        note = e["measured_by"]
        if e["scheme"] == "fp32" and "acc_ee" in f:  # the fp32_early_exit control
            note += f"; exits {f['exit_layers']}, " + ("no early exit" if f["no_early_exit"] else f"tau0 {f['tau0']:g}")
        rows.append(_row("early exit (LRA-EE)" if e["scheme"] != "fp32" else "fp32_early_exit", e["scheme"],
                         f"final NSR {100 * e['final_nsr']:.1f}%", e["acc_ee"],
                         {"delta": e["rescued_minus_hurt"], "delta_ci95": e["ci95"], **e}, note, "full depth"))
    for scheme, per in controls.get("static_exit", {}).items():
        shown = (exit_layers or {}).get(scheme) or per.get("policy_layers", [])
        for layer in shown:
            d = per["layers"][str(layer)] if str(layer) in per["layers"] else per["layers"][layer]
            rows.append(_row("static_exit", scheme, f"all leave after block {layer}", d["acc"], d, "", "full depth"))
    for scheme, o in controls.get("oracle", {}).items():
        e = o["exit_set"]
        rows.append(_row("oracle", scheme, f"best of exits {e['layers']} or full", e["acc"], e, "upper bound",
                         "full depth"))
    for scheme, g in controls.get("random_gate", {}).items():
        d = {"delta": g["random_mean"], "delta_ci95": g["random_ci95"]}
        rows.append(_row("random_gate", scheme, "gate's histogram, random choice", None, d,
                         f"the gate on the same tables {100 * g['gate_rescued_minus_hurt']:+.2f} pp, "
                         f"p = {g['p_value']:.3g}", "full depth"))
    for scheme, h in controls.get("head_confound", {}).items():
        also = h.get("ee_rescued_also_by_patch_mean_at_depth")
        note = "" if also is None else f"{100 * also:.0f}% of EE-rescued also right"
        rows.append(_row("head_confound", scheme, "patch mean at full depth", h["acc_patch_mean_at_depth"], h, note,
                         "own head"))
    for scheme, b in controls.get("batch_sensitivity", {}).items():
        for name, r in b["runs"].items():
            agree = r.get("agreement_with_batch_1")
            note = f"INT8 full {100 * r['acc_full']:.1f}%" + (
                f"; {100 * agree['ee_prediction']:.1f}% of EE predictions as at batch 1" if agree else "")
            rows.append(_row("batch_sensitivity", scheme, name.replace("_", " "), r["acc_ee"], r, note,
                             "full depth, same batches"))
    return rows
