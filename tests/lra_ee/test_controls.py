"""The controls on hand-made exit tables with known answers."""

import numpy as np
import pytest
import torch

from lra_ee import controls as ctl
from lra_ee.exits import ExitTable
from lra_kernels import ExitPolicy
from lra_kernels.config import VisionArch
from lra_kernels.flops import flops_model

ARCH = VisionArch((32, 32), (8, 8), 64, 4, 4, 256, "gelu", 32)
C = 5


def _table(right: np.ndarray, labels: np.ndarray, features=None, depth_patch_right=None) -> ExitTable:
    """``right[L + 1, N]``: is each exit (then full depth, layer 4) right; exits after blocks 1..3."""
    L = right.shape[0] - 1
    top5 = np.zeros((L + 1, labels.size, C), dtype=np.int64)
    top5[:, :, 0] = np.where(right, labels[None], (labels[None] + 1) % C)
    for k in range(1, C):
        top5[:, :, k] = (top5[:, :, 0] + k) % C
    if features is None:
        features = np.random.default_rng(0).random((L, labels.size, 3)).astype(np.float32)
    dp = None
    if depth_patch_right is not None:
        dp = top5[-1].copy()
        dp[:, 0] = np.where(depth_patch_right, labels, (labels + 1) % C)
    return ExitTable(tuple(range(1, L + 1)) + (4,), "patch_mean", top5, features, labels, None, np.arange(labels.size),
                     depth_patch_top5=dp)


def test_static_exit_and_oracle():
    rng = np.random.default_rng(1)
    n = 400
    labels = rng.integers(0, C, n)
    right = rng.random((4, n)) < np.array([0.3, 0.5, 0.6, 0.7])[:, None]
    t = _table(right, labels)
    fm = flops_model(ARCH, C)
    st = ctl.static_exit(t, labels, fm, n_boot=200)
    for layer in (1, 2, 3):
        s = st[layer]
        assert s["acc"] == pytest.approx(right[layer - 1].mean())
        assert s["acc_reference"] == pytest.approx(right[3].mean())
        assert s["rescued"] == pytest.approx((right[layer - 1] & ~right[3]).mean())
        assert s["hurt"] == pytest.approx((~right[layer - 1] & right[3]).mean())
        assert s["delta_ci95"][0] <= s["delta"] <= s["delta_ci95"][1]
        assert s["flops_saving"] == pytest.approx(1 - (fm.embed + layer * fm.block + fm.exit_head) / fm.full())
    o = ctl.oracle(t, labels, (2, 3), fm, n_boot=200)
    assert o["per_layer"][2]["acc"] == pytest.approx((right[1] | right[3]).mean()) and o["per_layer"][2]["hurt"] == 0
    e = o["exit_set"]
    assert e["acc"] == pytest.approx((right[1] | right[2] | right[3]).mean()) and e["hurt"] == 0
    assert e["rescued"] == pytest.approx(((right[1] | right[2]) & ~right[3]).mean())
    # the oracle leaves at the first right exit: its FLOPs follow
    first = np.where(right[1], 2, np.where(right[2], 3, 4))
    want = fm.per_sample(torch.from_numpy(first), (2, 3)).double().mean()
    assert e["flops_saving"] == pytest.approx(1 - float(want) / fm.full())


def _policy_on_feature0(tau):
    """Leave at exit j when feature 0 (the planted 'I am right' signal) is high."""
    w = torch.tensor([[8.0, 0.0, 0.0]] * 3)
    return ExitPolicy((1, 2, 3), w, torch.full((3,), -4.0), torch.zeros(3, 3), torch.ones(3, 3), torch.full((3,), tau))


def test_random_gate_keeps_the_histogram_and_measures_the_noise_floor():
    rng = np.random.default_rng(2)
    n = 2000
    labels = rng.integers(0, C, n)
    right = rng.random((4, n)) < np.array([0.4, 0.5, 0.6, 0.6])[:, None]
    feats = np.where(right[:3, :, None], 0.9, 0.1) * np.ones((3, n, 3)) + 0.05 * rng.random((3, n, 3))
    t = _table(right, labels, feats.astype(np.float32))
    g = ctl.random_gate(t, labels, _policy_on_feature0(0.5), n_draws=400, seed=3)
    hist = g["exit_histogram"]
    assert sum(hist.values()) == pytest.approx(1.0)
    # a random deal of that histogram: expected accuracy = sum of histogram share x that exit's accuracy
    expect = sum(hist[layer] * right[i].mean() for i, layer in enumerate((1, 2, 3, 4))) - right[3].mean()
    assert g["random_mean"] == pytest.approx(expect, abs=0.005)
    assert g["random_ci95"][0] < expect < g["random_ci95"][1]
    # the planted gate picks exactly the right samples: far above the noise floor
    assert g["gate_rescued_minus_hurt"] > g["random_ci95"][1] and g["p_value"] == pytest.approx(1 / 401)


