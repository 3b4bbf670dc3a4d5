"""Python face of ``torch.ops.lra_cpu``: packed weights, quantized activations, fused GEMMs, attention.

The contracts are those of the torch references (``lra_kernels.quant``, ``kernels/int8_gemm.py``,
``kernels/layernorm_quant.py``, ``kernels/attention.py``) composed: e.g. ``gemm_quant`` is
``quantize_per_token_ref(int8_gemm_ref(...) * smooth)`` computed in one pass with the fp32 GEMM
output never stored. Fused intermediates stay fp32; only what is stored takes ``out_dtype``.

Activation codes are ``QAct``: ``codes`` (uint8, code + 128, padded; see ``csrc/common.h``),
``scale[M]`` fp32 and ``K``; ``QAct.int8()`` gives the plain ``q[M, K]`` int8 codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..names import ACT_CODES

OUT_FLOAT, OUT_QUANT, OUT_FLOAT_LNQ, OUT_ACC = 0, 1, 2, 3


def _ops():
    from . import available, reason

    if not available():  # builds / loads the library on the first call
        raise RuntimeError(f"the CPU kernels are not available: {reason()}")
    return torch.ops.lra_cpu


@dataclass(frozen=True)
class QAct:
    """INT8 activations in the CPU kernels' format: ``codes[Mp, Kp]`` uint8 (q + 128), ``scale[M]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    K: int

    @property
    def M(self) -> int:
        return self.scale.shape[0]

    def int8(self) -> torch.Tensor:
        """The symmetric codes ``q[M, K]`` int8 (tests, comparisons with the references)."""
        return (self.codes[: self.M, : self.K].to(torch.int16) - 128).to(torch.int8)


@dataclass(frozen=True)
class PackedWeight:
    """An ``[N, K]`` INT8 weight packed for the micro-kernels, with its column sums."""

    packed: torch.Tensor
    colsum: torch.Tensor
    N: int
    K: int

    @classmethod
    def pack(cls, w: torch.Tensor) -> "PackedWeight":
        if w.dtype != torch.int8 or w.ndim != 2:
            raise TypeError(f"pack: expected an int8 weight [N, K], got {w.dtype} {tuple(w.shape)}")
        packed, colsum = _ops().pack_weight(w.contiguous())
        return cls(packed, colsum, int(w.shape[0]), int(w.shape[1]))


def _scale_arg(static_scale) -> float:
    return 0.0 if static_scale is None else float(static_scale)


def quantize(x: torch.Tensor, *, ln=None, smooth: torch.Tensor | None = None, static_scale=None) -> QAct:
    """``x[M, K]`` -> codes: ``ln=(weight, bias, eps)`` LayerNorm first (``layernorm_quant_ref``), or
    ``smooth[K]`` multiplied first; one scale per row, or the calibrated ``static_scale``."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    if ln is not None:
        w, b, eps = ln
        codes, scale = _ops().quantize(x, w, b, float(eps), True, None, _scale_arg(static_scale))
    else:
        codes, scale = _ops().quantize(x, None, None, 0.0, False, smooth, _scale_arg(static_scale))
    return QAct(codes, scale, int(x.shape[-1]))


def _gemm(a: QAct, w: PackedWeight, w_scale, bias, activation, residual, kind, out_dtype=torch.float32,
          smooth=None, static_scale=None, ln=None):
    if a.K != w.K:
        raise ValueError(f"gemm: activations have K={a.K} but the weight is [{w.N}, {w.K}]")
    ln_w, ln_b, eps = ln if ln is not None else (None, None, 0.0)
    return _ops().gemm(a.codes, a.scale, w.packed, w.colsum, w.N, w.K, w_scale, bias, ACT_CODES[activation], residual,
                       kind, out_dtype, smooth, _scale_arg(static_scale), ln_w, ln_b, float(eps))


def gemm(a: QAct, w: PackedWeight, w_scale, bias=None, activation="none", residual=None, out_dtype=torch.float32):
    """``int8_gemm_ref(a.int8(), w, a.scale, w_scale, bias, activation, residual, out_dtype)``."""
    return _gemm(a, w, w_scale, bias, activation, residual, OUT_FLOAT, out_dtype)[0]


def gemm_quant(a: QAct, w: PackedWeight, w_scale, bias=None, activation="none", residual=None, *,
               smooth=None, static_scale=None) -> QAct:
    """The GEMM's fp32 output (times ``smooth``) quantized for the next GEMM, never stored as floats."""
    codes, scale = _gemm(a, w, w_scale, bias, activation, residual, OUT_QUANT, smooth=smooth, static_scale=static_scale)
    return QAct(codes, scale, w.N)


