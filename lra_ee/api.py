"""The one-call API: ``calibrate`` a tower on calibration images, ``evaluate_model`` a calibrated one.

    qvit, report = calibrate(clip.visual, calib_source, text_features, scheme="smoothquant")
    qvit.save("run1/model")                      # the calibration images are recorded in it
    result = evaluate_model(QuantEarlyExitViT.load("run1/model"), eval_source, fp32_visual=clip.visual)
"""

from __future__ import annotations

import numpy as np
import torch

from lra_kernels import ExitPolicy, QuantEarlyExitViT
from lra_kernels.flops import flops_model
from lra_kernels.names import GATE_FEATURES, N_FEATURES

from . import controls as ctl
from .data import images_of
from .exits import attach_fp32, collect_tables, fp32_predictions, simulate
from .measure import batch_plan, batch_sensitivity, run_executor, simulation_agreement
from .method import evaluate_outcomes, fit_policy, policy_scores
from .provenance import (
    CALIBRATION_KEY,
    MODEL_KEY,
    calibration_record,
    exclude_calibration_images,
    source_model_record,
    with_meta,
)
from .qirc import diagnose
from .results import CalibrationReport, EvalReport
from .schemes import check_scheme, quantize


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
    seed: int = 0,
    model_name: str | None = None,
    pretrained: str | None = None,
    weights_seed: int | None = None,
    gate_features: tuple[str, ...] | None = None,
) -> tuple[QuantEarlyExitViT, CalibrationReport]:
    """Quantize an open_clip tower and calibrate its exits on ``source`` (calibration images only).

    A seeded random sample of ``n_quant_calib`` images calibrates the quantizer (static scales,
    SmoothQuant) and a disjoint one of ``n_qirc`` images the QIRC diagnostics (random, not the first
    images of a class-sorted folder); on everything but the quantizer's images every candidate exit
    is evaluated, the gates are trained (target: labels, or the FP32 full-depth prediction for
    unlabelled images), INR and thresholds computed and ``tau0`` chosen. Returns the model with its
    ``ExitPolicy`` and classifier set, and the report (QIRC curve under ``report.qirc``). The policy
    records every image of ``source`` (by content) and, when given, the open_clip model name and
    pretrained tag: ``evaluate_model`` then leaves those images out and checks the FP32 reference.
    ``gate_features``: the gate's features by name (default all of ``GATE_FEATURES``); a gate of
    label-free features only (``("spatial_variance",)``) is marked ``label_agnostic`` in the policy's
    meta, so a server applies it to per-request label sets (docs/serving.md).
    """
    check_scheme(scheme)
    feature_idx = tuple(range(N_FEATURES))
    if gate_features is not None:
        unknown = [f for f in gate_features if f not in GATE_FEATURES]
        if unknown or not gate_features:
            raise ValueError(f"gate_features must be a non-empty subset of {GATE_FEATURES}, got {gate_features}")
        feature_idx = tuple(sorted({GATE_FEATURES.index(f) for f in gate_features}))
    n = len(source)
    n_q = min(n_quant_calib, n // 2)
    if n_q < 1 or n - n_q < 2:
        raise ValueError(f"{n} calibration images are too few")
    n_r = max(1, min(n_qirc, (n - n_q) // 2))
    perm = np.random.default_rng(seed).permutation(n)
    q_idx, r_idx, rest = np.sort(perm[:n_q]), np.sort(perm[n_q : n_q + n_r]), np.sort(perm[n_q:])
    qcal = images_of(source, q_idx)
    qvit = quantize(visual, scheme, qcal, backend)
    qvit.set_classifier(text_features.to(qvit.device), logit_scale, class_names)
    qirc = diagnose(visual, qvit, images_of(source, r_idx), scheme)
    rest_src = source.subset(rest, "calibration")
    desc = "exit tables" if progress else None
    table = collect_tables(qvit, rest_src, tuple(range(1, qvit.depth)), ("patch_mean",), batch_size=batch_size,
                           desc=desc)["patch_mean"]
    attach_fp32(table, fp32_predictions(visual, rest_src, text_features, batch_size,
                                         desc="FP32 reference" if progress else None))
    policy, report = fit_policy(table, qirc.nsr_per_layer, scheme=scheme, arch=qvit.arch,
                                num_classes=text_features.shape[0], exit_layers=exit_layers, alpha=alpha, tau0=tau0,
                                flops_budget=flops_budget, target=target, features=feature_idx)
    report.qirc = qirc
    split = {"kind": "calibration source", "seed": seed, "n_quant_calib": n_q, "n_qirc": n_r,
             "qirc_images_also_train_gates": True}
    meta = {CALIBRATION_KEY: calibration_record(source, None, split)}
    if model_name is not None:
        meta[MODEL_KEY] = source_model_record(model_name, pretrained, weights_seed)
    qvit.exit_policy = with_meta(policy, **meta)
    return qvit, report


def evaluate_model(qvit: QuantEarlyExitViT, source, fp32_visual=None, *, n_boot: int = 2000, seed: int = 0,
                   batch_size: int = 32, progress: bool = False, exclude_calibration: bool = True,
                   controls: bool = True, sensitivity_limit: int = 1024) -> EvalReport:
    """Measure a calibrated model (classifier + exit policy set) on labelled ``source`` through the
    executor: ``classify`` on recorded batches (a seeded shuffle) under the policy and, for the
    full-depth baseline, under ``ExitPolicy.disabled()`` on the same batches. Images the model was
    calibrated on are left out first (``exclude_calibration``; ``split_check`` says what was
    checked). With ``fp32_visual`` the FP32 tower's accuracy and the quadrants against it are
    reported too. The exit tables of the policy's layers give the simulation check and, with
    ``controls``, the table-based controls (and batch sensitivity for the paper's scheme)."""
    if qvit.classifier is None or not qvit.exit_policy.enabled:
        raise ValueError("the model needs a classifier and an enabled exit policy (see lra_ee.calibrate)")
    check = {"checked": False, "reason": "exclude_calibration=False", "n_excluded": 0}
    if exclude_calibration:
        source, check, _ = exclude_calibration_images(qvit, source)
    policy, num_classes = qvit.exit_policy, qvit.classifier.shape[0]
    table = collect_tables(qvit, source, policy.exit_layers, (policy.head,), batch_size=batch_size,
                           desc="exit tables" if progress else None)[policy.head]
    if fp32_visual is not None:
        attach_fp32(table, fp32_predictions(fp32_visual, source, qvit.classifier, batch_size,
                                             desc="FP32 reference" if progress else None))
    target = "labels" if (table.labels >= 0).all() else "fp32"
    y = table.target(target)
    plan = batch_plan(table.index, batch_size, "shuffled", seed)
    cache: dict = {}
    run = run_executor(qvit, source, plan, batch_size, {"ee": policy, "full": ExitPolicy.disabled()}, cache,
                       "executor" if progress else None)
    rows = table.rows_of(run.index)
    ev = evaluate_outcomes(y[rows], run.top5["ee"], run.top5["full"], run.exit_layer["ee"], policy, qvit.arch,
                           num_classes, target=target,
                           fp32_top5=None if table.fp32_top5 is None else table.fp32_top5[rows],
                           n_boot=n_boot, seed=seed, n_skipped=getattr(source, "n_skipped", 0), measured_by="executor")
    ev.split_check = check
    sim = simulate(table, policy_scores(policy, table), policy.threshold.numpy())
    ev.executor_check = simulation_agreement(table.index, sim.exit_layer, sim.top5[:, 0], table.top5[-1, :, 0], run)
    ev.executor_batches = run.record("shuffled", seed)
    if controls:
        nb = min(n_boot, 1000)
        fm = flops_model(qvit.arch, num_classes, policy.head)
        scheme = policy.meta.get("scheme", qvit.quant_config.act_quant)
        ev.controls = ctl.table_controls(table, y, policy, run, fm, scheme, nb, seed)
        if qvit.quant_config.act_quant == "paper":
            targets = {int(p): int(v) for p, v in zip(table.index, y)}
            ev.controls["batch_sensitivity"] = {"paper": batch_sensitivity(
                qvit, source, plan, targets, policy, fm, limit=sensitivity_limit, n_boot=nb, seed=seed, cache=cache)}
    return ev
