"""The exit gate: standardisation, logistic regression, INR-adaptive thresholds.

Per exit layer l the gate is ``p = sigmoid(w . z + b)`` with ``z = (f - mean) / std`` over the
features f = (confidence, margin, spatial variance), trained by L2-regularised maximum
likelihood (Newton's method) to predict "this exit's prediction is correct".

Thresholds (docs/method.md): ``tau_l = clamp(tau0 * (INR_ref / INR_l) ** alpha, 0, 1)`` with
``INR_l = acc_l / NSR_l`` and ``INR_ref`` the geometric mean of the exits' INRs, so an
informative, low-noise exit (high INR) gets a lower threshold; ``alpha = 0`` is one flat
threshold ``tau0``. ``tau0 > 1`` (``NO_EXIT``) means "no early exit": every threshold is ``tau0``,
above any probability, so no sample leaves (a clamped threshold of 1 would still let a gate
that saturates to 1.0 in fp32 exit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lra_kernels.names import GATE_FEATURES, N_FEATURES

NO_EXIT = 2.0  # the tau0 of "no early exit": thresholds above any gate probability
# Gate features computed from the exit head's logits, i.e. from the classifier the policy was calibrated
# on; the spatial variance of the patch tokens does not see the classifier.
CLASSIFIER_FEATURES = ("confidence", "margin")
LABEL_FREE_FEATURES = tuple(f for f in GATE_FEATURES if f not in CLASSIFIER_FEATURES)


def uses_only_label_free_features(features) -> bool:
    """Whether a gate over the feature indices ``features`` ignores the classifier (no confidence, no margin)."""
    return all(GATE_FEATURES[i] in LABEL_FREE_FEATURES for i in features)


def is_label_agnostic(policy) -> bool:
    """Whether an ``ExitPolicy``'s exit decisions may be applied to label sets other than the one it was
    calibrated on: its meta says ``label_agnostic`` (set by calibration only for a gate without the
    classifier-dependent features) and its gates indeed give those features zero weight, so a sample's
    exit layer does not depend on the classifier."""
    if not policy.enabled or policy.meta.get("label_agnostic") is not True:
        return False
    cols = [GATE_FEATURES.index(f) for f in CLASSIFIER_FEATURES]
    return bool((policy.weight[:, cols] == 0).all())


@dataclass(frozen=True)
class GateFit:
    weight: np.ndarray  # [N_FEATURES] (zeros for dropped features)
    bias: float
    mean: np.ndarray  # [N_FEATURES]
    std: np.ndarray  # [N_FEATURES]
    n: int
    positive_rate: float
    log_loss: float
    iterations: int


def standardisation(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of ``features[N, F]`` over finite rows (std floored at 1e-6)."""
    f = np.asarray(features, dtype=np.float64)
    finite = np.isfinite(f).all(axis=1)
    if not finite.any():
        return np.zeros(f.shape[1]), np.ones(f.shape[1])
    mean = f[finite].mean(axis=0)
    std = np.maximum(f[finite].std(axis=0), 1e-6)
    return mean, std


def _log_loss(z, y, w, b, l2):
    s = z @ w + b
    # log(1 + exp(-s)) for y=1, log(1 + exp(s)) for y=0, stable
    loss = np.logaddexp(0.0, -s) * y + np.logaddexp(0.0, s) * (1 - y)
    return float(loss.mean() + 0.5 * l2 * (w @ w))


def fit_logistic(z: np.ndarray, y: np.ndarray, l2: float = 1e-3, max_iter: int = 50, tol: float = 1e-10):
    """L2-regularised logistic regression by Newton's method: ``(w[d], b, iterations)``.

    The bias is not regularised. A one-class target gives ``w = 0`` and the bias of its
    (clipped) rate.
    """
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = z.shape
    rate = y.mean() if n else 0.5
    if n == 0 or rate in (0.0, 1.0):
        r = min(max(rate, 1e-4), 1 - 1e-4)
        return np.zeros(d), float(np.log(r / (1 - r))), 0
    x = np.hstack([z, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    theta[-1] = np.log(rate / (1 - rate))
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0
    it = 0
    for it in range(1, max_iter + 1):
        p = 1.0 / (1.0 + np.exp(-(x @ theta)))
        grad = x.T @ (p - y) / n + reg * theta
        hess = (x.T * (p * (1 - p))) @ x / n + np.diag(reg) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if float(np.abs(step).max()) < tol:
            break
    return theta[:-1], float(theta[-1]), it


def train_gate(features: np.ndarray, correct: np.ndarray, use: tuple[int, ...] | None = None,
               l2: float = 1e-3) -> GateFit:
    """Fit one exit's gate on ``features[N, N_FEATURES]`` and targets ``correct[N]`` using the feature
    columns in ``use`` (default: all; the others get weight 0: the feature-drop ablation)."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(correct, dtype=bool)
    finite = np.isfinite(f).all(axis=1)
    f, y = f[finite], y[finite]
    mean, std = standardisation(f)
    z = (f - mean) / std
    cols = list(range(N_FEATURES) if use is None else use)
    w_sub, b, it = fit_logistic(z[:, cols], y, l2=l2)
    w = np.zeros(f.shape[1])
    w[cols] = w_sub
    return GateFit(w, b, mean, std, int(y.size), float(y.mean()) if y.size else 0.0,
                   _log_loss(z, y.astype(np.float64), w, b, l2) if y.size else float("nan"), it)


def gate_scores(fit: GateFit, features: np.ndarray) -> np.ndarray:
    """Gate probabilities for ``features[N, N_FEATURES]``; NaN rows stay NaN (and never exit)."""
    z = (np.asarray(features, dtype=np.float64) - fit.mean) / fit.std
    return 1.0 / (1.0 + np.exp(-(z @ fit.weight + fit.bias)))


def inr(acc: np.ndarray, nsr: np.ndarray) -> np.ndarray:
    """Information-to-noise ratio ``acc / NSR`` (NSR floored at 1e-6)."""
    return np.asarray(acc, dtype=np.float64) / np.maximum(np.asarray(nsr, dtype=np.float64), 1e-6)


def thresholds(tau0: float, inr_values: np.ndarray, alpha: float) -> np.ndarray:
    """``tau_l = clamp(tau0 * (INR_ref / INR_l) ** alpha, 0, 1)``, ``INR_ref`` = geometric mean;
    ``tau0 > 1``: every threshold is ``tau0`` (no sample leaves)."""
    v = np.maximum(np.asarray(inr_values, dtype=np.float64), 1e-12)
    if tau0 > 1.0:
        return np.full(v.shape, float(tau0))
    ref = float(np.exp(np.log(v).mean())) if v.size else 1.0
    return np.clip(tau0 * (ref / v) ** alpha, 0.0, 1.0)