def gemm_ln_quant(a: QAct, w: PackedWeight, w_scale, bias, residual, out_dtype, ln, static_scale=None):
    """``(y, codes)``: ``y`` = the GEMM + residual stored in ``out_dtype`` (the residual stream), and
    ``layernorm_quant`` of ``y`` as stored (the next GEMM's input)."""
    y, codes, scale = _gemm(a, w, w_scale, bias, "none", residual, OUT_FLOAT_LNQ, out_dtype,
                            static_scale=static_scale, ln=ln)
    return y, QAct(codes, scale, w.N)


def gemm_acc(a: QAct, w: PackedWeight) -> torch.Tensor:
    """The exact int32 sums (tests)."""
    ones = torch.ones(w.N)
    return _gemm(a, w, ones, None, "none", None, OUT_ACC)[0]


def block(x: torch.Tensor, weights, w_scales, biases, norms, eps, smooth, static_scales, heads: int, causal: bool,
          activation: str) -> torch.Tensor:
    """A whole pre-LayerNorm transformer block ``x[B, T, D]`` in one call (``lra_kernels.cpu.block.forward``):
    ``weights``: the ``PackedWeight`` of in_proj, out_proj, c_fc, c_proj; ``norms``: ln_1 weight, bias,
    ln_2 weight, bias; ``eps``: ln_1's, ln_2's; ``static_scales``: per linear, None for per-token."""
    nk = [d for w in weights for d in (w.N, w.K)]
    return _ops().block(x, [w.packed for w in weights], [w.colsum for w in weights], list(w_scales), list(biases),
                        list(norms), smooth, nk, [float(e) for e in eps], [_scale_arg(s) for s in static_scales],
                        int(heads), bool(causal), ACT_CODES[activation])


def attention(qkv: torch.Tensor, B: int, T: int, heads: int, out_dtype=torch.float32, causal: bool = False
              ) -> torch.Tensor:
    """``attention_ref(qkv.view(B, T, 3D), heads, causal)`` as ``[B * T, D]`` (fp32 inside)."""
    return _ops().attention(qkv, B, T, heads, OUT_FLOAT, out_dtype, 0.0, bool(causal))[0]


def attention_quant(qkv: torch.Tensor, B: int, T: int, heads: int, static_scale=None, causal: bool = False) -> QAct:
    """The attention output quantized per token (or with ``static_scale``) for ``out_proj``."""
    codes, scale = _ops().attention(qkv, B, T, heads, OUT_QUANT, torch.float32, _scale_arg(static_scale),
                                    bool(causal))
    return QAct(codes, scale, qkv.shape[1] // 3)


def rows_matmul(a: torch.Tensor, w: torch.Tensor, w_nk: bool = False) -> torch.Tensor:
    """``a[B, K] @ w`` (``w[K, N]``, or ``w[N, K]`` with ``w_nk``) in fp32, each row in a fixed order.

    ``w`` handed as the transpose of a contiguous ``[N, K]`` matrix (``text.t()``) is read in place, as rows.
    Nothing is cached: a copy keyed by the tensor's address would be served to a later tensor the
    allocator puts at the same address (a model freed, another built)."""
    if not w_nk and w.ndim == 2 and w.shape[0] > 1 and w.stride(0) == 1 and w.stride(1) == w.shape[0]:
        return _ops().rows_matmul(a, w.t(), True)
    return _ops().rows_matmul(a, w, w_nk)


def exit_head(h, ln_weight, ln_bias, eps, proj, text, logit_scale, pool="patch_mean"):
    """``kernels.exit_head.exit_head_ref`` on the CPU kernels: ``(logits[B, C], z[B, E])`` fp32."""
    if pool not in ("patch_mean", "cls"):
        raise ValueError(f"pool must be one of ('patch_mean', 'cls'), got {pool!r}")
    h = h if h.stride(-1) == 1 else h.contiguous()
    return _ops().exit_head(h, ln_weight, ln_bias, float(eps), None if proj is None else proj.float().contiguous(),
                            text.float().contiguous(), float(logit_scale), pool == "cls")


def gate_features(logits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``kernels.gate_features.gate_features_ref`` on the CPU kernels: ``[B, 3]`` fp32."""
    return _ops().gate_features(logits, h if h.stride(-1) == 1 else h.contiguous())
