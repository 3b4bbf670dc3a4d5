"""The typed results of the method, from calibration to the report, and how they serialize.

    QIRCReport          qirc.diagnose: NSR / cosine per layer
    CalibrationReport   method.fit_policy (lra_ee.calibrate): gates, INR, thresholds, tau0
    EvalReport          method.evaluate_outcomes (lra_ee.evaluate_model): accuracy, quadrants, statistics, FLOPs
    SeedSummary         one calibration seed of an experiment
    ExperimentReport    experiment.run_experiment: all of the above for one scheme (``report.json``)
    DemoReport          lra-ee demo: an ExperimentReport plus every scheme, throughput, the planted outliers
    ModelEvaluationReport  lra-ee evaluate --model-dir: an EvalReport of a saved model

Each serializes with ``to_dict()`` to the dict ``report.json`` holds (field order = key order;
nested results become dicts; the header fields ``model``, ``weights``, ``note``, ``data`` are left
out while unset). ``lra_ee.report`` renders the objects themselves, by attribute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

HEADER = ("model", "weights", "note", "data")  # what ran on what: omitted from to_dict() while None


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class Report:
    """Serialization shared by the result dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in HEADER and value is None:
                continue
            out[f.name] = _plain(value)
        return out

    def as_dict(self) -> dict[str, Any]:
        return self.to_dict()


@dataclass
class QIRCReport(Report):
    scheme: str
    nsr_per_layer: list[float]  # depth + 1 values: embedding, then after each block
    cos_per_layer: list[float]  # mean token cosine, same layers
    exit_nsr: list[float]  # exit embedding NSR after blocks 1..depth (depth: the model's own head)
    exit_cos: list[float]
    n_images: int


@dataclass
class CalibrationReport(Report):
    scheme: str
    target: str
    n_calibration: int
    candidate_layers: list[int]
    acc_per_layer: dict[int, float]  # exit-head accuracy on the calibration split (and the full depth)
    nsr_per_layer: dict[int, float]
    inr_per_layer: dict[int, float]
    exit_layers: list[int]
    inr_per_exit: list[float]
    features: list[str]
    gates: list[dict]
    alpha: float
    tau0: float
    thresholds: list[float]
    head: str
    calib_acc_full: float
    calib_acc_ee: float
    calib_flops_saving: float
    flops_budget: float | None
    tau0_search: list[dict] = field(default_factory=list)
    qirc: QIRCReport | None = None  # the QIRC diagnostics the INR came from, when calibrated end to end
    no_early_exit: bool = False  # tau0 = NO_EXIT: on the calibration split early exit did not help


@dataclass
class EvalReport(Report):
    n_eval: int
    target: str
    acc_fp32: float | None
    acc_full: float
    acc_ee: float
    top5_fp32: float | None
    top5_full: float
    top5_ee: float
    delta: float
    delta_ci95: list[float]
    acc_full_ci95: list[float]
    acc_ee_ci95: list[float]
    quadrants: dict  # vs the INT8 full-depth model
    quadrants_vs_fp32: dict | None
    mcnemar_p: float
    mcnemar_p_vs_fp32: float | None
    exit_histogram: dict[int, float]
    flops_full: float
    flops_ee: float
    flops_saving: float
    exit_layers: list[int]
    thresholds: list[float]
    n_skipped: int = 0
    quadrants_by_exit: dict | None = None  # the quadrants of the samples that exited early / ran to full depth
    measured_by: str = "simulation"  # "executor": classify on recorded batches; "simulation": exit tables
    split_check: dict | None = None  # how calibration / evaluation disjointness was checked
    executor_check: dict | None = None  # the exit-table simulation against the executor, sample by sample
    executor_batches: dict | None = None  # the recorded batches the executor ran
    controls: dict | None = None  # table-based controls (lra_ee.controls)


SEED_KEYS = ("acc_fp32", "acc_full", "acc_ee", "delta", "flops_saving")  # reported per seed and over seeds


@dataclass(kw_only=True)
class SeedSummary(Report):
    """One calibration seed: its evaluation's headline numbers and what calibration chose."""

    seed: int
    acc_fp32: float | None
    acc_full: float
    acc_ee: float
    delta: float
    flops_saving: float
    quadrants: dict
    exit_layers: list[int]
    tau0: float
    no_early_exit: bool
    executor_check: dict  # the simulation against the executor on this seed's evaluation split
    fp32_early_exit_delta: float | None  # the FP32 early-exit control's delta (None: not run)


