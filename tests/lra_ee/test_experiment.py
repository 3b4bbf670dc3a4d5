"""The whole LRA-EE pipeline on the built-in synthetic task (tiny tower, CPU)."""

import json

import numpy as np
import pytest
import torch

from conftest import make_tower
from lra_ee.data import TensorSource
from lra_ee.experiment import ExperimentConfig, run_experiment
from lra_ee.synthetic import builtin_task
from lra_kernels import ExitPolicy

CONTROLS = {"fp32_early_exit", "static_exit", "oracle", "random_gate", "head_confound", "rescued_minus_hurt_by_nsr"}


@pytest.fixture(scope="module")
def task_and_tower():
    v = make_tower(layers=6, width=64)
    task = builtin_task(v, n_classes=8, n_images=240, seed=0)
    return v, task


@pytest.fixture(scope="module")
def runs(task_and_tower):
    v, task = task_and_tower
    src = TensorSource(task.images, task.labels, task.class_names)
    out, fp32 = {}, None
    for scheme in ("smoothquant", "paper"):
        cfg = ExperimentConfig(scheme=scheme, seeds=(0, 1), n_quant_calib=16, n_qirc=8, n_boot=300, batch_size=32,
                               random_gate_draws=200, sensitivity_limit=64)
        out[scheme] = run_experiment(v, src, task.text_features, cfg, task.class_names, fp32=fp32, progress=False)
        fp32 = out[scheme].fp32
    return src, out


def _replay(model, src, batches, policy):
    """Run recorded batches through classify under ``policy``: (positions, top-1, exit layers)."""
    saved = model.exit_policy
    model.exit_policy = policy
    try:
        pos, top1, exits = [], [], []
        for b in batches:
            res = model.classify(src.images[torch.tensor(b)])
            pos += b
            top1.append(res.logits.argmax(-1).numpy())
            exits.append(res.exit_layer.numpy())
    finally:
        model.exit_policy = saved
    return np.array(pos), np.concatenate(top1), np.concatenate(exits)


@pytest.mark.parametrize("scheme", ["smoothquant", "paper"])
def test_experiment_on_builtin_task(runs, scheme):
    src, out = runs
    res = out[scheme]
    r = res.report.to_dict()
    json.dumps(r)  # serialisable
    assert r["n_quant_calibration"] == 16 and r["n_qirc"] == 8
    assert r["n_calibration"] + r["n_eval"] == 240 - 16 - 8
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
    assert len(r["exit_layers_per_seed"]) == 2
    assert [s["exit_layers"] for s in r["per_seed"]] == r["exit_layers_per_seed"]
    assert res.model.exit_policy.enabled and list(res.model.exit_policy.exit_layers) == r["exit_layers"]
    assert r["executor_check"]["n"] == r["n_eval"], "the simulation is checked on the whole evaluation split"
    if scheme != "paper":
        # per-token rows are batch-independent: the simulated exits are what the executor does
        assert r["executor_check"]["exact"] and r["executor_check"]["prediction_agreement"] == 1.0
        assert r["simulated"]["acc_ee"] == r["acc_ee"] and r["simulated"]["quadrants"] == r["quadrants"]
        assert not any("simulation" in f for f in r["flags"])
    if not r["executor_check"]["exact"]:
        assert any("does not match the executor" in f for f in r["flags"]), "an inexact simulation must be flagged"


@pytest.mark.parametrize("scheme", ["smoothquant", "paper"])
def test_reported_numbers_are_the_executors_on_the_recorded_batches(runs, scheme):
    src, out = runs
    res = out[scheme]
    r = res.report.to_dict()
    b = r["executor_batches"]
    assert b["batch_size"] == 32 and b["order"] == "shuffled" and b["n"] == r["n_eval"]
    positions = [p for batch in b["batches"] for p in batch]
    assert len(set(positions)) == r["n_eval"], "every evaluation image runs exactly once"
    pos, ee_top1, ee_exit = _replay(res.model, src, b["batches"], res.model.exit_policy)
    _, full_top1, full_exit = _replay(res.model, src, b["batches"], ExitPolicy.disabled())
    y = src.labels[torch.tensor(pos)].numpy()
    assert (full_exit == 6).all()
    assert r["acc_ee"] == pytest.approx(float((ee_top1 == y).mean()), abs=1e-12)
    assert r["acc_full"] == pytest.approx(float((full_top1 == y).mean()), abs=1e-12)
    hist = {str(k): float((ee_exit == k).mean()) for k in (*r["exit_layers"], 6)}
    assert {str(k): v for k, v in r["exit_histogram"].items()} == pytest.approx(hist)
    by_exit = r["quadrants_by_exit"]
    for k in ("both_right", "rescued", "hurt", "both_wrong"):
        assert by_exit["exited"][k] + by_exit["continued"][k] == pytest.approx(r["quadrants"][k])
    assert by_exit["exited"]["fraction"] == pytest.approx(1 - hist["6"])


