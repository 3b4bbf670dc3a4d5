"""Statistics on hand-made cases with known answers."""

import math

import numpy as np
import pytest

from lra_ee import stats


def test_quadrant_counts_and_identity():
    ee = np.array([1, 1, 0, 0, 1, 0, 1, 1], dtype=bool)
    full = np.array([1, 0, 1, 0, 0, 0, 1, 1], dtype=bool)
    q = stats.quadrants(ee, full)
    assert (q.both_right, q.rescued, q.hurt, q.both_wrong) == (3 / 8, 2 / 8, 1 / 8, 2 / 8)
    assert q.both_right + q.rescued + q.hurt + q.both_wrong == pytest.approx(1.0)
    assert ee.mean() - full.mean() == pytest.approx(q.rescued - q.hurt)


def test_quadrants_reject_bad_input():
    with pytest.raises(ValueError):
        stats.quadrants(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(ValueError, match="no samples"):
        stats.quadrants(np.ones(0, bool), np.ones(0, bool))


def test_mcnemar_textbook_values():
    # Exact: 1 vs 9 discordant pairs -> 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11 / 1024
    assert stats.mcnemar(1, 9) == pytest.approx(22 / 1024)
    assert stats.mcnemar(9, 1) == pytest.approx(22 / 1024)
    assert stats.mcnemar(5, 5) == 1.0 and stats.mcnemar(0, 0) == 1.0
    # Chi-square with continuity correction (the Wikipedia example, b=121, c=59): 20.67, p ~ 5.4e-6
    p = stats.mcnemar(121, 59, exact=False)
    assert p == pytest.approx(math.erfc(math.sqrt(((62 - 1) ** 2 / 180) / 2)))
    assert 4e-6 < p < 7e-6
    # For moderate n the exact and asymptotic tests agree roughly
    assert stats.mcnemar(60, 90, exact=True) == pytest.approx(stats.mcnemar(60, 90, exact=False), rel=0.15)


def test_paired_bootstrap_covers_the_true_delta():
    rng = np.random.default_rng(1)
    covered, trials = 0, 200
    for t in range(trials):
        # correlated pairs: B right with p=0.5; A = B flipped to right with prob 0.2, to wrong with prob 0.04
        b = rng.random(300) < 0.5
        a = np.where(b, rng.random(300) > 0.04, rng.random(300) < 0.2)
        true_delta = 0.5 * 0.2 - 0.5 * 0.04
        ci = stats.paired_bootstrap(a, b, n_boot=400, seed=t)["delta_ci"]
        covered += ci[0] <= true_delta <= ci[1]
    assert 0.88 <= covered / trials <= 0.99, f"95% CI covered the truth {covered}/{trials} times"


def test_bootstrap_ci_and_mean_std():
    v = np.r_[np.ones(70), np.zeros(30)]
    lo, hi = stats.bootstrap_ci(v, n_boot=1000)
    assert lo < 0.7 < hi and hi - lo < 0.25
    ms = stats.mean_std([0.5, 0.7, 0.6])
    assert ms["mean"] == pytest.approx(0.6) and ms["std"] == pytest.approx(0.1) and ms["n"] == 3
