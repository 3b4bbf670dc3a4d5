"""Calibration (gates, INR, thresholds) and evaluation (accuracy, FLOPs, quadrants, statistics).

All decisions are made on the calibration split; the evaluation split is only measured.
"""

from __future__ import annotations

import numpy as np
import torch

from lra_kernels import ExitPolicy
from lra_kernels.flops import flops_model
from lra_kernels.names import GATE_FEATURES, N_FEATURES
from lra_kernels.policy import check_exit_layers

from . import stats
from .exits import ExitTable, simulate
from .gate import NO_EXIT, GateFit, gate_scores, inr, thresholds, train_gate, uses_only_label_free_features
from .results import CalibrationReport, EvalReport

PAPER_EXITS = {"ViT-B-32": (8, 10, 11)}  # the paper's exits for ViT-B/32 (blocks run before each exit)
TAU0_GRID = np.round(np.linspace(0.05, 1.0, 96), 4)
# What tau0 may be chosen from: "no early exit" (NO_EXIT, first, so it wins ties with thresholds
# that let nobody leave) and the grid.
TAU0_CANDIDATES = (NO_EXIT, *(float(t) for t in TAU0_GRID))


def resolve_exit_layers(spec, depth: int) -> tuple[int, ...] | None:
    """``"auto"`` -> None (chosen by INR), ``"paper"`` -> the paper's (8, 10, 11), or explicit layers."""
    if spec in (None, "auto"):
        return None
    if spec == "paper":
        layers = PAPER_EXITS["ViT-B-32"]
        if depth != 12:
            raise ValueError(f"the paper's exit preset (8, 10, 11) is for 12-block ViT-B/32, "
                             f"this tower has {depth} blocks")
        return layers
    if isinstance(spec, str):
        spec = [int(x) for x in spec.split(",") if x.strip()]
    layers = check_exit_layers(spec, depth)
    if not layers:
        raise ValueError(f"exit layers must be a non-empty set within 1..{depth - 1}, got {spec}")
    return layers


def _policy(fits: list[GateFit], layers, taus, head, meta=None) -> ExitPolicy:
    return ExitPolicy(
        exit_layers=tuple(layers),
        weight=torch.tensor(np.stack([f.weight for f in fits]), dtype=torch.float32),
        bias=torch.tensor([f.bias for f in fits], dtype=torch.float32),
        feature_mean=torch.tensor(np.stack([f.mean for f in fits]), dtype=torch.float32),
        feature_std=torch.tensor(np.stack([f.std for f in fits]), dtype=torch.float32),
        threshold=torch.tensor(np.asarray(taus), dtype=torch.float32),
        head=head,
        meta=meta or {},
    )


def policy_scores(policy: ExitPolicy, table: ExitTable) -> np.ndarray:
    """Gate scores ``[L, N]`` of ``policy`` on a table holding (at least) its exit layers, computed
    exactly as the executor does (``ExitPolicy.gate_scores`` in fp32)."""
    t = table.restrict(policy.exit_layers)
    feats = torch.from_numpy(np.ascontiguousarray(t.features)).float()
    if not policy.enabled:
        return np.zeros((0, t.n))
    return np.stack([policy.gate_scores(j, feats[j]).numpy() for j in range(len(policy.exit_layers))])


