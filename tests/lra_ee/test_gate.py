"""Gate training, INR thresholds, simulation and the calibration / evaluation split discipline."""

import numpy as np
import pytest
import torch

from lra_ee.exits import ExitTable, simulate
from lra_ee.gate import fit_logistic, gate_scores, inr, standardisation, thresholds, train_gate
from lra_ee.method import evaluate, fit_policy, policy_scores, resolve_exit_layers


def test_logistic_regression_recovers_a_planted_rule():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((40000, 3))
    w_true, b_true = np.array([2.0, -1.0, 0.5]), 0.3
    y = rng.random(40000) < 1 / (1 + np.exp(-(z @ w_true + b_true)))
    w, b, it = fit_logistic(z, y, l2=0.0)
    np.testing.assert_allclose(w, w_true, atol=0.08)
    assert b == pytest.approx(b_true, abs=0.06) and it < 50


def test_one_class_targets_and_dropped_features():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((100, 3))
    fit = train_gate(f, np.ones(100, bool))
    assert (fit.weight == 0).all() and fit.bias > 5
    fit = train_gate(f, f[:, 1] > 0, use=(0, 2))
    assert fit.weight[1] == 0 and fit.n == 100


def test_nonfinite_rows_are_ignored_in_training_and_never_exit():
    rng = np.random.default_rng(2)
    f = rng.standard_normal((200, 3))
    f[5] = np.nan
    fit = train_gate(f, f[:, 0] > 0)
    assert fit.n == 199 and np.isfinite(fit.weight).all()
    s = gate_scores(fit, f)
    assert np.isnan(s[5])
    mean, std = standardisation(f)
    assert np.isfinite(mean).all() and (std > 0).all()


def test_thresholds_formula():
    v = np.array([1.0, 4.0, 16.0])  # geometric mean 4
    np.testing.assert_allclose(thresholds(0.6, v, 0.0), [0.6, 0.6, 0.6])
    t = thresholds(0.6, v, 0.5)
    np.testing.assert_allclose(t, [min(1.0, 0.6 * 2.0), 0.6, 0.3])
    assert t[2] < t[1] < t[0], "higher INR must mean an easier exit"
    np.testing.assert_allclose(inr([0.5, 0.6], [0.1, 0.0]), [5.0, 0.6 / 1e-6])


