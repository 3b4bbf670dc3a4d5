"""The operations contract: the typed set of operations a backend provides, and how it declines.

An ``Ops`` is a frozen record of functions, one per operation of the tower, each with the contract
of its pure-torch reference (the ``*_ref`` next to each kernel in ``lra_kernels.kernels``, and
``lra_kernels.quant``). Modules receive an ``Ops`` and call its fields; they never branch on the
backend. The float activations run in the model's ``act_dtype`` whatever the backend.

A ``Backend`` pairs an ``Ops`` with ``declines(device, quant_config)``: None when it can run a
model of that recipe on that device, else the reason it cannot (as vLLM's scaled-mm kernels answer
``can_implement``). ``lra_kernels.backend`` asks the candidates in order and keeps the reasons.

Two fields are optional fused paths (None where a backend has none): ``fused_block`` runs a whole
``QuantBlock`` and ``fused_linear`` a single ``QuantLinear``; each returns None to decline that
module (the generic path of ``lra_kernels.block`` then runs it on the other fields).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import torch

Tensor = torch.Tensor


class LayerNormQuant(Protocol):
    """``x[M, K]`` float -> LayerNorm (fp32) -> ``(q[M, K] int8, x_scale[M] fp32)`` per token."""

    def __call__(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]: ...


class QuantizePerToken(Protocol):
    """``x[M, K]`` (times ``smooth_inv[K]``) -> ``(q[M, K] int8, x_scale[M] fp32)``, one scale per row."""

    def __call__(self, x: Tensor, smooth_inv: Tensor | None = None) -> tuple[Tensor, Tensor]: ...


class QuantizePerTensor(Protocol):
    """``x[M, K]`` with a calibrated scalar ``x_scale`` -> ``(q[M, K] int8, x_scale[M])`` (NaN: a non-finite row)."""

    def __call__(self, x: Tensor, x_scale: Tensor, smooth_inv: Tensor | None = None) -> tuple[Tensor, Tensor]: ...


class QuantizeDynamic(Protocol):
    """The paper's scheme: ``x[M, K]`` -> centred ``(q[M, K] int8, x_scale[M])``, one scale for the whole input."""

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]: ...


class Int8Gemm(Protocol):
    """``act((q @ w^T) * x_scale[:, None] * w_scale[None, :] + bias) (+ residual)`` in ``out_dtype``; ``w[N, K]``."""

    def __call__(self, q: Tensor, w: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Tensor | None = None,
                 activation: str = "none", residual: Tensor | None = None,
                 out_dtype: torch.dtype = torch.float32) -> Tensor: ...


class Attention(Protocol):
    """``qkv[B, T, 3D]`` -> ``[B, T, D]``, multi-head softmax attention in ``qkv``'s dtype (``causal``: token t
    attends to tokens 0..t only)."""

    def __call__(self, qkv: Tensor, n_head: int, causal: bool = False) -> Tensor: ...


class ExitHead(Protocol):
    """Tokens ``h[B, T, D]`` -> pool -> LayerNorm -> ``@ proj`` -> L2-normalise -> ``(logits[B, C], z[B, E])`` fp32."""

    def __call__(self, h: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None, eps: float, proj: Tensor | None,
                 text: Tensor, logit_scale: float, pool: str = "patch_mean") -> tuple[Tensor, Tensor]: ...


class GateFeatures(Protocol):
    """``(logits[B, C], h[B, T, D])`` -> ``[B, N_FEATURES]`` fp32 (``names.GATE_FEATURES``)."""

    def __call__(self, logits: Tensor, h: Tensor) -> Tensor: ...


class MatmulRows(Protocol):
    """``a[B, K] @ w[K, N]`` with each row computed alone (a row never depends on its batch)."""

    def __call__(self, a: Tensor, w: Tensor) -> Tensor: ...


class FusedBlock(Protocol):
    """A whole ``QuantBlock`` on ``x[B, T, D]``, or None to decline it."""

    def __call__(self, block, x: Tensor) -> Tensor | None: ...


class FusedLinear(Protocol):
    """A single ``QuantLinear`` (quantize + GEMM), or None to decline it."""

    def __call__(self, linear, x: Tensor, activation: str, residual: Tensor | None,
                 out_dtype: torch.dtype) -> Tensor | None: ...


@dataclass(frozen=True)
class Ops:
    """The operations of one backend (see the module docstring). ``replace(**fields)``: a copy with some swapped."""

    name: str
    layernorm_quant: LayerNormQuant
    quantize_per_token: QuantizePerToken
    quantize_per_tensor: QuantizePerTensor
    quantize_paper: QuantizeDynamic
    int8_gemm: Int8Gemm
    attention: Attention
    exit_head: ExitHead
    gate_features: GateFeatures
    matmul_rows: MatmulRows
    fused_block: FusedBlock | None = None
    fused_linear: FusedLinear | None = None

    def replace(self, **changes) -> Ops:
        return dataclasses.replace(self, **changes)


class BackendUnavailable(ValueError, RuntimeError):
    """No backend asked for can run the model here; the message holds each candidate's reason.

    A ``ValueError`` (a configuration that cannot run); also a ``RuntimeError``, which is what a missing
    Triton raised before backends could decline."""


class Backend(ABC):
    """One way to run the tower: its ``Ops`` and when it declines. ``name`` is what ``backend=`` takes."""

    name: str

    @abstractmethod
    def declines(self, device: torch.device, quant_config=None) -> str | None:
        """Why this backend cannot run a model of ``quant_config`` (a ``QuantConfig``) on ``device``; None: it can."""

    @abstractmethod
    def ops(self) -> Ops:
        """The operations (built on first use, then cached)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
