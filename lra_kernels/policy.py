"""``ExitPolicy``: where the tower may exit and the gate that decides who leaves.

At exit ``j`` (after ``exit_layers[j]`` blocks) a sample leaves when

    z = (features - feature_mean[j]) / feature_std[j]          features: names.GATE_FEATURES
    sigmoid(z . weight[j] + bias[j]) >= threshold[j]

A sample whose features are not finite never leaves early.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .names import HEADS, N_FEATURES

TENSOR_FIELDS = ("weight", "bias", "feature_mean", "feature_std", "threshold")


def check_exit_layers(layers, depth: int) -> tuple[int, ...]:
    """``layers`` (blocks run before each exit) sorted and without repeats; ``ValueError`` unless each lies in
    ``1..depth-1`` (after the last block the model's own head answers, not an exit head)."""
    out = tuple(sorted({int(layer) for layer in layers}))
    if out and (out[0] < 1 or out[-1] > depth - 1):
        raise ValueError(f"exit layers must lie in 1..{depth - 1} for a tower of depth {depth}, got {tuple(layers)} "
                         f"(exiting after the last block is the model's own head)")
    return out


def _as_f32(name: str, value, shape: tuple[int, ...]) -> torch.Tensor:
    # a copy: the policy is immutable, so an in-place change to the caller's tensor must not reach it
    t = torch.as_tensor(value, dtype=torch.float32).detach().cpu().clone().contiguous()
    if tuple(t.shape) != shape:
        raise ValueError(f"ExitPolicy.{name} must have shape {list(shape)}, got {list(t.shape)}")
    if torch.isnan(t).any():
        raise ValueError(f"ExitPolicy.{name} contains NaN")
    return t


@dataclass(frozen=True, eq=False)
class ExitPolicy:
    """Exit points, gate weights and thresholds (built by ``lra_ee`` calibration, or by hand).

    exit_layers: blocks run before each exit, ascending, each in 1..depth-1.
    weight[L, F], bias[L]: per-exit logistic regression over the F = ``N_FEATURES`` standardised
        gate features (``names.GATE_FEATURES``: confidence, margin, spatial variance).
    feature_mean[L, F], feature_std[L, F]: the standardisation (from the calibration split).
    threshold[L]: exit when the gate's probability is >= threshold (> 1 never exits).
    head: ``"patch_mean"`` (spatio-semantic aggregation) or ``"cls"`` (the ablation).
    """

    exit_layers: tuple[int, ...]
    weight: torch.Tensor
    bias: torch.Tensor
    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    threshold: torch.Tensor
    head: str = "patch_mean"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        layers = tuple(int(layer) for layer in self.exit_layers)
        if any(a >= b for a, b in zip(layers, layers[1:])):
            raise ValueError(f"exit_layers must be strictly ascending, got {layers}")
        if layers and layers[0] < 1:
            raise ValueError(f"exit_layers must be >= 1 (blocks run before the exit), got {layers}")
        object.__setattr__(self, "exit_layers", layers)
        L = len(layers)
        shapes = {"weight": (L, N_FEATURES), "bias": (L,), "feature_mean": (L, N_FEATURES),
                  "feature_std": (L, N_FEATURES), "threshold": (L,)}
        for name, shape in shapes.items():
            object.__setattr__(self, name, _as_f32(name, getattr(self, name), shape))
        if (self.feature_std <= 0).any() or not torch.isfinite(self.feature_std).all():
            raise ValueError("ExitPolicy.feature_std must be finite and > 0")
        if not torch.isfinite(self.weight).all() or not torch.isfinite(self.bias).all():
            raise ValueError("ExitPolicy.weight and bias must be finite")
        if self.head not in HEADS:
            raise ValueError(f"ExitPolicy.head must be one of {HEADS}, got {self.head!r}")
        object.__setattr__(self, "_resident", {})

    def resident(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The tensor fields on ``device``, copied there once and kept (the executor reads them at every
        exit point; a fresh host-to-device copy there would cost a synchronisation each time)."""
        device = torch.device(device)
        if device not in self._resident:
            self._resident[device] = {name: getattr(self, name).to(device) for name in TENSOR_FIELDS}
        return self._resident[device]

    @classmethod
    def disabled(cls) -> "ExitPolicy":
        """No exits: the full-depth INT8 model."""
        F = N_FEATURES
        return cls((), torch.zeros(0, F), torch.zeros(0), torch.zeros(0, F), torch.ones(0, F), torch.zeros(0))

    @property
    def enabled(self) -> bool:
        return len(self.exit_layers) > 0

    def validate_for(self, depth: int) -> None:
        check_exit_layers(self.exit_layers, depth)

    def gate_scores(self, j: int, features: torch.Tensor) -> torch.Tensor:
        """Gate probability at exit ``j`` for ``features[B, N_FEATURES]`` (NaN stays NaN)."""
        t = self.resident(features.device)
        z = (features - t["feature_mean"][j]) / t["feature_std"][j]
        return torch.sigmoid(z @ t["weight"][j] + t["bias"][j])

    def leaves(self, j: int, features: torch.Tensor) -> torch.Tensor:
        """Boolean ``[B]``: who leaves at exit ``j``. NaN scores compare False: those samples stay."""
        return self.gate_scores(j, features) >= self.resident(features.device)["threshold"][j]

    def with_thresholds(self, threshold) -> "ExitPolicy":
        return ExitPolicy(self.exit_layers, self.weight, self.bias, self.feature_mean, self.feature_std,
                          threshold, self.head, dict(self.meta))

    # -------------------------------------------------------------- persistence
    def to_state(self, prefix: str = "exit_policy.") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {prefix + name: getattr(self, name) for name in TENSOR_FIELDS}
        return tensors, {"exit_layers": list(self.exit_layers), "head": self.head, "meta": self.meta}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], info: dict[str, Any],
                   prefix: str = "exit_policy.") -> "ExitPolicy":
        missing = [prefix + n for n in TENSOR_FIELDS if prefix + n not in tensors]
        if missing:
            raise ValueError(f"saved exit policy lacks tensors {missing}")
        return cls(tuple(info["exit_layers"]), *(tensors[prefix + n] for n in TENSOR_FIELDS),
                   head=info.get("head", "patch_mean"), meta=dict(info.get("meta", {})))

    def __repr__(self) -> str:
        if not self.enabled:
            return "ExitPolicy.disabled()"
        threshold = [round(t, 4) for t in self.threshold.tolist()]
        return (f"ExitPolicy(exit_layers={self.exit_layers}, threshold={threshold}, "
                f"head={self.head!r})")
