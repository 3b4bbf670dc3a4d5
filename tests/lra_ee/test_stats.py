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


def test_mcnemar_is_exact_at_every_n_and_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    cases = [(1, 9), (0, 7), (130, 90), (121, 59), (300, 300), (301, 300), (2100, 1900)]
    cases += [tuple(int(x) for x in rng.integers(0, 3000, 2)) for _ in range(5)]
    cases.append((9500, 7100))  # the paper's 9.5% / 7.1% of 100k discordant-pair scale
    for r, h in cases:
        want = scipy_stats.binomtest(min(r, h), r + h, 0.5).pvalue if r + h else 1.0
        assert stats.mcnemar(r, h) == pytest.approx(want, rel=1e-9, abs=1e-300), (r, h)
    # above 200 discordant pairs the default used to switch to the chi-square approximation
    assert stats.mcnemar(130, 90) != pytest.approx(stats.mcnemar(130, 90, exact=False), rel=1e-3)


def _cells(rng, n, p=(0.55, 0.1, 0.07, 0.28)):
    cell = rng.choice(4, size=n, p=p)
    return np.isin(cell, (0, 1)), np.isin(cell, (0, 2))  # A right in cells 0, 1; B right in cells 0, 2


def test_paired_bootstrap_matches_scipy_bootstrap():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    a, b = _cells(rng, 600)
    ours = stats.paired_bootstrap(a, b, n_boot=20000, seed=5)
    theirs = scipy_stats.bootstrap((a.astype(float), b.astype(float)), lambda x, y: x.mean() - y.mean(), paired=True,
                                   vectorized=False, n_resamples=20000, method="percentile", random_state=6)
    lo, hi = theirs.confidence_interval
    assert ours["delta_ci"] == pytest.approx([lo, hi], abs=0.006)
    acc = scipy_stats.bootstrap((a.astype(float),), np.mean, n_resamples=20000, method="percentile", random_state=7)
    assert ours["acc_a_ci"] == pytest.approx(list(acc.confidence_interval), abs=0.006)
    assert stats.bootstrap_ci(a, n_boot=20000, seed=8) == pytest.approx(list(acc.confidence_interval), abs=0.006)


def test_bootstrap_memory_does_not_grow_with_n_boot_times_n():
    import tracemalloc

    rng = np.random.default_rng(5)
    a, b = _cells(rng, 40000)
    tracemalloc.start()
    res = stats.paired_bootstrap(a, b, n_boot=2000, seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20e6, f"{peak / 1e6:.0f} MB for 2000 x 40000 resamples (index arrays would take 640 MB)"
    assert res["delta_ci"][0] < a.mean() - b.mean() < res["delta_ci"][1]


def test_cell_counts_and_bad_input():
    a = np.array([1, 1, 0, 0, 1], dtype=bool)
    b = np.array([1, 0, 1, 0, 1], dtype=bool)
    assert stats.cell_counts(a, b).tolist() == [2, 1, 1, 1]
    with pytest.raises(ValueError, match="correctness"):
        stats.paired_bootstrap(np.array([0.5, 1.0]), np.array([1.0, 0.0]))
    lo, hi = stats.bootstrap_ci(np.linspace(0, 1, 101), n_boot=500)
    assert lo < 0.5 < hi