# What each scheme contributes to a demo's "schemes" section.
SCHEME_SUMMARY_KEYS = ("acc_fp32", "acc_full", "acc_ee", "delta", "delta_ci95", "quadrants", "quadrants_by_exit",
                       "mcnemar_p", "flops_saving", "exit_layers", "exit_layers_per_seed", "exit_histogram",
                       "nsr_per_layer", "executor_check", "measured_by", "flags", "over_seeds", "tau0",
                       "no_early_exit")


@dataclass(kw_only=True)
class ExperimentReport(Report):
    """One scheme's experiment (``run_experiment``): the first seed's executor-measured evaluation, its
    calibration, QIRC, every seed's summary, ablations and controls."""

    model: str | None = None
    weights: str | None = None
    note: str | None = None
    data: str | None = None
    scheme: str
    scheme_description: str
    n_quant_calibration: int
    n_qirc: int
    n_calibration: int
    n_eval: int
    n_skipped: int
    target: str
    measured_by: str
    acc_fp32: float | None
    acc_full: float
    acc_ee: float
    top5_fp32: float | None
    top5_full: float
    top5_ee: float
    delta: float
    delta_ci95: list[float]
    acc_full_ci95: list[float]
    acc_ee_ci95: list[float]
    mcnemar_p: float
    mcnemar_p_vs_fp32: float | None
    flops_full: float
    flops_ee: float
    flops_saving: float
    quadrants: dict
    quadrants_by_exit: dict | None
    quadrants_vs_fp32: dict | None
    exit_histogram: dict[int, float]
    simulated: dict  # the exit-table simulation of the same split (acc, quadrants, FLOPs, histogram)
    executor_batches: dict
    split_check: dict
    nsr_per_layer: list[float]
    qirc: QIRCReport
    exit_layers: list[int]
    exit_layers_per_seed: list[list[int]]
    inr_per_exit: list[float]
    thresholds: list[float]
    alpha: float
    tau0: float
    no_early_exit: bool
    calibration: CalibrationReport
    seeds: list[int]
    per_seed: list[SeedSummary]
    over_seeds: dict[str, dict]  # mean / std / n over seeds of SEED_KEYS, rescued, hurt
    executor_check: dict
    flags: list[str]
    ablations: dict
    alpha_sweep: list[dict]
    tau0_sweep: dict
    controls: dict
    seconds: float = 0.0

    def with_header(self, **header) -> ExperimentReport:
        """A copy saying what ran on what (``model``, ``weights``, ``note``, ``data``)."""
        return dataclasses.replace(self, **header)

    def scheme_summary(self) -> dict[str, Any]:
        """This scheme's line of a comparison of schemes (``DemoReport.schemes``)."""
        return {k: _plain(getattr(self, k)) for k in SCHEME_SUMMARY_KEYS}


@dataclass(kw_only=True)
class DemoReport(ExperimentReport):
    """``lra-ee demo``: the main scheme's experiment (its controls merged over every scheme, its flags
    prefixed by scheme) and the comparison the demo is for."""

    outlier_channels: dict
    schemes: dict[str, dict]  # per scheme: its scheme_summary() and a description
    nsr_per_scheme: dict[str, list[float]]
    throughput: dict
    seconds_total: float = 0.0

    @classmethod
    def of(cls, main: ExperimentReport, **fields) -> DemoReport:
        base = {f.name: getattr(main, f.name) for f in dataclasses.fields(ExperimentReport)}
        return cls(**{**base, **fields})


@dataclass(kw_only=True)
class ModelEvaluationReport(Report):
    """``lra-ee evaluate --model-dir``: a saved model measured on new images (``evaluate_model``).

    Reads like an ExperimentReport: the EvalReport's fields are this report's attributes (and its keys
    in ``to_dict()``, in place of ``evaluation``)."""

    model: str | None = None
    weights: str | None = None
    data: str | None = None
    model_dir: str
    source_model: dict | None
    scheme: str
    n_calibration: int | None = None  # the calibration split is not part of this run
    evaluation: EvalReport
    nsr_per_layer: list[float] = field(default_factory=list)
    inr_per_exit: list[float] = field(default_factory=list)
    alpha: float | None = None
    tau0: float | None = None
    no_early_exit: bool = False
    seeds: list[int] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    def __getattr__(self, name):
        if name != "evaluation" and name in _EVAL_FIELDS:
            return getattr(self.evaluation, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for key, value in super().to_dict().items():
            if key == "evaluation":
                out.update(value)
            else:
                out[key] = value
        return out


_EVAL_FIELDS = frozenset(f.name for f in dataclasses.fields(EvalReport))
