"""One LRA-EE experiment end to end: quantize, diagnose QIRC, collect exit tables, calibrate and
evaluate over several calibration seeds, ablate, verify against the real executor.

Splits: a fixed set of ``n_quant_calib`` images (seed-independent) calibrates the quantizer
(static scales, SmoothQuant) and the QIRC diagnostics, and is excluded from every split; the
rest is split per seed into disjoint calibration / evaluation parts (or comes as two sources).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lra_kernels import QuantEarlyExitViT

from . import stats
from .data import split_indices
from .exits import HEADS, ExitTable, collect_tables, simulate, verify_with_executor
from .method import CalibrationReport, EvalReport, ablations, evaluate, fit_policy, policy_scores
from .qirc import diagnose

SCHEMES = {
    "paper": dict(act_quant="paper"),
    "per_token": dict(act_quant="per_token"),
    "smoothquant": dict(act_quant="per_token", smooth_alpha=0.5),
    "per_tensor_static": dict(act_quant="per_tensor_static", smooth_alpha=0.5),
}
SCHEME_LABEL = {
    "paper": "paper (quantize_dynamic)",
    "per_token": "per-token",
    "smoothquant": "per-token + SmoothQuant",
    "per_tensor_static": "static per-tensor + SmoothQuant",
}
SCHEME_HELP = {
    "paper": "the paper's baseline: torch.ao quantize_dynamic emulation (MLP only, per-tensor)",
    "per_token": "W8A8, per-token dynamic activations",
    "smoothquant": "W8A8 per-token + SmoothQuant (alpha 0.5)",
    "per_tensor_static": "W8A8 per-tensor static activations + SmoothQuant (alpha 0.5)",
}


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
    verify_limit: int = 128
    ablate: bool = True

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {tuple(SCHEMES)}, got {self.scheme!r}")
        if not self.seeds:
            raise ValueError("give at least one calibration seed")


def quantize(visual, scheme: str, calibration_images: torch.Tensor | None, backend: str = "auto") -> QuantEarlyExitViT:
    kwargs = dict(SCHEMES[scheme])
    if kwargs.get("act_quant") == "per_tensor_static" or "smooth_alpha" in kwargs:
        kwargs["calibration_images"] = calibration_images
    return QuantEarlyExitViT.from_open_clip(visual, backend=backend, **kwargs)


def _images(source, index, batch_size=64) -> torch.Tensor:
    sub = source.subset(index)
    return torch.cat([im for im, _, _ in sub.batches(batch_size)])


@torch.no_grad()
def fp32_predictions(visual, source, text: torch.Tensor, batch_size: int = 32, desc: str | None = None) -> dict[int, np.ndarray]:
    """Top-5 of the FP32 tower for every readable image of ``source``, keyed by source position."""
    k = min(5, text.shape[0])
    dev = next(visual.parameters()).device
    out = {}
    for images, _, idx in tqdm(source.batches(batch_size), total=-(-len(source) // batch_size), desc=desc,
                               disable=desc is None, leave=False):
        z = F.normalize(visual(images.to(dev)).float(), dim=-1)
        top = (z @ text.to(dev).t()).topk(k, dim=-1).indices.cpu().numpy()
        out.update({int(i): t for i, t in zip(idx, top)})
    return out


def _attach_fp32(table: ExitTable, fp32: dict[int, np.ndarray]) -> ExitTable:
    table.fp32_top5 = np.stack([fp32[int(i)] for i in table.index])
    return table


@dataclass
class ExperimentResult:
    report: dict
    model: QuantEarlyExitViT
    tables: dict[str, ExitTable] = field(repr=False, default_factory=dict)
    fp32: dict[int, np.ndarray] = field(repr=False, default_factory=dict)  # FP32 top-5 of the pool, reusable
    quant_calibration_images: torch.Tensor | None = field(repr=False, default=None)


def run_experiment(
    visual,
    source,
    text_features: torch.Tensor,
    cfg: ExperimentConfig,
    class_names: list[str] | None = None,
    logit_scale: float = 100.0,
    fp32: dict[int, np.ndarray] | None = None,
    eval_source=None,
    progress: bool = True,
) -> ExperimentResult:
    """Run one scheme. ``eval_source``: a separate evaluation set (then ``source`` is all calibration)."""
    t_start = time.perf_counter()
    n_total = len(source)
    perm = np.random.default_rng(12345).permutation(n_total)
    qcal_idx, pool_idx = np.sort(perm[: cfg.n_quant_calib]), np.sort(perm[cfg.n_quant_calib :])
    if len(pool_idx) < 4:
        raise ValueError(f"{n_total} images are too few: {cfg.n_quant_calib} go to quantizer calibration, the rest must split")
    qcal_images = _images(source, qcal_idx)
    qvit = quantize(visual, cfg.scheme, qcal_images, cfg.backend)
    qvit.set_classifier(text_features, logit_scale, class_names)
    depth = qvit.depth
    qirc = diagnose(visual, qvit, qcal_images[: cfg.n_qirc], cfg.scheme)

    pool = source.subset(pool_idx, name="pool")
    candidates = tuple(range(1, depth))
    desc = (lambda what: f"{cfg.scheme}: {what}") if progress else (lambda what: None)
    tables = collect_tables(qvit, pool, candidates, HEADS, batch_size=cfg.batch_size, desc=desc("exit tables"))
    if fp32 is None:
        fp32 = fp32_predictions(visual, pool, text_features, cfg.batch_size, desc=desc("FP32 reference"))
    for t in tables.values():
        _attach_fp32(t, fp32)
    eval_tables = None
    if eval_source is not None:
        eval_tables = collect_tables(qvit, eval_source, candidates, HEADS, batch_size=cfg.batch_size, desc=desc("eval tables"))
        efp = fp32_predictions(visual, eval_source, text_features, cfg.batch_size, desc=desc("FP32 eval"))
        for t in eval_tables.values():
            _attach_fp32(t, efp)

    num_classes = text_features.shape[0]
    per_seed, first = [], None
    for seed in cfg.seeds:
        if eval_tables is None:
            c_rows, e_rows = split_indices(tables["patch_mean"].n, cfg.calib_fraction, seed)
            calib = {h: t.subset(c_rows) for h, t in tables.items()}
            evalt = {h: t.subset(e_rows) for h, t in tables.items()}
            assert not set(calib["patch_mean"].index) & set(evalt["patch_mean"].index)
        else:
            calib, evalt, e_rows = tables, eval_tables, np.arange(eval_tables["patch_mean"].n)
        policy, cal = fit_policy(calib["patch_mean"], qirc.nsr_per_layer, scheme=cfg.scheme, arch=qvit.arch,
                                 num_classes=num_classes, exit_layers=cfg.exit_layers, alpha=cfg.alpha, tau0=cfg.tau0,
                                 flops_budget=cfg.flops_budget)
        ev = evaluate(evalt["patch_mean"], policy, qvit.arch, num_classes, n_boot=cfg.n_boot, seed=seed)
        per_seed.append({"seed": seed, "calibration": cal, "evaluation": ev, "policy": policy,
                         "calib": calib, "eval": evalt, "eval_rows": e_rows})
        if first is None:
            first = per_seed[-1]

    qvit.exit_policy = first["policy"]
    # The simulation must agree with the real executor: check on part of the first seed's evaluation split.
    ev_table = first["eval"]["patch_mean"]
    sim = simulate(ev_table.restrict(first["policy"].exit_layers), policy_scores(first["policy"], ev_table),
                   first["policy"].threshold.numpy())
    verify_src = (eval_source if eval_source is not None else pool.subset(first["eval_rows"]))
    verify = verify_with_executor(qvit, verify_src, sim.exit_layer, sim.top5[:, 0], cfg.batch_size, cfg.verify_limit)

    extra = ablations(first["calib"], first["eval"], qirc.nsr_per_layer, qvit.arch, num_classes,
                      first["calibration"], seed=cfg.seeds[0]) if cfg.ablate else {}
    ev, cal = first["evaluation"], first["calibration"]
    keys = ("acc_fp32", "acc_full", "acc_ee", "delta", "flops_saving")
    seeds_summary = {k: stats.mean_std([getattr(r["evaluation"], k) for r in per_seed]) for k in keys if getattr(ev, k) is not None}
    seeds_summary["rescued"] = stats.mean_std([r["evaluation"].quadrants["rescued"] for r in per_seed])
    seeds_summary["hurt"] = stats.mean_std([r["evaluation"].quadrants["hurt"] for r in per_seed])
    report = {
        "scheme": cfg.scheme,
        "scheme_description": SCHEME_HELP[cfg.scheme],
        "n_quant_calibration": int(len(qcal_idx)),
        "n_calibration": cal.n_calibration,
        "n_eval": ev.n_eval,
        "n_skipped": int(getattr(source, "n_skipped", 0)),
        "target": ev.target,
        **{k: getattr(ev, k) for k in ("acc_fp32", "acc_full", "acc_ee", "top5_fp32", "top5_full", "top5_ee",
                                       "delta", "delta_ci95", "acc_full_ci95", "acc_ee_ci95", "mcnemar_p",
                                       "mcnemar_p_vs_fp32", "flops_full", "flops_ee", "flops_saving")},
        "quadrants": ev.quadrants,
        "quadrants_vs_fp32": ev.quadrants_vs_fp32,
        "exit_histogram": ev.exit_histogram,
        "nsr_per_layer": qirc.nsr_per_layer,
        "qirc": qirc.as_dict(),
        "exit_layers": cal.exit_layers,
        "inr_per_exit": cal.inr_per_exit,
        "thresholds": cal.thresholds,
        "alpha": cal.alpha,
        "tau0": cal.tau0,
        "calibration": cal.as_dict(),
        "seeds": list(cfg.seeds),
        "per_seed": [{"seed": r["seed"], **{k: getattr(r["evaluation"], k) for k in keys},
                      "quadrants": r["evaluation"].quadrants, "exit_layers": r["calibration"].exit_layers,
                      "tau0": r["calibration"].tau0} for r in per_seed],
        "over_seeds": seeds_summary,
        "executor_check": verify,
        "ablations": extra.get("ablations", {}),
        "alpha_sweep": extra.get("alpha_sweep", []),
        "tau0_sweep": extra.get("tau0_sweep", {}),
        "seconds": time.perf_counter() - t_start,
    }
    return ExperimentResult(report, qvit, tables, fp32, qcal_images)


# ---------------------------------------------------------------------- one-call API
def calibrate(
    visual,
    source,
    text_features: torch.Tensor,
    *,
    scheme: str = "smoothquant",
    exit_layers="auto",
    alpha: float = 1.0,
    tau0: float | None = None,
    flops_budget: float | None = None,
    class_names: list[str] | None = None,
    logit_scale: float = 100.0,
    n_quant_calib: int = 32,
    n_qirc: int = 32,
    batch_size: int = 32,
    backend: str = "auto",
    target: str | None = None,
    progress: bool = False,
) -> tuple[QuantEarlyExitViT, CalibrationReport]:
    """Quantize an open_clip tower and calibrate its exits on ``source`` (calibration images only).

    The first ``n_quant_calib`` images calibrate the quantizer (static scales, SmoothQuant) and the
    QIRC diagnostics; on the rest, every candidate exit is evaluated, the gates are trained
    (target: labels, or the FP32 full-depth prediction for unlabelled images), INR and thresholds
    are computed and ``tau0`` chosen. Returns the model with its ``ExitPolicy`` and classifier set,
    and the report (with the QIRC curve under ``report.qirc``).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {tuple(SCHEMES)}, got {scheme!r}")
    n_q = min(n_quant_calib, len(source) // 2)
    if n_q < 1 or len(source) - n_q < 2:
        raise ValueError(f"{len(source)} calibration images are too few")
    qcal = _images(source, range(n_q))
    qvit = quantize(visual, scheme, qcal, backend)
    qvit.set_classifier(text_features.to(qvit.device), logit_scale, class_names)
    qirc = diagnose(visual, qvit, qcal[:n_qirc], scheme)
    rest = source.subset(range(n_q, len(source)), "calibration")
    desc = "exit tables" if progress else None
    table = collect_tables(qvit, rest, tuple(range(1, qvit.depth)), ("patch_mean",), batch_size=batch_size, desc=desc)["patch_mean"]
    _attach_fp32(table, fp32_predictions(visual, rest, text_features, batch_size, desc="FP32 reference" if progress else None))
    policy, report = fit_policy(table, qirc.nsr_per_layer, scheme=scheme, arch=qvit.arch, num_classes=text_features.shape[0],
                                exit_layers=exit_layers, alpha=alpha, tau0=tau0, flops_budget=flops_budget, target=target)
    report.qirc = qirc.as_dict()
    qvit.exit_policy = policy
    return qvit, report


def evaluate_model(qvit: QuantEarlyExitViT, source, fp32_visual=None, *, n_boot: int = 2000, seed: int = 0,
                   batch_size: int = 32, progress: bool = False) -> EvalReport:
    """Measure a calibrated model (classifier + exit policy set) on labelled ``source``; with
    ``fp32_visual`` the FP32 tower's accuracy and the quadrants against it are reported too."""
    if qvit.classifier is None or not qvit.exit_policy.enabled:
        raise ValueError("the model needs a classifier and an enabled exit policy (see lra_ee.calibrate)")
    head = qvit.exit_policy.head
    table = collect_tables(qvit, source, qvit.exit_policy.exit_layers, (head,), batch_size=batch_size,
                           desc="exit tables" if progress else None)[head]
    if fp32_visual is not None:
        _attach_fp32(table, fp32_predictions(fp32_visual, source, qvit.classifier, batch_size,
                                             desc="FP32 reference" if progress else None))
    return evaluate(table, qvit.exit_policy, qvit.arch, qvit.classifier.shape[0], n_boot=n_boot, seed=seed)