def test_head_confound():
    rng = np.random.default_rng(4)
    n = 300
    labels = rng.integers(0, C, n)
    right = rng.random((4, n)) < 0.5
    patch = rng.random(n) < 0.7
    h = ctl.head_confound(_table(right, labels, depth_patch_right=patch), labels, n_boot=200,
                          ee_rescued=right[0] & ~right[3])
    assert h["acc_own_head"] == pytest.approx(right[3].mean())
    assert h["acc_patch_mean_at_depth"] == pytest.approx(patch.mean())
    assert h["delta"] == pytest.approx(patch.mean() - right[3].mean())
    r = right[0] & ~right[3]
    assert h["ee_rescued"] == r.sum() and h["ee_rescued_also_by_patch_mean_at_depth"] == pytest.approx(patch[r].mean())
    with pytest.raises(ValueError, match="patch-mean head at full depth"):
        ctl.head_confound(_table(right, labels), labels)


def test_fp32_early_exit_runs_the_method_and_needs_labels():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, C, 400)
    right = rng.random((4, 400)) < np.array([0.5, 0.6, 0.7, 0.7])[:, None]
    feats = (np.where(right[:3, :, None], 0.8, 0.2) + 0.3 * rng.random((3, 400, 3))).astype(np.float32)
    t = _table(right, labels, feats)
    calib, ev = t.subset(np.arange(200)), t.subset(np.arange(200, 400))
    f = ctl.fp32_early_exit(calib, ev, arch=ARCH, num_classes=C, exit_layers=(2, 3), target="labels", n_boot=200)
    assert f["exit_layers"] == [2, 3] and f["acc_ee"] - f["acc_full"] == pytest.approx(f["rescued"] - f["hurt"])
    assert f["acc_full"] == pytest.approx(right[3, 200:].mean())
    assert f["acc_ee"] > f["acc_full"], "informative features and better exits: early exit wins on FP32 too"
    assert "skipped" in ctl.fp32_early_exit(calib, ev, arch=ARCH, num_classes=C, target="fp32")


def test_merge_orders_by_nsr_and_renders_one_table():
    def entry(scheme, nsr):
        ev = {"acc_full": 0.6, "acc_ee": 0.61, "rescued": 0.03, "hurt": 0.02, "delta_ci95": [-0.01, 0.03],
              "flops_saving": 0.1}
        return ctl.nsr_entry(scheme, nsr, ev, "executor")

    a = {"rescued_minus_hurt_by_nsr": [entry("fp32", 0.0), entry("paper", 0.5)], "fp32_early_exit": {"x": 1},
         "random_gate": {"paper": {"random_mean": 0.0, "random_ci95": [-0.01, 0.01], "gate_rescued_minus_hurt": 0.01,
                                   "p_value": 0.2}}}
    b = {"rescued_minus_hurt_by_nsr": [entry("fp32", 0.0), entry("smoothquant", 0.01)], "fp32_early_exit": {"x": 2},
         "random_gate": {"smoothquant": {"random_mean": 0.0, "random_ci95": [-0.02, 0.02],
                                         "gate_rescued_minus_hurt": 0.0, "p_value": 0.5}}}
    m = ctl.merge_controls([a, b])
    assert [e["scheme"] for e in m["rescued_minus_hurt_by_nsr"]] == ["fp32", "smoothquant", "paper"]
    assert m["fp32_early_exit"] == {"x": 1} and set(m["random_gate"]) == {"paper", "smoothquant"}
    rows = ctl.table_rows(m)
    assert [r["control"] for r in rows] == ["fp32_early_exit"] + ["early exit (LRA-EE)"] * 2 + ["random_gate"] * 2
    from lra_ee.report import controls_markdown

    md = controls_markdown(m)
    assert len(md) == 2 + len(rows) and "| random_gate | paper | gate's histogram, random choice |" in md[-2]
    assert "+1.00 [-1.00, +3.00]" in md[2]
