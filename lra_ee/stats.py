"""Statistics for paired classifier comparisons: four quadrants, paired bootstrap, McNemar.

Two classifiers judged on the same n samples make a 2x2 table of counts
``(n11, n10, n01, n00)`` = (both right, only A right, only B right, both wrong). Everything the
paired bootstrap needs is in those four counts: resampling n pairs with replacement draws the
counts from ``Multinomial(n, (n11, n10, n01, n00) / n)``, so the bootstrap costs ``n_boot x 4``
numbers whatever n is (the same distribution as resampling index arrays, without the
``n_boot x n`` memory).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Quadrants:
    """Per-sample correctness of system A (early exit) against system B (the reference), as fractions.

    both_right: A and B right; rescued: A right, B wrong; hurt: A wrong, B right; both_wrong.
    Identity: acc_A - acc_B = rescued - hurt.
    """

    both_right: float
    rescued: float
    hurt: float
    both_wrong: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def _paired(a_correct, b_correct) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a_correct)
    b = np.asarray(b_correct)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"expected two equal-length 1-D arrays, got {a.shape} and {b.shape}")
    for name, x in (("a_correct", a), ("b_correct", b)):
        if x.dtype != bool and not np.isin(x, (0, 1)).all():
            raise ValueError(f"{name} must hold per-sample correctness (booleans or 0/1)")
    return a.astype(bool), b.astype(bool)


def cell_counts(a_correct, b_correct) -> np.ndarray:
    """``[n11, n10, n01, n00]``: both right, only A right, only B right, both wrong."""
    a, b = _paired(a_correct, b_correct)
    return np.array([(a & b).sum(), (a & ~b).sum(), (~a & b).sum(), (~a & ~b).sum()], dtype=np.int64)


def quadrants(a_correct: np.ndarray, b_correct: np.ndarray) -> Quadrants:
    a, b = _paired(a_correct, b_correct)
    n = a.size
    if n == 0:
        raise ValueError("no samples")
    c = cell_counts(a, b)
    q = Quadrants(both_right=float(c[0] / n), rescued=float(c[1] / n), hurt=float(c[2] / n),
                  both_wrong=float(c[3] / n), n=n)
    delta = a.mean() - b.mean()
    if abs(delta - (q.rescued - q.hurt)) > 1e-9:
        raise AssertionError(f"quadrant identity violated: acc_A - acc_B = {delta} but rescued - hurt = "
                             f"{q.rescued - q.hurt}")
    return q


def _percentile_ci(x: np.ndarray, level: float) -> list[float]:
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    return [float(np.quantile(x, lo_q)), float(np.quantile(x, hi_q))]


def bootstrap_counts(counts, n_boot: int, seed: int = 0) -> np.ndarray:
    """``[n_boot, 4]`` bootstrap replicates of the cell counts (multinomial resampling of the pairs)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if n == 0:
        raise ValueError("no samples")
    return np.random.default_rng(seed).multinomial(n, counts / n, size=n_boot)


def paired_bootstrap(
    a_correct: np.ndarray, b_correct: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """Percentile CIs for acc_A, acc_B and acc_A - acc_B (= rescued - hurt), resampling pairs."""
    c = cell_counts(a_correct, b_correct)
    n = int(c.sum())
    if n_boot <= 0 or n == 0:
        nan = [float("nan"), float("nan")]
        return {"acc_a_ci": nan, "acc_b_ci": nan, "delta_ci": nan, "level": level, "n_boot": 0}
    r = bootstrap_counts(c, n_boot, seed)
    acc_a, acc_b = (r[:, 0] + r[:, 1]) / n, (r[:, 0] + r[:, 2]) / n
    return {"acc_a_ci": _percentile_ci(acc_a, level), "acc_b_ci": _percentile_ci(acc_b, level),
            "delta_ci": _percentile_ci((r[:, 1] - r[:, 2]) / n, level), "level": level, "n_boot": n_boot}


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile CI of the mean of ``values``.

    0/1 values are resampled through their count (binomial); other values in chunks of at most
    about four million draws, so memory stays bounded for large ``n_boot x n``.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    if np.isin(v, (0.0, 1.0)).all():
        means = rng.binomial(v.size, v.mean(), size=n_boot) / v.size
    else:
        chunk = max(1, (1 << 22) // v.size)
        means = np.concatenate([v[rng.integers(0, v.size, size=(min(chunk, n_boot - s), v.size))].mean(1)
                                for s in range(0, n_boot, chunk)])
    return _percentile_ci(means, level)


def _log_binom_cdf_half(k: int, n: int) -> float:
    """``log P(X <= k)`` for ``X ~ Binomial(n, 1/2)``, exactly summed in log space."""
    i = np.arange(1, k + 1, dtype=np.float64)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log(n - i + 1) - np.log(i))])  # log C(n, 0..k)
    m = float(log_choose.max())
    return m + math.log(float(np.exp(log_choose - m).sum())) - n * math.log(2.0)


def mcnemar(rescued: int, hurt: int, exact: bool | None = None) -> float:
    """Two-sided McNemar p-value for the discordant counts (rescued vs hurt).

    Exact by default at every n: the two-sided binomial test of ``min(rescued, hurt)`` successes in
    ``n = rescued + hurt`` trials with p = 1/2 (``2 * P(X <= min)``, capped at 1; what
    ``scipy.stats.binomtest`` gives). ``exact=False`` asks for the chi-square statistic with
    continuity correction (1 degree of freedom) instead.
    """
    r, h = int(rescued), int(hurt)
    if r < 0 or h < 0:
        raise ValueError("counts must be non-negative")
    n = r + h
    if n == 0:
        return 1.0
    if exact is None or exact:
        k = min(r, h)
        if 2 * k >= n:
            return 1.0
        return min(1.0, 2.0 * math.exp(_log_binom_cdf_half(k, n)))
    stat = (abs(r - h) - 1.0) ** 2 / n
    return math.erfc(math.sqrt(stat / 2.0))  # survival function of chi2 with 1 dof


def mean_std(values) -> dict:
    v = np.asarray(list(values), dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}
