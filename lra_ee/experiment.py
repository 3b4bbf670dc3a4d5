"""One LRA-EE experiment end to end: quantize, diagnose QIRC, collect exit tables, calibrate over
several calibration seeds, measure through the real executor, ablate, run the controls.

Splits: a fixed, seeded random sample of ``n_quant_calib`` images calibrates the quantizer (static
scales, SmoothQuant), a disjoint one of ``n_qirc`` images measures QIRC (whose NSR sets the
thresholds); both belong to no split. The rest is split per seed into disjoint calibration /
evaluation parts (or the evaluation set comes as a second source, checked by content against the
calibration one).

Reported accuracy, quadrants, FLOPs and exit histograms are the executor's (``lra_ee.measure``);
the exit tables drive calibration, ablations and the table-based controls, and the report says how
exactly they matched the executor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lra_kernels import ExitPolicy, QuantEarlyExitViT
from lra_kernels.flops import flops_model
from lra_kernels.names import HEADS

from . import controls as ctl
from . import stats
from .data import HOLD_OUT_SEED, held_out, images_of, split_indices
from .exits import ExitTable, collect_fp32_table, collect_tables, simulate
from .measure import ExecutorRun, batch_plan, batch_sensitivity, run_executor, simulation_agreement
from .method import ablations, evaluate, evaluate_outcomes, fit_policy, policy_scores
from .provenance import CALIBRATION_KEY, calibration_record, exclude_images, fingerprints, with_meta
from .qirc import diagnose, fp32_reference
from .results import SEED_KEYS, CalibrationReport, EvalReport, ExperimentReport, QIRCReport, SeedSummary
from .schemes import SCHEME_HELP, check_scheme, quantize


@dataclass
class ExperimentConfig:
    scheme: str = "smoothquant"
    exit_layers: object = "auto"
    alpha: float = 1.0
    tau0: float | None = None
    flops_budget: float | None = None
    calib_fraction: float = 0.4
    seeds: tuple[int, ...] = (0, 1, 2)
    n_quant_calib: int = 32
    n_qirc: int = 32
    batch_size: int = 32
    backend: str = "auto"
    n_boot: int = 2000
    ablate: bool = True
    controls: bool = True
    random_gate_draws: int = 1000
    batch_sensitivity: bool | None = None  # None: for the paper's (batch-dependent) scheme only
    sensitivity_batch_sizes: tuple[int, ...] = (1, 32, 256)
    sensitivity_limit: int = 1024  # images of the first evaluation split run at every batch size

    def __post_init__(self):
        check_scheme(self.scheme)
        if not self.seeds:
            raise ValueError("give at least one calibration seed")
        if self.n_quant_calib < 1 or self.n_qirc < 1:
            raise ValueError(f"n_quant_calib and n_qirc must be >= 1, got {self.n_quant_calib} and {self.n_qirc}")


@dataclass
class FP32Cache:
    """What the FP32 tower gives an experiment, reusable by the next scheme on the same source and
    hold-out: its exit table of the pool (and of a separate evaluation source), its QIRC states.

    ``key`` (``fp32_cache_key``) names the tower, sources and classifier by identity and version;
    ``held`` keeps those objects alive, so that their ids cannot pass to new objects while the cache
    lives. Handed a cache of another tower, source or classifier, ``run_experiment`` recomputes."""

    key: tuple
    table: ExitTable
    eval_table: ExitTable | None = None
    qirc_reference: list | None = field(default=None, repr=False)
    held: tuple = field(default=(), repr=False)


def fp32_cache_key(visual, source, eval_source, text_features, logit_scale, sizes: tuple) -> tuple[tuple, tuple]:
    """``(key, held)`` for an ``FP32Cache``: the sizes of the split, the objects' ids, the logit scale, and
    the versions of the classifier and of the tower's parameters (an in-place change bumps them)."""
    held = (visual, source, eval_source, text_features)
    versions = (_version(text_features), tuple(_version(p) for p in visual.parameters()))
    return (*sizes, *map(id, held), float(logit_scale), versions), held


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


