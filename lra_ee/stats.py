"""Statistics for paired classifier comparisons: four quadrants, paired bootstrap, McNemar."""

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


def quadrants(a_correct: np.ndarray, b_correct: np.ndarray) -> Quadrants:
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"expected two equal-length 1-D arrays, got {a.shape} and {b.shape}")
    n = a.size
    if n == 0:
        raise ValueError("no samples")
    q = Quadrants(
        both_right=float((a & b).sum()) / n,
        rescued=float((a & ~b).sum()) / n,
        hurt=float((~a & b).sum()) / n,
        both_wrong=float((~a & ~b).sum()) / n,
        n=n,
    )
    delta = a.mean() - b.mean()
    if abs(delta - (q.rescued - q.hurt)) > 1e-9:
        raise AssertionError(f"quadrant identity violated: acc_A - acc_B = {delta} but rescued - hurt = {q.rescued - q.hurt}")
    return q


def paired_bootstrap(
    a_correct: np.ndarray, b_correct: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """Percentile CIs for acc_A, acc_B and acc_A - acc_B, resampling samples (pairs kept together)."""
    a = np.asarray(a_correct, dtype=np.float64)
    b = np.asarray(b_correct, dtype=np.float64)
    n = a.size
    if n_boot <= 0:
        nan = [float("nan"), float("nan")]
        return {"acc_a_ci": nan, "acc_b_ci": nan, "delta_ci": nan, "level": level, "n_boot": 0}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    acc_a, acc_b = a[idx].mean(1), b[idx].mean(1)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2

    def ci(x):
        return [float(np.quantile(x, lo_q)), float(np.quantile(x, hi_q))]

    return {"acc_a_ci": ci(acc_a), "acc_b_ci": ci(acc_b), "delta_ci": ci(acc_a - acc_b),
            "level": level, "n_boot": n_boot}


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile CI of the mean of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)
    return [float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, 1 - (1 - level) / 2))]


def mcnemar(rescued: int, hurt: int, exact: bool | None = None) -> float:
    """Two-sided McNemar p-value for discordant counts (rescued vs hurt).

    Exact binomial test (n = rescued + hurt, p = 1/2) when ``exact`` or n < 200 by default;
    otherwise the chi-square statistic with continuity correction, 1 degree of freedom.
    """
    r, h = int(rescued), int(hurt)
    if r < 0 or h < 0:
        raise ValueError("counts must be non-negative")
    n = r + h
    if n == 0:
        return 1.0
    if exact is None:
        exact = n < 200
    if exact:
        k = min(r, h)
        # P(X <= k) for X ~ Binomial(n, 1/2), in log space for large n
        log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
        m = max(log_terms)
        tail = math.exp(m) * sum(math.exp(t - m) for t in log_terms)
        return min(1.0, 2.0 * tail)
    stat = (abs(r - h) - 1.0) ** 2 / n
    return math.erfc(math.sqrt(stat / 2.0))  # survival function of chi2 with 1 dof


def mean_std(values) -> dict:
    v = np.asarray(list(values), dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}
