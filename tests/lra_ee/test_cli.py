"""The real command line, run as a subprocess: demo, calibrate, evaluate, diagnose, clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_data import write_image_folder

REPORT_KEYS = {
    "model", "weights", "data", "scheme", "n_calibration", "n_eval", "acc_fp32", "acc_full", "acc_ee", "delta_ci95",
    "quadrants", "mcnemar_p", "flops_full", "flops_ee", "flops_saving", "exit_histogram", "nsr_per_layer",
    "inr_per_exit", "thresholds", "ablations", "alpha_sweep", "throughput", "controls", "quadrants_by_exit",
    "executor_check", "executor_batches", "split_check", "exit_layers_per_seed", "flags", "measured_by",
}
CONTROLS = {"fp32_early_exit", "static_exit", "oracle", "random_gate", "head_confound", "batch_sensitivity",
            "rescued_minus_hurt_by_nsr"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, timeout=600):
    # the package under test, whatever copy of it is installed: the tests' own checkout first on the path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "lra_ee.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def check_png(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def check_quadrants(r):
    q = r["quadrants"]
    assert set(q) == {"both_right", "rescued", "hurt", "both_wrong"}
    assert sum(q.values()) == pytest.approx(1.0)
    assert r["acc_ee"] - r["acc_full"] == pytest.approx(q["rescued"] - q["hurt"], abs=1e-9)


def test_demo_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    res = run_cli("demo", "--model", "ViT-S-32", "--images", "96", "--classes", "6", "--bench-seconds", "0.1",
                  "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(r), REPORT_KEYS - set(r)
    assert r["weights"] == "random-seeded" and "synthetic" in r["data"]
    check_quadrants(r)
    for s in r["schemes"].values():
        q = s["quadrants"]
        assert s["acc_ee"] - s["acc_full"] == pytest.approx(q["rescued"] - q["hurt"], abs=1e-9)
    assert len(r["nsr_per_layer"]) == 13
    assert set(r["nsr_per_scheme"]) == {"paper", "per_token", "smoothquant", "per_tensor_static"}
    for name in ("qirc_nsr.png", "exit_histogram.png", "quadrants.png", "pareto.png"):
        check_png(out / name)
    assert CONTROLS <= set(r["controls"]), CONTROLS - set(r["controls"])
    assert [e["scheme"] for e in r["controls"]["rescued_minus_hurt_by_nsr"]] == ["fp32", "smoothquant", "paper"]
    assert set(r["controls"]["batch_sensitivity"]) == {"paper"}
    md = (out / "report.md").read_text()
    assert "![QIRC](qirc_nsr.png)" in md and "random" in md
    assert "## Controls" in md and "| random_gate | paper |" in md and "| batch_sensitivity | paper | b1 |" in md
    assert "controls (random weights, synthetic task)" in res.stdout
    assert (out / "model" / "config.json").is_file()
    assert "img/s" in res.stdout and "FLOPs saved" in res.stdout


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "data"
    return write_image_folder(root, classes=("ant", "bee", "cat"), per_class=14, size=(64, 48), corrupt=True)


COMMON = ["--model", "ViT-S-32", "--pretrained", "random", "--seeds", "0", "--quant-calib-images", "6",
          "--qirc-images", "4", "--workers", "0", "--templates", "simple", "--batch-size", "16"]


def test_calibrate_then_evaluate_model_dir(folder, tmp_path):
    """The README's pairing: calibrate on --data D, evaluate --model-dir on the same D. The calibration
    images are recorded in the model and left out of the evaluation, which says so."""
    out = tmp_path / "cal"
    res = run_cli("calibrate", *COMMON, "--data", str(folder), "--calib-fraction", "0.5", "--exit-layers", "6,9",
                  "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["exit_layers"] == [6, 9] and len(cal["thresholds"]) == 2
    check_png(out / "qirc_nsr.png")
    from lra_kernels import QuantEarlyExitViT

    q = QuantEarlyExitViT.load(out / "model")
    assert q.exit_policy.exit_layers == (6, 9) and q.class_names == ["ant", "bee", "cat"]
    rec = q.exit_policy.meta["calibration_data"]
    assert rec["n_images"] == 22 and len(rec["files"]) == 22, "half of the 43 files calibrate"
    assert q.exit_policy.meta["source_model"] == {"open_clip_model": "ViT-S-32", "pretrained": "random", "seed": 0}

    ev_out = tmp_path / "ev"
    res = run_cli("evaluate", "--model-dir", str(out / "model"), "--data", str(folder), "--workers", "0",
                  "--out", str(ev_out), "--format", "clip_benchmark")
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((ev_out / "report.json").read_text())
    cb = {json.loads(p.read_text())["pretrained"]: json.loads(p.read_text())
          for p in (ev_out / "clip_benchmark").glob("*.json")}
    assert set(cb) == {"random lra-ee smoothquant int8", "random lra-ee smoothquant int8 early-exit"}, cb
    ee = cb["random lra-ee smoothquant int8 early-exit"]
    assert ee["dataset"] == "data" and ee["model"] == "ViT-S-32" and ee["task"] == "zeroshot_classification"
    assert ee["metrics"]["acc1"] == r["acc_ee"] and ee["metrics"]["flops_saving"] == r["flops_saving"]
    assert cb["random lra-ee smoothquant int8"]["metrics"] == {"acc1": r["acc_full"], "acc5": r["top5_full"]}
    broken_in_calibration = "ant/broken.jpg" in rec["files"]
    assert r["split_check"]["checked"] and r["split_check"]["n_excluded"] == 22
    assert r["n_eval"] == 43 - 22 - (0 if broken_in_calibration else 1)
    assert r["n_skipped"] == (0 if broken_in_calibration else 1), "the corrupt file is skipped and counted"
    assert "disjoint (checked by content hash): 22 of the model's 22 calibration images" in res.stdout
    check_quadrants(r)
    assert r["measured_by"] == "executor" and r["executor_check"]["exact"]
    md = (ev_out / "report.md").read_text()
    assert "disjoint — checked: content hash" in md

    # the FP32 reference must be the tower that was quantized
    res = run_cli("evaluate", "--model-dir", str(out / "model"), "--data", str(folder), "--workers", "0",
                  "--model", "ViT-B-32", "--pretrained", "random", "--out", str(tmp_path / "ev2"), timeout=300)
    assert res.returncode == 2
    err = [line for line in res.stderr.strip().splitlines() if line.startswith("lra-ee: error:")]
    assert len(err) == 1 and "quantized from ViT-S-32, not ViT-B-32" in err[0], res.stderr[-2000:]
    res = run_cli("evaluate", "--model-dir", str(out / "model"), "--data", str(folder), "--workers", "0",
                  "--pretrained", "random", "--seed", "3", "--out", str(tmp_path / "ev3"), timeout=300)
    assert res.returncode == 2 and "random weights with seed 0, not 3" in res.stderr, res.stderr[-2000:]


def test_evaluate_full_experiment(folder, tmp_path):
    out = tmp_path / "exp"
    res = run_cli("evaluate", *COMMON, "--data", str(folder), "--exit-layers", "8,10,11", "--scheme", "paper",
                  "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((out / "report.json").read_text())
    assert r["weights"] == "random" or r["weights"] == "random-seeded"
    assert r["exit_layers"] == [8, 10, 11] and r["scheme"] == "paper"
    check_quadrants(r)
    assert r["n_skipped"] == 1
    assert r["n_quant_calibration"] + r["n_qirc"] + r["n_calibration"] + r["n_eval"] == 42
    assert r["executor_check"]["n"] == r["n_eval"] and "batch_sensitivity" in r["controls"]
    for name in ("qirc_nsr.png", "exit_histogram.png", "quadrants.png", "pareto.png"):
        check_png(out / name)


def test_diagnose(tmp_path):
    res = run_cli("diagnose", "--model", "ViT-S-32", "--pretrained", "random", "--images", "4", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((tmp_path / "qirc.json").read_text())
    assert set(r["schemes"]) == {"paper", "per_token", "smoothquant", "per_tensor_static"}
    check_png(tmp_path / "qirc_nsr.png")


@pytest.mark.parametrize(
    "args,message",
    [
        (["calibrate", "--pretrained", "/no/such/checkpoint.pt", "--data", "."],
         "checkpoint /no/such/checkpoint.pt not found"),
        (["calibrate", "--model", "ViT-S-32", "--pretrained", "random", "--data", "EMPTY"], "no images found"),
        (["evaluate", "--model-dir", "/no/such/dir", "--data", "."], "no model directory"),
        (["calibrate", "--model", "ViT-Nope", "--data", "."], "unknown model"),
    ],
)
def test_clear_errors(tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [str(empty) if a == "EMPTY" else a for a in args]
    res = run_cli(*args, "--out", str(tmp_path / "o"), timeout=120)
    assert res.returncode == 2
    err = [line for line in res.stderr.strip().splitlines() if line.startswith("lra-ee: error:")]
    assert len(err) == 1 and message in err[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