@dataclass
class ExperimentResult:
    report: ExperimentReport
    model: QuantEarlyExitViT
    tables: dict[str, ExitTable] = field(repr=False, default_factory=dict)
    fp32: FP32Cache | None = field(repr=False, default=None)
    quant_calibration_images: torch.Tensor | None = field(repr=False, default=None)
    qirc_images: torch.Tensor | None = field(repr=False, default=None)


def _with_fp32(table: ExitTable, fp32_table: ExitTable) -> ExitTable:
    table.fp32_top5 = fp32_table.fp32_top5[fp32_table.rows_of(table.index)]
    return table


@dataclass
class SeedRun:
    """One calibration seed: the policy fitted on its calibration split and what it measured on its evaluation split."""

    seed: int
    policy: ExitPolicy
    calibration: CalibrationReport
    evaluation: EvalReport  # through the executor (reported)
    simulated: EvalReport  # the exit-table simulation of the same split
    agreement: dict  # the simulation against the executor, sample by sample
    run: ExecutorRun
    plan: np.ndarray
    y: np.ndarray  # evaluation targets, rows of ``evalt``
    calib: dict[str, ExitTable]
    evalt: dict[str, ExitTable]
    fp32_ee: dict | None  # the FP32 early-exit control
    fp32_eval: ExitTable | None

    def summary(self) -> SeedSummary:
        ev, cal = self.evaluation, self.calibration
        return SeedSummary(seed=self.seed, **{k: getattr(ev, k) for k in SEED_KEYS}, quadrants=ev.quadrants,
                           exit_layers=cal.exit_layers, tau0=cal.tau0, no_early_exit=cal.no_early_exit,
                           executor_check=self.agreement,
                           fp32_early_exit_delta=None if not self.fp32_ee else self.fp32_ee.get("delta"))


def _measure_seed(qvit, cfg, seed, calib, evalt, eval_src, fp32_calib, fp32_eval, qirc, num_classes, cache) -> SeedRun:
    """Calibrate on ``calib``, then measure on ``evalt``: the executor on recorded batches (reported),
    the simulation (checked against it)."""
    policy, cal = fit_policy(calib["patch_mean"], qirc.nsr_per_layer, scheme=cfg.scheme, arch=qvit.arch,
                             num_classes=num_classes, exit_layers=cfg.exit_layers, alpha=cfg.alpha, tau0=cfg.tau0,
                             flops_budget=cfg.flops_budget)
    t = evalt["patch_mean"]
    y = t.target(cal.target)
    plan = batch_plan(t.index, cfg.batch_size, "shuffled", seed)
    run = run_executor(qvit, eval_src, plan, cfg.batch_size, {"ee": policy, "full": ExitPolicy.disabled()}, cache)
    rows = t.rows_of(run.index)
    ev = evaluate_outcomes(y[rows], run.top5["ee"], run.top5["full"], run.exit_layer["ee"], policy, qvit.arch,
                           num_classes, target=cal.target, fp32_top5=None if t.fp32_top5 is None else t.fp32_top5[rows],
                           n_boot=cfg.n_boot, seed=seed, n_skipped=t.n_skipped, measured_by="executor")
    tr = t.restrict(policy.exit_layers)
    sim = simulate(tr, policy_scores(policy, t), policy.threshold.numpy())
    agree = {"seed": seed, **simulation_agreement(t.index, sim.exit_layer, sim.top5[:, 0], tr.top5[-1, :, 0], run)}
    simulated = evaluate(t, policy, qvit.arch, num_classes, n_boot=0, seed=seed, target=cal.target)
    fp32_ee = None
    if cfg.controls and fp32_calib is not None:
        fp32_ee = ctl.fp32_early_exit(fp32_calib, fp32_eval, arch=qvit.arch, num_classes=num_classes,
                                      exit_layers=cfg.exit_layers, alpha=cfg.alpha, tau0=cfg.tau0,
                                      flops_budget=cfg.flops_budget, target=cal.target,
                                      n_boot=min(cfg.n_boot, 1000), seed=seed)
    return SeedRun(seed, policy, cal, ev, simulated, agree, run, plan, y, calib, evalt, fp32_ee, fp32_eval)


