"""The whole LRA-EE pipeline on the built-in synthetic task (tiny tower, CPU)."""

import json

import pytest

from conftest import make_tower
from lra_ee.data import TensorSource
from lra_ee.experiment import ExperimentConfig, run_experiment
from lra_ee.synthetic import builtin_task


@pytest.fixture(scope="module")
def task_and_tower():
    v = make_tower(layers=6, width=64)
    task = builtin_task(v, n_classes=8, n_images=240, seed=0)
    return v, task


@pytest.mark.parametrize("scheme", ["smoothquant", "paper"])
def test_experiment_on_builtin_task(task_and_tower, scheme):
    v, task = task_and_tower
    src = TensorSource(task.images, task.labels, task.class_names)
    cfg = ExperimentConfig(scheme=scheme, seeds=(0, 1), n_quant_calib=16, n_qirc=8, n_boot=300, batch_size=32)
    res = run_experiment(v, src, task.text_features, cfg, task.class_names)
    r = res.report
    json.dumps(r)  # serialisable
    assert r["n_calibration"] + r["n_eval"] == 240 - 16
    assert r["acc_fp32"] > 3 / 8, "the built-in task must be well above chance (1/8) for FP32"
    q = r["quadrants"]
    assert sum(q.values()) == pytest.approx(1.0)
    assert r["acc_ee"] - r["acc_full"] == pytest.approx(q["rescued"] - q["hurt"])
    assert r["delta_ci95"][0] <= r["delta"] + 1e-12 and r["delta"] - 1e-12 <= r["delta_ci95"][1]
    assert 0 <= r["mcnemar_p"] <= 1
    assert len(r["nsr_per_layer"]) == 7 and r["nsr_per_layer"][0] <= r["nsr_per_layer"][-1]
    assert sum(r["exit_histogram"].values()) == pytest.approx(1.0)
    assert r["flops_ee"] <= r["flops_full"] * 1.01
    assert set(r["ablations"]) >= {"reference", "drop_confidence", "drop_margin", "drop_spatial_variance", "cls_head",
                                   "flat_thresholds"}
    assert len(r["alpha_sweep"]) == 5 and len(r["tau0_sweep"]["points"]) > 10
    assert r["over_seeds"]["acc_ee"]["n"] == 2
    if scheme != "paper":
        # per-token rows are batch-independent: the simulated exits are what the executor does
        assert r["executor_check"]["exit_layer_agreement"] == 1.0
        assert r["executor_check"]["prediction_agreement"] == 1.0
    assert res.model.exit_policy.enabled and list(res.model.exit_policy.exit_layers) == r["exit_layers"]


def test_calibrate_api_with_unlabelled_images_then_evaluate(task_and_tower, tmp_path):
    from lra_ee import calibrate, evaluate_model
    from lra_kernels import QuantEarlyExitViT

    v, task = task_and_tower
    calib = TensorSource(task.images[:120])  # no labels: the gates learn to agree with FP32
    qvit, rep = calibrate(v, calib, task.text_features, scheme="smoothquant", exit_layers=(3, 5), n_quant_calib=16,
                          class_names=task.class_names)
    assert rep.target == "fp32" and rep.exit_layers == [3, 5] and rep.qirc["scheme"] == "smoothquant"
    assert qvit.exit_policy.exit_layers == (3, 5) and qvit.class_names == task.class_names
    ev_src = TensorSource(task.images[120:], task.labels[120:])
    res = evaluate_model(qvit, ev_src, fp32_visual=v, n_boot=200)
    assert res.n_eval == 120 and res.target == "labels" and res.acc_fp32 is not None
    assert res.acc_ee - res.acc_full == pytest.approx(res.quadrants["rescued"] - res.quadrants["hurt"])
    qvit.save(tmp_path / "m")
    again = evaluate_model(QuantEarlyExitViT.load(tmp_path / "m"), ev_src, n_boot=200)
    assert again.acc_ee == res.acc_ee and again.exit_histogram == res.exit_histogram