def _table(n=400, seed=0, exits=(2, 3)):
    """A synthetic exit table: exits right when their confidence feature is high."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    L = len(exits)
    feats = rng.random((L, n, 3)).astype(np.float32)
    top5 = np.zeros((L + 1, n, 5), dtype=np.int64)
    for j in range(L):
        right = rng.random(n) < feats[j, :, 0]
        top5[j, :, 0] = np.where(right, labels, (labels + 1) % 5)
    top5[L, :, 0] = np.where(rng.random(n) < 0.6, labels, (labels + 2) % 5)
    for k in range(1, 5):
        top5[:, :, k] = (top5[:, :, 0] + k) % 5
    return ExitTable(tuple(exits) + (4,), "patch_mean", top5, feats, labels, top5[L].copy(), np.arange(n))


def test_simulation_takes_the_first_exit_whose_gate_clears():
    t = _table(n=6)
    scores = np.array([[0.9, 0.1, np.nan, 0.1, 0.95, 0.2], [0.1, 0.9, 0.99, 0.1, 0.1, 0.8]])
    sim = simulate(t, scores, np.array([0.5, 0.85]))
    assert sim.exit_layer.tolist() == [2, 3, 3, 4, 2, 4]
    assert (sim.top5[1] == t.top5[1, 1]).all() and (sim.top5[3] == t.top5[2, 3]).all()


def test_fit_policy_and_evaluate_on_disjoint_splits():
    from lra_kernels.config import VisionArch

    arch = VisionArch((32, 32), (8, 8), 64, 4, 4, 256, "gelu", 32)
    calib, ev = _table(seed=0), _table(seed=1)
    nsr = [0.0, 0.05, 0.1, 0.15, 0.2]
    policy, rep = fit_policy(calib, nsr, arch=arch, num_classes=5, exit_layers=(2, 3))
    assert rep.exit_layers == [2, 3] and rep.target == "labels" and len(rep.thresholds) == 2
    assert rep.gates[0]["weight"][0] > 1.0, "the planted rule (confidence predicts correctness) must be learnt"
    res = evaluate(ev, policy, arch, 5, n_boot=200)
    assert res.acc_ee - res.acc_full == pytest.approx(res.quadrants["rescued"] - res.quadrants["hurt"])
    assert sum(res.exit_histogram.values()) == pytest.approx(1.0)
    assert 0 < res.flops_saving < 1 and res.flops_ee < res.flops_full
    assert res.delta_ci95[0] <= res.delta <= res.delta_ci95[1]
    # Exits here are right exactly when confident, the full depth only 60%: early exit must win.
    assert res.acc_ee > res.acc_full
    # Policy scores equal what the executor computes from the same features (fp32 ExitPolicy math)
    s = policy_scores(policy, ev)
    torch.testing.assert_close(torch.from_numpy(s[0]), policy.gate_scores(0, torch.from_numpy(ev.features[0])))


def test_flops_budget_is_respected():
    from lra_kernels.config import VisionArch

    arch = VisionArch((32, 32), (8, 8), 64, 4, 4, 256, "gelu", 32)
    t = _table()
    _, rep = fit_policy(t, [0.0, 0.05, 0.1, 0.15, 0.2], arch=arch, num_classes=5, exit_layers=(2, 3), flops_budget=0.7)
    assert 1 - rep.calib_flops_saving <= 0.7 + 1e-9
    with pytest.raises(ValueError, match="budget"):
        fit_policy(t, [0.0, 0.05, 0.1, 0.15, 0.2], arch=arch, num_classes=5, exit_layers=(2, 3), flops_budget=0.1)


def test_exit_layer_presets():
    assert resolve_exit_layers("paper", 12) == (8, 10, 11)
    assert resolve_exit_layers("3,1", 12) == (1, 3)
    assert resolve_exit_layers("auto", 12) is None
    with pytest.raises(ValueError, match="12-block"):
        resolve_exit_layers("paper", 6)
    with pytest.raises(ValueError, match="1..5"):
        resolve_exit_layers((2, 6), 6)


def test_logistic_regression_matches_scikit_learn():
    sklearn_lm = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(7)
    n, l2 = 3000, 1e-2
    z = rng.standard_normal((n, 3)) * np.array([1.0, 2.0, 0.5]) + np.array([0.3, -0.2, 0.0])
    y = rng.random(n) < 1 / (1 + np.exp(-(z @ np.array([1.5, -0.7, 0.2]) - 0.4)))
    w, b, _ = fit_logistic(z, y, l2=l2)
    # ours: mean log-loss + l2/2 |w|^2 (bias free); scikit-learn: C * sum log-loss + 1/2 |w|^2  ->  C = 1 / (l2 n)
    ref = sklearn_lm.LogisticRegression(C=1.0 / (l2 * n), tol=1e-12, max_iter=10000).fit(z, y)
    np.testing.assert_allclose(w, ref.coef_[0], atol=1e-5)
    assert b == pytest.approx(float(ref.intercept_[0]), abs=1e-5)


def test_no_early_exit_is_a_possible_answer():
    """Exits right 60% of the time with uninformative features, full depth always right: every threshold
    up to 1 lets samples leave at the high-INR exit (its threshold is tau0 / 2), so only "no early exit"
    keeps the calibration accuracy."""
    from lra_ee.gate import NO_EXIT
    from lra_kernels.config import VisionArch

    rng = np.random.default_rng(8)
    n = 600
    labels = rng.integers(0, 5, n)
    top5 = np.zeros((3, n, 5), dtype=np.int64)
    for j in range(2):
        top5[j, :, 0] = np.where(rng.random(n) < 0.6, labels, (labels + 1) % 5)
    top5[2, :, 0] = labels
    for k in range(1, 5):
        top5[:, :, k] = (top5[:, :, 0] + k) % 5
    t = ExitTable((2, 3, 4), "patch_mean", top5, rng.random((2, n, 3)).astype(np.float32), labels, None, np.arange(n))
    arch = VisionArch((32, 32), (8, 8), 64, 4, 4, 256, "gelu", 32)
    nsr = [0.0, 0.01, 0.01, 0.04, 0.2]  # INR of exit 2 is four times exit 3's: thresholds tau0/2 and 2 tau0
    policy, rep = fit_policy(t, nsr, arch=arch, num_classes=5, exit_layers=(2, 3))
    assert rep.no_early_exit and rep.tau0 == NO_EXIT and policy.meta["no_early_exit"]
    assert (policy.threshold > 1).all() and rep.calib_acc_ee == rep.calib_acc_full == 1.0
    sim = simulate(t, policy_scores(policy, t), policy.threshold.numpy())
    assert (sim.exit_layer == 4).all()
    np.testing.assert_allclose(thresholds(NO_EXIT, np.array([1.0, 4.0]), 1.0), [NO_EXIT, NO_EXIT])
    best_grid = max((s for s in rep.tau0_search if s["tau0"] <= 1), key=lambda s: s["acc"])
    assert best_grid["acc"] < 1.0, "no threshold of the old grid avoids the harmful exits"


def test_only_a_gate_without_classifier_features_is_label_agnostic():
    """A gate over the spatial variance alone is marked label_agnostic (and is_label_agnostic checks the weights);
    one that reads confidence or margin is not, even when the fit happens to give them little weight."""
    from lra_ee.gate import is_label_agnostic
    from lra_kernels.config import VisionArch

    arch = VisionArch((32, 32), (8, 8), 64, 4, 4, 256, "gelu", 32)
    t = _table()
    nsr = [0.0, 0.05, 0.1, 0.15, 0.2]
    cases = {(2,): True, (0, 1, 2): False, (0, 2): False, (1,): False}
    for features, agnostic in cases.items():
        policy, _ = fit_policy(t, nsr, arch=arch, num_classes=5, exit_layers=(2, 3), features=features, tau0=0.5)
        assert policy.meta["label_agnostic"] is agnostic, features
        assert is_label_agnostic(policy) is agnostic, features
        if agnostic:
            assert (policy.weight[:, :2] == 0).all() and (policy.weight[:, 2] != 0).any()