def test_controls(runs):
    src, out = runs
    for scheme, res in out.items():
        report = res.report.to_dict()
        c = report["controls"]
        assert CONTROLS <= set(c), CONTROLS - set(c)
        order = c["rescued_minus_hurt_by_nsr"]
        assert [e["scheme"] for e in order] == ["fp32", scheme]
        assert order[0]["final_nsr"] == 0.0 and order[1]["final_nsr"] > 0
        assert order[1]["rescued_minus_hurt"] == pytest.approx(report["delta"])
        f = c["fp32_early_exit"]
        assert f["acc_ee"] - f["acc_full"] == pytest.approx(f["rescued"] - f["hurt"])
        assert f["acc_full"] == pytest.approx(report["acc_fp32"]), "FP32 full depth on the same evaluation split"
        layers = c["static_exit"][scheme]["policy_layers"]
        assert layers == report["exit_layers"]
        assert set(c["static_exit"][scheme]["layers"]) == {1, 2, 3, 4, 5}
        for layer, o in c["oracle"][scheme]["per_layer"].items():
            s = c["static_exit"][scheme]["layers"][layer]
            assert o["hurt"] == 0 and o["acc"] >= max(s["acc"], s["acc_reference"])
        g = c["random_gate"][scheme]
        assert g["random_ci95"][0] <= g["random_mean"] <= g["random_ci95"][1] and 0 < g["p_value"] <= 1
        assert g["exit_histogram"] == pytest.approx(report["simulated"]["exit_histogram"])
        h = c["head_confound"][scheme]
        assert h["acc_own_head"] == pytest.approx(report["simulated"]["acc_full"])
    sens = out["paper"].report.controls["batch_sensitivity"]["paper"]
    assert set(sens["runs"]) == {"b1", "b32_shuffled", "b32_sorted", "b256"}
    assert sens["n"] == 64 and sens["runs"]["b1"]["n_batches"] == 64 and sens["runs"]["b32_sorted"]["n_batches"] == 2
    assert "batch_sensitivity" not in out["smoothquant"].report.controls, "per-token rows never depend on the batch"


def test_saved_model_records_its_calibration_images(runs):
    src, out = runs
    r = out["smoothquant"].report.to_dict()
    rec = out["smoothquant"].model.exit_policy.meta["calibration_data"]
    assert rec["n_images"] == 16 + 8 + r["n_calibration"]
    from lra_ee.provenance import fingerprints

    evaluated = {p for batch in r["executor_batches"]["batches"] for p in batch}
    digests = fingerprints(src)
    assert not {digests[p] for p in evaluated} & set(rec["sha256_16"]), "evaluation images are not calibration images"


def test_calibration_samples_are_random_and_disjoint(task_and_tower, monkeypatch):
    """Quantizer and QIRC images are seeded random samples of a class-sorted source, not its first images."""
    import lra_ee.api as api

    v, task = task_and_tower
    order = torch.argsort(task.labels, stable=True)
    src = TensorSource(task.images[order[:120]], task.labels[order[:120]])  # class-sorted, as an ImageNet folder
    seen = {}
    real_quantize, real_diagnose = api.quantize, api.diagnose

    def quantize(visual, scheme, images, backend):
        seen["q"] = images
        return real_quantize(visual, scheme, images, backend)

    def diagnose(visual, qvit, images, scheme):
        seen["r"] = images
        return real_diagnose(visual, qvit, images, scheme)

    monkeypatch.setattr(api, "quantize", quantize)
    monkeypatch.setattr(api, "diagnose", diagnose)
    api.calibrate(v, src, task.text_features, scheme="smoothquant", exit_layers=(3, 5), n_quant_calib=16, n_qirc=16)

    def which(images):
        return {int(torch.nonzero((src.images == im).flatten(1).all(1))[0]) for im in images}

    q, r = which(seen["q"]), which(seen["r"])
    assert len(q) == 16 and len(r) == 16 and not q & r
    assert len(set(src.labels[list(q)].tolist())) >= 4, "a random sample spans the classes; the first 16 span two"