def _controls(qvit, cfg, first: SeedRun, eval_src, qirc: QIRCReport, num_classes, cache, desc) -> dict:
    t, y, policy, run, fp32_eval = first.evalt["patch_mean"], first.y, first.policy, first.run, first.fp32_eval
    fm = flops_model(qvit.arch, num_classes, "patch_mean")
    nb, seed, s = min(cfg.n_boot, 1000), first.seed, cfg.scheme
    ev = first.evaluation
    out = {
        **ctl.table_controls(t, y, policy, run, fm, s, nb, seed, cfg.random_gate_draws),
        "rescued_minus_hurt_by_nsr": [ctl.nsr_entry(s, qirc.nsr_per_layer[-1], {
            "acc_full": ev.acc_full, "acc_ee": ev.acc_ee, "rescued": ev.quadrants["rescued"],
            "hurt": ev.quadrants["hurt"],
            "delta_ci95": ev.delta_ci95, "flops_saving": ev.flops_saving}, "executor")],
    }
    if first.fp32_ee is not None and "acc_ee" in first.fp32_ee:
        out["fp32_early_exit"] = first.fp32_ee
        out["rescued_minus_hurt_by_nsr"].insert(0, ctl.nsr_entry("fp32", 0.0, first.fp32_ee, "simulation (FP32)"))
        out["head_confound"]["fp32"] = ctl.head_confound(fp32_eval, fp32_eval.target("labels"), nb, seed)
    if cfg.batch_sensitivity or (cfg.batch_sensitivity is None and s == "paper"):
        targets = {int(p): int(v) for p, v in zip(t.index, y)}
        out["batch_sensitivity"] = {s: batch_sensitivity(qvit, eval_src, first.plan, targets, policy, fm,
                                                         cfg.sensitivity_batch_sizes, cfg.sensitivity_limit, nb, seed,
                                                         cache, desc)}
    return out


