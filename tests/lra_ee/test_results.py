"""``lra_ee.results``: typed results serialize to the dicts ``report.json`` holds."""

import dataclasses
import json

import pytest

from lra_ee.report import write_report
from lra_ee.results import DemoReport, EvalReport, ExperimentReport, ModelEvaluationReport, QIRCReport, SeedSummary


def _eval(**kw) -> EvalReport:
    base = dict(n_eval=10, target="labels", acc_fp32=0.6, acc_full=0.5, acc_ee=0.55, top5_fp32=0.9, top5_full=0.8,
                top5_ee=0.85, delta=0.05, delta_ci95=[-0.1, 0.2], acc_full_ci95=[0.3, 0.7], acc_ee_ci95=[0.35, 0.75],
                quadrants={"both_right": 0.4, "rescued": 0.15, "hurt": 0.1, "both_wrong": 0.35},
                quadrants_vs_fp32=None, mcnemar_p=0.7, mcnemar_p_vs_fp32=None, exit_histogram={2: 0.3, 4: 0.7},
                flops_full=2e9, flops_ee=1.8e9, flops_saving=0.1, exit_layers=[2], thresholds=[0.5],
                measured_by="executor", split_check={"checked": True, "method": "content hash", "n_excluded": 0},
                executor_check={"n": 10, "exact": True, "exit_layer_agreement": 1.0, "prediction_agreement": 1.0,
                                "full_depth_agreement": 1.0},
                executor_batches={"batch_size": 4, "order": "shuffled", "seed": 0, "n": 10, "n_batches": 3,
                                  "digest": "x"})
    return EvalReport(**{**base, **kw})


def _experiment(**kw) -> ExperimentReport:
    ev = _eval()
    qirc = QIRCReport("per_token", [0.0, 0.1, 0.2, 0.3, 0.4], [1.0] * 5, [0.1] * 4, [0.9] * 4, 8)
    seed = SeedSummary(seed=0, acc_fp32=0.6, acc_full=0.5, acc_ee=0.55, delta=0.05, flops_saving=0.1,
                       quadrants=ev.quadrants, exit_layers=[2], tau0=0.4, no_early_exit=False,
                       executor_check={"exact": True}, fp32_early_exit_delta=None)
    fields = {f.name: getattr(ev, f.name) for f in dataclasses.fields(ExperimentReport) if hasattr(ev, f.name)}
    fields.pop("measured_by")
    return ExperimentReport(**{**fields, **dict(
        scheme="per_token", scheme_description="W8A8", n_quant_calibration=4, n_qirc=4, n_calibration=12,
        n_skipped=0, measured_by="executor", simulated={"acc_ee": 0.55}, nsr_per_layer=qirc.nsr_per_layer,
        qirc=qirc, exit_layers_per_seed=[[2]], inr_per_exit=[3.0], alpha=1.0, tau0=0.4, no_early_exit=False,
        calibration=None, seeds=[0], per_seed=[seed], over_seeds={}, flags=[], ablations={}, alpha_sweep=[],
        tau0_sweep={}, controls={}), **kw})


def test_experiment_report_serializes_nested_results_and_leaves_an_unset_header_out():
    r = _experiment()
    d = r.to_dict()
    assert "model" not in d and "weights" not in d and "note" not in d and "data" not in d
    assert d["qirc"] == dataclasses.asdict(r.qirc) and d["per_seed"][0]["seed"] == 0
    assert list(d)[:3] == ["scheme", "scheme_description", "n_quant_calibration"] and list(d)[-1] == "seconds"
    json.dumps(d)
    d["per_seed"][0]["seed"] = 9  # a copy, not a view
    assert r.per_seed[0].seed == 0
    h = r.with_header(model="ViT-B-32", weights="openai", data="/data").to_dict()
    assert list(h)[:3] == ["model", "weights", "data"] and h["model"] == "ViT-B-32"
    assert set(h) - set(d) == {"model", "weights", "data"}


def test_demo_report_keeps_the_experiment_and_adds_its_sections():
    main = _experiment().with_header(model="m", weights="random-seeded", note="synthetic", data="task")
    demo = DemoReport.of(main, outlier_channels={}, schemes={"per_token": main.scheme_summary()},
                         nsr_per_scheme={"per_token": [0.1]}, throughput={"img_per_s": {}}, seconds_total=1.0)
    d = demo.to_dict()
    assert list(d)[:4] == ["model", "weights", "note", "data"]
    assert set(d) - set(main.to_dict()) == {"outlier_channels", "schemes", "nsr_per_scheme", "throughput",
                                            "seconds_total"}
    assert d["schemes"]["per_token"]["acc_ee"] == main.acc_ee


def test_model_evaluation_report_reads_and_serializes_as_its_evaluation():
    ev = _eval()
    r = ModelEvaluationReport(model="m", weights="saved model", data="/d", model_dir="/m", source_model=None,
                              scheme="smoothquant", evaluation=ev, alpha=1.0, tau0=0.4, seeds=[0])
    assert r.acc_ee == ev.acc_ee and r.executor_batches is ev.executor_batches and r.n_calibration is None
    with pytest.raises(AttributeError):
        r.per_seed
    d = r.to_dict()
    assert "evaluation" not in d and d["acc_ee"] == ev.acc_ee
    keys = list(d)
    assert keys[:7] == ["model", "weights", "data", "model_dir", "source_model", "scheme", "n_calibration"]
    assert keys[7:7 + len(ev.to_dict())] == list(ev.to_dict())
    assert keys[-7:] == ["nsr_per_layer", "inr_per_exit", "alpha", "tau0", "no_early_exit", "seeds", "flags"]


@pytest.mark.parametrize("kind", ["experiment", "model_dir"])
def test_write_report_renders_each_kind(tmp_path, kind):
    if kind == "experiment":
        r = _experiment().with_header(model="m", weights="w", data="d")
    else:
        r = ModelEvaluationReport(model="m", weights="w", data="d", model_dir="/m", source_model=None, scheme="s",
                                  evaluation=_eval(), seeds=[0])
    files = write_report(tmp_path, r)
    assert json.loads(files["json"].read_text()) == json.loads(json.dumps(r.to_dict()))
    md = files["md"].read_text()
    assert "# LRA-EE report — m (w weights)" in md and "disjoint — checked: content hash" in md
    assert ("### Per seed" in md) == (kind == "experiment")