def test_calibrate_api_with_unlabelled_images_then_evaluate(task_and_tower, tmp_path):
    from lra_ee import calibrate, evaluate_model
    from lra_kernels import QuantEarlyExitViT

    v, task = task_and_tower
    calib = TensorSource(task.images[:120])  # no labels: the gates learn to agree with FP32
    qvit, rep = calibrate(v, calib, task.text_features, scheme="smoothquant", exit_layers=(3, 5), n_quant_calib=16,
                          class_names=task.class_names, model_name="tiny", pretrained="random")
    assert rep.target == "fp32" and rep.exit_layers == [3, 5] and rep.qirc.scheme == "smoothquant"
    assert qvit.exit_policy.exit_layers == (3, 5) and qvit.class_names == task.class_names
    assert qvit.exit_policy.meta["source_model"] == {"open_clip_model": "tiny", "pretrained": "random", "seed": None}
    ev_src = TensorSource(task.images[100:], task.labels[100:])  # 20 of these calibrated the model
    res = evaluate_model(qvit, ev_src, fp32_visual=v, n_boot=200)
    assert res.split_check["checked"] and res.split_check["n_excluded"] == 20
    assert res.n_eval == 120 and res.target == "labels" and res.acc_fp32 is not None
    assert res.measured_by == "executor" and res.executor_check["exact"]
    assert res.acc_ee - res.acc_full == pytest.approx(res.quadrants["rescued"] - res.quadrants["hurt"])
    assert set(res.controls) == {"static_exit", "oracle", "random_gate", "head_confound"}
    qvit.save(tmp_path / "m")
    loaded = QuantEarlyExitViT.load(tmp_path / "m")
    assert loaded.exit_policy.meta["calibration_data"]["digest"] == qvit.exit_policy.meta["calibration_data"]["digest"]
    again = evaluate_model(loaded, ev_src, n_boot=200)
    assert again.acc_ee == res.acc_ee and again.exit_histogram == res.exit_histogram
    with pytest.raises(ValueError, match="all 20 evaluation images were used to calibrate"):
        evaluate_model(qvit, TensorSource(task.images[100:120], task.labels[100:120]))


def test_separate_evaluation_source_leaves_out_calibration_images(task_and_tower):
    v, task = task_and_tower
    calib = TensorSource(task.images[:150], task.labels[:150], task.class_names)
    ev = TensorSource(task.images[120:], task.labels[120:], task.class_names)  # its first 30 images calibrate too
    cfg = ExperimentConfig(scheme="smoothquant", seeds=(0,), n_quant_calib=16, n_qirc=8, n_boot=100, ablate=False,
                           random_gate_draws=50)
    res = run_experiment(v, calib, task.text_features, cfg, task.class_names, eval_source=ev, progress=False)
    r = res.report.to_dict()
    assert r["split_check"]["checked"] and r["split_check"]["n_excluded"] == 30 and r["n_eval"] == 90
    assert r["n_calibration"] == 150 - 16 - 8
    positions = sorted(p for b in r["executor_batches"]["batches"] for p in b)
    assert positions == list(range(30, 120)), "positions in the evaluation source, calibration images left out"
    assert r["executor_check"]["exact"]


def test_fp32_cache_is_reused_only_for_the_same_tower_source_and_classifier(task_and_tower, runs):
    """The FP32 tables of one experiment are not handed to another tower, source or classifier of the same
    sizes (the cache was once matched on sizes alone)."""
    import lra_ee.experiment as experiment

    v, task = task_and_tower
    src, out = runs
    sizes = (len(src), 16, 8, None)
    key, held = experiment.fp32_cache_key(v, src, None, task.text_features, 100.0, sizes)
    assert experiment.fp32_cache_key(v, src, None, task.text_features, 100.0, sizes)[0] == key
    other_src = TensorSource(task.images.flip(0), task.labels.flip(0), task.class_names)
    other_text = task.text_features.clone()
    for args in ((v, other_src, None, task.text_features, 100.0), (v, src, None, other_text, 100.0),
                 (make_tower(layers=6, width=64, seed=1), src, None, task.text_features, 100.0),
                 (v, src, None, task.text_features, 50.0)):
        assert experiment.fp32_cache_key(*args, sizes)[0] != key
    text = task.text_features.clone()
    k1 = experiment.fp32_cache_key(v, src, None, text, 100.0, sizes)[0]
    text.mul_(1.0)  # an in-place change, same object
    assert experiment.fp32_cache_key(v, src, None, text, 100.0, sizes)[0] != k1
    assert all(h is o for h, o in zip(out["paper"].fp32.held, (v, src, None, task.text_features)))


def test_run_experiment_recomputes_fp32_tables_for_another_source(task_and_tower, runs, monkeypatch):
    import lra_ee.experiment as experiment

    v, task = task_and_tower
    _, out = runs

    class Recomputed(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Recomputed

    monkeypatch.setattr(experiment, "collect_fp32_table", refuse)
    other = TensorSource(task.images.flip(0), task.labels.flip(0), task.class_names)  # same sizes, other images
    cfg = ExperimentConfig(scheme="smoothquant", seeds=(0,), n_quant_calib=16, n_qirc=8, n_boot=50, batch_size=32,
                           random_gate_draws=20, sensitivity_limit=16)
    with pytest.raises(Recomputed):
        run_experiment(v, other, task.text_features, cfg, task.class_names, fp32=out["paper"].fp32, progress=False)