def run_experiment(
    visual,
    source,
    text_features: torch.Tensor,
    cfg: ExperimentConfig,
    class_names: list[str] | None = None,
    logit_scale: float = 100.0,
    fp32: FP32Cache | None = None,
    eval_source=None,
    progress: bool = True,
) -> ExperimentResult:
    """Run one scheme. ``eval_source``: a separate evaluation set (then ``source`` is all calibration;
    images of ``eval_source`` equal in content to one of ``source`` are left out). ``fp32``: the
    previous scheme's ``result.fp32`` on the same data, to skip the FP32 passes."""
    t_start = time.perf_counter()
    n_total = len(source)
    qcal_idx, qirc_idx, pool_idx = held_out(n_total, cfg.n_quant_calib, cfg.n_qirc)
    if len(pool_idx) < 4:
        raise ValueError(f"{n_total} images are too few: {cfg.n_quant_calib} go to quantizer calibration and "
                         f"{cfg.n_qirc} to QIRC, the rest must split")
    desc = (lambda what: f"{cfg.scheme}: {what}") if progress else (lambda what: None)
    sizes = (n_total, cfg.n_quant_calib, cfg.n_qirc, None if eval_source is None else len(eval_source))
    key, held = fp32_cache_key(visual, source, eval_source, text_features, logit_scale, sizes)
    fp32 = fp32 if fp32 is not None and fp32.key == key else None
    qcal_images, qirc_images = images_of(source, qcal_idx), images_of(source, qirc_idx)
    qvit = quantize(visual, cfg.scheme, qcal_images, cfg.backend)
    qvit.set_classifier(text_features, logit_scale, class_names)
    depth, num_classes = qvit.depth, text_features.shape[0]
    qirc_ref = fp32.qirc_reference if fp32 is not None else fp32_reference(visual, qirc_images)
    qirc = diagnose(visual, qvit, qirc_images, cfg.scheme, reference=qirc_ref)

    pool = source.subset(pool_idx, name="pool")
    candidates = tuple(range(1, depth))
    tables = collect_tables(qvit, pool, candidates, HEADS, batch_size=cfg.batch_size, desc=desc("exit tables"))
    if fp32 is None:
        fp32 = FP32Cache(key, collect_fp32_table(visual, pool, text_features, candidates, logit_scale, cfg.batch_size,
                                                 desc("FP32 exit tables")), qirc_reference=qirc_ref, held=held)
    for t in tables.values():
        _with_fp32(t, fp32.table)
    eval_tables, split_check, eval_keep = None, None, None
    if eval_source is not None:
        eval_source, split_check, eval_keep = exclude_images(eval_source, set(fingerprints(source)))
        if fp32.eval_table is None:
            fp32.eval_table = collect_fp32_table(visual, eval_source, text_features, candidates, logit_scale,
                                                 cfg.batch_size, desc("FP32 eval tables"))
        eval_tables = collect_tables(qvit, eval_source, candidates, HEADS, batch_size=cfg.batch_size,
                                     desc=desc("eval tables"))
        for t in eval_tables.values():
            _with_fp32(t, fp32.eval_table)

    cache: dict = {}
    per_seed = []
    for i, seed in enumerate(cfg.seeds):
        if eval_tables is None:
            c_rows, e_rows = split_indices(tables["patch_mean"].n, cfg.calib_fraction, seed)
            calib = {h: t.subset(c_rows) for h, t in tables.items()}
            evalt = {h: t.subset(e_rows) for h, t in tables.items()}
            assert not set(calib["patch_mean"].index) & set(evalt["patch_mean"].index)
            fp32_c, fp32_e = (fp32.table.subset(fp32.table.rows_of(x["patch_mean"].index)) for x in (calib, evalt))
            eval_src = pool
        else:
            calib, evalt, eval_src = tables, eval_tables, eval_source
            fp32_c, fp32_e = fp32.table, fp32.eval_table
        per_seed.append(_measure_seed(qvit, cfg, seed, calib, evalt, eval_src, fp32_c, fp32_e, qirc, num_classes,
                                      cache if i == 0 else None))
    first = per_seed[0]
    cal_positions = (np.concatenate([qcal_idx, qirc_idx, pool_idx[first.calib["patch_mean"].index]])
                     if eval_tables is None else None)
    split = {"kind": "one source, held-out splits" if eval_tables is None else "separate calibration source",
             "hold_out_seed": HOLD_OUT_SEED, "n_quant_calib": cfg.n_quant_calib, "n_qirc": cfg.n_qirc,
             "calib_fraction": cfg.calib_fraction if eval_tables is None else None, "seed": first.seed}
    qvit.exit_policy = with_meta(first.policy, **{CALIBRATION_KEY: calibration_record(source, cal_positions, split)})

    extra = ablations(first.calib, first.evalt, qirc.nsr_per_layer, qvit.arch, num_classes,
                      first.calibration, seed=first.seed) if cfg.ablate else {}
    controls = _controls(qvit, cfg, first, pool if eval_tables is None else eval_source, qirc, num_classes, cache,
                         desc("batch sensitivity")) if cfg.controls else {}
    n_skipped = int(getattr(source, "n_skipped", 0)) + int(getattr(eval_source, "n_skipped", 0))
    report = _report(cfg, qirc, per_seed, extra, controls, len(qcal_images), len(qirc_images), n_skipped,
                     split_check, pool_idx if eval_tables is None else eval_keep)
    report.seconds = time.perf_counter() - t_start
    return ExperimentResult(report, qvit, tables, fp32, qcal_images, qirc_images)