def _choose_exits(acc: dict, nsr: dict, candidates, depth: int, inr_floor: float | None, max_exits: int):
    """Default exit layers: in the deeper half, INR at least the floor (default: the full depth's
    own INR, acc_full / NSR_depth), the ``max_exits`` highest-INR ones."""
    values = {layer: float(inr(acc[layer], nsr[layer])) for layer in candidates}
    floor = float(inr(acc[depth], nsr[depth])) if inr_floor is None else float(inr_floor)
    ok = [layer for layer in candidates if layer >= (depth + 1) // 2 and values[layer] >= floor]
    if not ok:  # nothing clears the floor: the deepest candidates, so early exit stays conservative
        ok = sorted(candidates)[-max_exits:]
    best = sorted(ok, key=lambda layer: values[layer], reverse=True)[:max_exits]
    return tuple(sorted(best))


def fit_policy(
    table: ExitTable,
    nsr_per_layer: list[float],
    *,
    scheme: str = "per_token",
    arch=None,
    num_classes: int | None = None,
    exit_layers="auto",
    target: str | None = None,
    alpha: float = 1.0,
    tau0: float | None = None,
    flops_budget: float | None = None,
    features: tuple[int, ...] = tuple(range(N_FEATURES)),
    inr_floor: float | None = None,
    max_exits: int = 3,
) -> tuple[ExitPolicy, CalibrationReport]:
    """Train the gates, compute INR and thresholds, choose ``tau0`` on the calibration ``table``.

    ``flops_budget``: the largest mean FLOPs allowed, as a fraction of the full-depth INT8 model
    (e.g. 0.9); ``tau0`` then maximises accuracy within it. ``nsr_per_layer[l]`` is the QIRC NSR
    after ``l`` blocks.
    """
    depth = table.depth
    target_kind = target or ("labels" if (table.labels >= 0).all() else "fp32")
    y = table.target(target_kind)
    correct_all = table.correct(y)
    acc = {layer: float(correct_all[i].mean()) for i, layer in enumerate(table.layers)}
    nsr = {layer: float(nsr_per_layer[layer]) for layer in table.layers}
    layers = (resolve_exit_layers(exit_layers, depth)
              or _choose_exits(acc, nsr, table.exit_layers, depth, inr_floor, max_exits))
    t = table.restrict(layers)
    correct = t.correct(y)
    fits = [train_gate(t.features[j], correct[j], use=features) for j in range(len(layers))]
    scores = np.stack([gate_scores(f, t.features[j]) for j, f in enumerate(fits)])
    inr_exits = np.array([inr(acc[layer], nsr[layer]) for layer in layers])

    fm = flops_model(arch, num_classes or int(table.top5.max()) + 1, table.head) if arch is not None else None
    full_flops = fm.full() if fm else None

    def evaluate_tau0(tau):
        taus = thresholds(tau, inr_exits, alpha)
        sim = simulate(t, scores, taus)
        acc_ee = float((sim.top5[:, 0] == y).mean())
        saving = 0.0
        if fm:
            per = fm.per_sample(torch.from_numpy(sim.exit_layer), tuple(layers)).double()
            saving = 1.0 - float(per.mean()) / full_flops
        return taus, acc_ee, saving

    search = []
    if tau0 is None:
        best = None
        for tau in TAU0_CANDIDATES:
            taus, acc_ee, saving = evaluate_tau0(float(tau))
            search.append({"tau0": float(tau), "acc": acc_ee, "flops_saving": saving})
            if flops_budget is not None and (1.0 - saving) > flops_budget + 1e-12:
                continue
            key = (acc_ee, saving)
            if best is None or key > best[0]:
                best = (key, float(tau))
        if best is None:
            raise ValueError(f"no threshold meets the FLOPs budget {flops_budget} on the calibration split")
        tau0 = best[1]
    taus, acc_ee, saving = evaluate_tau0(float(tau0))
    no_exit = float(tau0) > 1.0
    meta = {"scheme": scheme, "alpha": alpha, "tau0": float(tau0), "target": target_kind,
            "features": [GATE_FEATURES[i] for i in features], "no_early_exit": no_exit,
            # exit decisions that do not read the classifier hold for any label set (the threshold was
            # still chosen for this one's accuracy; docs/serving.md measures unseen label sets)
            "label_agnostic": uses_only_label_free_features(features)}
    policy = _policy(fits, layers, taus, table.head, meta=meta)
    report = CalibrationReport(
        scheme=scheme, target=target_kind, n_calibration=table.n, candidate_layers=list(table.exit_layers),
        acc_per_layer=acc, nsr_per_layer=nsr,
        inr_per_layer={layer: float(inr(acc[layer], nsr[layer])) for layer in table.layers},
        exit_layers=list(layers), inr_per_exit=inr_exits.tolist(), features=[GATE_FEATURES[i] for i in features],
        gates=[{"weight": f.weight.tolist(), "bias": f.bias, "feature_mean": f.mean.tolist(),
                "feature_std": f.std.tolist(),
                "positive_rate": f.positive_rate, "log_loss": f.log_loss, "n": f.n} for f in fits],
        alpha=float(alpha), tau0=float(tau0), thresholds=[float(x) for x in taus], head=table.head,
        calib_acc_full=acc[depth], calib_acc_ee=acc_ee, calib_flops_saving=saving, flops_budget=flops_budget,
        tau0_search=search, no_early_exit=no_exit,
    )
    return policy, report


def _fractions(q: stats.Quadrants) -> dict[str, float]:
    return {k: getattr(q, k) for k in ("both_right", "rescued", "hurt", "both_wrong")}


def quadrants_by_exit(ee_right: np.ndarray, full_right: np.ndarray, exit_layer: np.ndarray, depth: int) -> dict:
    """The four quadrants split by where each sample left, as fractions of all samples (the two
    groups add up to the overall quadrants). Among "continued" samples early exit and full depth
    ran the same blocks: any rescued or hurt there is the batch's doing, not the exit's."""
    n = ee_right.size
    out = {}
    for name, m in (("exited", exit_layer < depth), ("continued", exit_layer >= depth)):
        c = stats.cell_counts(ee_right[m], full_right[m])
        out[name] = {"n": int(m.sum()), "fraction": float(m.mean()),
                     **{k: float(v) / n for k, v in zip(("both_right", "rescued", "hurt", "both_wrong"), c)}}
    return out


def evaluate_outcomes(y: np.ndarray, ee_top5: np.ndarray, full_top5: np.ndarray, exit_layer: np.ndarray,
                      policy: ExitPolicy, arch, num_classes: int, *, target: str, fp32_top5: np.ndarray | None = None,
                      n_boot: int = 2000, seed: int = 0, n_skipped: int = 0,
                      measured_by: str = "simulation") -> EvalReport:
    """Accuracy, quadrants, statistics, FLOPs and exit histogram from per-sample outcomes:
    ``ee_top5[N, k]`` / ``exit_layer[N]`` under ``policy``, ``full_top5[N, k]`` at full depth,
    ``y[N]`` the targets (``target``: "labels" or "fp32")."""
    ee_right = ee_top5[:, 0] == y
    full_right = full_top5[:, 0] == y
    has_fp32 = fp32_top5 is not None and target == "labels"
    fp32_right = (fp32_top5[:, 0] == y) if has_fp32 else None
    boot = stats.paired_bootstrap(ee_right, full_right, n_boot=n_boot, seed=seed)
    q = stats.quadrants(ee_right, full_right)
    q_fp32 = stats.quadrants(ee_right, fp32_right) if has_fp32 else None
    n = y.size
    fm = flops_model(arch, num_classes, policy.head)
    per = fm.per_sample(torch.from_numpy(np.asarray(exit_layer, dtype=np.int64)), policy.exit_layers).double()
    hist = {int(layer): float((exit_layer == layer).mean()) for layer in (*policy.exit_layers, fm.depth)}

    def top5(pred):
        return float((pred == y[:, None]).any(1).mean())

    return EvalReport(
        n_eval=n, target=target,
        acc_fp32=float(fp32_right.mean()) if has_fp32 else None,
        acc_full=float(full_right.mean()), acc_ee=float(ee_right.mean()),
        top5_fp32=top5(fp32_top5) if has_fp32 else None, top5_full=top5(full_top5), top5_ee=top5(ee_top5),
        delta=float(ee_right.mean() - full_right.mean()), delta_ci95=boot["delta_ci"],
        acc_full_ci95=boot["acc_b_ci"], acc_ee_ci95=boot["acc_a_ci"],
        quadrants=_fractions(q), quadrants_vs_fp32=_fractions(q_fp32) if q_fp32 else None,
        mcnemar_p=stats.mcnemar(round(q.rescued * n), round(q.hurt * n)),
        mcnemar_p_vs_fp32=stats.mcnemar(round(q_fp32.rescued * n), round(q_fp32.hurt * n)) if q_fp32 else None,
        exit_histogram=hist, flops_full=float(fm.full()), flops_ee=float(per.mean()),
        flops_saving=1.0 - float(per.mean()) / fm.full(), exit_layers=list(policy.exit_layers),
        thresholds=[float(x) for x in policy.threshold], n_skipped=n_skipped,
        quadrants_by_exit=quadrants_by_exit(ee_right, full_right, np.asarray(exit_layer), fm.depth),
        measured_by=measured_by,
    )


def evaluate(table: ExitTable, policy: ExitPolicy, arch, num_classes: int, n_boot: int = 2000, seed: int = 0,
             target: str | None = None) -> EvalReport:
    """Simulate ``policy`` on the evaluation ``table`` (which must hold its exit layers) and measure it."""
    target_kind = target or ("labels" if (table.labels >= 0).all() else "fp32")
    t = table.restrict(policy.exit_layers)
    sim = simulate(t, policy_scores(policy, table), policy.threshold.numpy())
    return evaluate_outcomes(table.target(target_kind), sim.top5, t.top5[-1], sim.exit_layer, policy, arch, num_classes,
                             target=target_kind, fp32_top5=t.fp32_top5, n_boot=n_boot, seed=seed,
                             n_skipped=table.n_skipped, measured_by="simulation")


def ablations(calib: dict[str, ExitTable], evalt: dict[str, ExitTable], nsr_per_layer, arch, num_classes: int,
              base: CalibrationReport, alphas=(0.0, 0.25, 0.5, 1.0, 2.0), seed: int = 0) -> dict:
    """The referee's ablations, each re-calibrated on the calibration split and measured on the evaluation split.

    drop_<feature>: the gate without that feature; cls_head: the shallow CLS token instead of the
    patch mean at the exits; flat_thresholds: alpha = 0; alpha_sweep; tau0_sweep: the
    accuracy-vs-FLOPs curve at the calibrated alpha (the operating point marked).
    """
    common = dict(arch=arch, num_classes=num_classes, exit_layers=tuple(base.exit_layers), target=base.target,
                  flops_budget=base.flops_budget, scheme=base.scheme)

    def run(head="patch_mean", **kw):
        args = {**common, "alpha": base.alpha, **kw}
        policy, rep = fit_policy(calib[head], nsr_per_layer, **args)
        ev = evaluate(evalt[head], policy, arch, num_classes, n_boot=500, seed=seed, target=base.target)
        return {"acc_ee": ev.acc_ee, "acc_full": ev.acc_full, "delta": ev.delta, "delta_ci95": ev.delta_ci95,
                "flops_saving": ev.flops_saving, "exit_histogram": ev.exit_histogram, "tau0": rep.tau0,
                "thresholds": rep.thresholds}

    out: dict = {"reference": run()}
    for k, name in enumerate(GATE_FEATURES):
        out[f"drop_{name}"] = run(features=tuple(i for i in range(N_FEATURES) if i != k))
    if "cls" in calib and "cls" in evalt:
        out["cls_head"] = run(head="cls")
    out["flat_thresholds"] = run(alpha=0.0)
    alpha_sweep = [{"alpha": float(a), **run(alpha=float(a))} for a in alphas]

    # tau0 sweep at the calibrated alpha: the Pareto curve on the evaluation split
    policy, rep = fit_policy(calib["patch_mean"], nsr_per_layer, **{**common, "alpha": base.alpha, "tau0": base.tau0})
    inr_exits = np.asarray(rep.inr_per_exit)
    curve = []
    for tau in TAU0_GRID[::3]:
        p = policy.with_thresholds(thresholds(float(tau), inr_exits, base.alpha))
        ev = evaluate(evalt["patch_mean"], p, arch, num_classes, n_boot=0, seed=seed, target=base.target)
        curve.append({"tau0": float(tau), "acc_ee": ev.acc_ee, "flops_saving": ev.flops_saving,
                      "relative_flops": 1.0 - ev.flops_saving})
    return {"ablations": out, "alpha_sweep": alpha_sweep,
            "tau0_sweep": {"alpha": base.alpha, "points": curve, "operating_tau0": base.tau0}}