def _report(cfg, qirc: QIRCReport, per_seed: list[SeedRun], extra, controls, n_qcal, n_qirc, n_skipped, split_check,
            eval_positions) -> ExperimentReport:
    first = per_seed[0]
    ev, cal, sim = first.evaluation, first.calibration, first.simulated
    seeds_summary = {k: stats.mean_std([getattr(r.evaluation, k) for r in per_seed])
                     for k in SEED_KEYS if getattr(ev, k) is not None}
    seeds_summary["rescued"] = stats.mean_std([r.evaluation.quadrants["rescued"] for r in per_seed])
    seeds_summary["hurt"] = stats.mean_std([r.evaluation.quadrants["hurt"] for r in per_seed])
    agreements = [r.agreement for r in per_seed]
    check = {k: first.agreement[k] for k in ("n", "exit_layer_agreement", "prediction_agreement",
                                             "full_depth_agreement")}
    check.update(exact=all(a["exact"] for a in agreements), scope="the whole evaluation split of every seed",
                 per_seed=agreements)
    layers_per_seed = [r.calibration.exit_layers for r in per_seed]
    flags = []
    if not check["exact"]:
        worst = min(agreements, key=lambda a: a["prediction_agreement"])
        flags.append(f"the exit-table simulation does not match the executor (seed {worst['seed']}: "
                     f"{100 * worst['exit_layer_agreement']:.1f}% of exit layers, "
                     f"{100 * worst['prediction_agreement']:.1f}% of predictions, "
                     f"{100 * worst['full_depth_agreement']:.1f}% at full depth): accuracy, quadrants, FLOPs and exit "
                     f"histograms reported here are the executor's; ablations, sweeps and table-based controls are "
                     f"simulations")
    if any(layers != layers_per_seed[0] for layers in layers_per_seed):
        flags.append(f"the exit layers chosen differ between seeds: {layers_per_seed}")
    for r in per_seed:
        if r.calibration.no_early_exit:
            flags.append(f"seed {r.seed}: calibration chose no early exit — early exit does not help here")
    run = first.run
    batches = [[int(eval_positions[p]) for p in b] for b in run.batches] if eval_positions is not None else run.batches
    run_record = {**run.record("shuffled", first.seed, with_batches=False),
                  "positions_in": "the source" if split_check is None else "the evaluation source", "batches": batches}
    measured = ("acc_fp32", "acc_full", "acc_ee", "top5_fp32", "top5_full", "top5_ee", "delta", "delta_ci95",
                "acc_full_ci95", "acc_ee_ci95", "mcnemar_p", "mcnemar_p_vs_fp32", "flops_full", "flops_ee",
                "flops_saving", "quadrants", "quadrants_by_exit", "quadrants_vs_fp32", "exit_histogram")
    return ExperimentReport(
        scheme=cfg.scheme,
        scheme_description=SCHEME_HELP[cfg.scheme],
        n_quant_calibration=int(n_qcal),
        n_qirc=int(n_qirc),
        n_calibration=cal.n_calibration,
        n_eval=ev.n_eval,
        n_skipped=n_skipped,
        target=ev.target,
        measured_by="executor",
        **{k: getattr(ev, k) for k in measured},
        simulated={"acc_full": sim.acc_full, "acc_ee": sim.acc_ee, "delta": sim.delta, "quadrants": sim.quadrants,
                   "flops_saving": sim.flops_saving, "exit_histogram": sim.exit_histogram},
        executor_batches=run_record,
        split_check=split_check or {"checked": True, "method": "disjoint positions of one source (asserted)"},
        nsr_per_layer=qirc.nsr_per_layer,
        qirc=qirc,
        exit_layers=cal.exit_layers,
        exit_layers_per_seed=layers_per_seed,
        inr_per_exit=cal.inr_per_exit,
        thresholds=cal.thresholds,
        alpha=cal.alpha,
        tau0=cal.tau0,
        no_early_exit=cal.no_early_exit,
        calibration=cal,
        seeds=list(cfg.seeds),
        per_seed=[r.summary() for r in per_seed],
        over_seeds=seeds_summary,
        executor_check=check,
        flags=flags,
        ablations=extra.get("ablations", {}),
        alpha_sweep=extra.get("alpha_sweep", []),
        tau0_sweep=extra.get("tau0_sweep", {}),
        controls=controls,
    )
