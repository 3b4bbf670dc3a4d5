"""The quantized transformer block: ``QuantLinear``, ``QuantAttention``, ``QuantMLP``, ``QuantBlock``.

Modules hold buffers and call the backend's operations (an ``lra_kernels.ops.Ops``); they do no
index arithmetic of their own and never branch on the backend. Names mirror open_clip's ``ResidualAttentionBlock``
(``ln_1``, ``attn.in_proj``, ``attn.out_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``).

Each module is built from its parts (``QuantLinear.from_float`` quantizes a float weight; the
converter, ``lra_kernels.convert``, builds blocks from them); ``empty(...)`` builds the structure a
saved state dict is loaded into.

Activation quantization modes of a ``QuantLinear`` (``names.MODES``):

- ``per_token``: symmetric, one scale per row at run time (default; fused with the LayerNorm
  in front of ``in_proj`` and ``c_fc``).
- ``per_tensor_static``: one calibrated scale (buffer ``x_scale``).
- ``paper``: the paper's baseline, dynamic per-tensor asymmetric over the whole input, per-tensor
  weights (``torch.ao.quantization.quantize_dynamic`` emulation; batch-dependent by design).
- ``float``: no quantization (``in_proj``/``out_proj`` under the paper's scheme, which left
  ``nn.MultiheadAttention`` in float).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels.int8_gemm import apply_activation
from .names import ACTIVATIONS, MODES
from .quant import quantize_weight_paper, quantize_weight_per_channel


class QuantLinear(nn.Module):
    """``y = act(x @ W^T + b) (+ residual)`` with INT8 weights and activations.

    Buffers: ``qweight[N, K]`` int8 (``nn.Linear``'s layout, K-major), ``w_scale[N]`` fp32, ``bias[N]`` fp32 (optional),
    ``x_scale[]`` fp32 (``per_tensor_static``), ``smooth_inv[K]`` fp32 (SmoothQuant factors that
    cannot be folded into a preceding LayerNorm; the input is multiplied by them while quantizing). Mode ``float`` keeps
    ``weight[N, K]`` in float instead.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        mode: str = "per_token",
        bias: bool = True,
        smooth: bool = False,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        K, N = in_features, out_features
        if mode == "float":
            self.register_buffer("weight", torch.zeros(N, K))
        else:
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.int8))
            self.register_buffer("w_scale", torch.zeros(N))
        self.register_buffer("bias", torch.zeros(N) if bias else None)
        self.register_buffer("x_scale", torch.ones(()) if mode == "per_tensor_static" else None)
        self.register_buffer("smooth_inv", torch.ones(K) if smooth else None)

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        mode: str,
        x_scale: float | torch.Tensor | None = None,
        smooth_inv: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Quantize a float ``weight[N, K]`` (``x_scale``: the calibrated input scale, ``per_tensor_static`` only;
        ``smooth_inv[K]``: SmoothQuant factors applied to the input while quantizing)."""
        N, K = weight.shape
        w = weight.detach().float()
        layer = cls(K, N, mode, bias=bias is not None, smooth=smooth_inv is not None)
        with torch.no_grad():
            if mode == "float":
                layer.weight.copy_(w)
            else:
                quantize = quantize_weight_paper if mode == "paper" else quantize_weight_per_channel
                wq, w_scale = quantize(w)
                layer.qweight.copy_(wq)
                layer.w_scale.copy_(w_scale)
            if bias is not None:
                layer.bias.copy_(bias.detach().float())
            if mode == "per_tensor_static":
                if x_scale is None:
                    raise ValueError("per_tensor_static needs a calibrated x_scale")
                layer.x_scale.copy_(torch.as_tensor(x_scale, dtype=torch.float32))
            if smooth_inv is not None:
                layer.smooth_inv.copy_(smooth_inv.detach().float())
        return layer

    def quantize(self, x: torch.Tensor, ops) -> tuple[torch.Tensor, torch.Tensor]:
        """``x[M, K]`` float -> ``(q[M, K] int8, x_scale[M] fp32)`` per this layer's mode."""
        if self.mode == "per_token":
            return ops.quantize_per_token(x, self.smooth_inv)
        if self.mode == "per_tensor_static":
            return ops.quantize_per_tensor(x, self.x_scale, self.smooth_inv)
        if self.mode == "paper":
            return ops.quantize_paper(x)
        raise RuntimeError("a float layer has no quantizer")

    def gemm(
        self,
        q: torch.Tensor,
        x_scale: torch.Tensor,
        ops,
        activation: str = "none",
        residual: torch.Tensor | None = None,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        return ops.int8_gemm(q, self.qweight, x_scale, self.w_scale, self.bias, activation, residual, out_dtype)

    def forward(
        self,
        x: torch.Tensor,
        ops,
        activation: str = "none",
        residual: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        out_dtype = out_dtype or x.dtype
        if ops.fused_linear is not None:
            y = ops.fused_linear(self, x, activation, residual, out_dtype)
            if y is not None:
                return y
        if self.mode == "float":
            y = apply_activation(F.linear(x.float(), self.weight, self.bias), activation)
            if residual is not None:
                y = y + residual.float()
            return y.to(out_dtype)
        q, x_scale = self.quantize(x, ops)
        return self.gemm(q, x_scale, ops, activation, residual, out_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


class QuantAttention(nn.Module):
    """``in_proj`` (qkv) and ``out_proj`` of ``n_head``-head self-attention (the core is ``ops.attention``;
    ``causal``: each token attends to the tokens before it only, as in open_clip's text tower)."""

    def __init__(self, in_proj: QuantLinear, out_proj: QuantLinear, n_head: int, causal: bool = False):
        super().__init__()
        width = out_proj.out_features
        if width % n_head:
            raise ValueError(f"width {width} is not divisible by n_head {n_head}")
        if (in_proj.in_features, in_proj.out_features, out_proj.in_features) != (width, 3 * width, width):
            raise ValueError(f"in_proj must be [{3 * width}, {width}] and out_proj [{width}, {width}], got "
                             f"[{in_proj.out_features}, {in_proj.in_features}] and "
                             f"[{out_proj.out_features}, {out_proj.in_features}]")
        self.n_head = n_head
        self.causal = bool(causal)
        self.in_proj = in_proj
        self.out_proj = out_proj

    @classmethod
    def empty(cls, width: int, n_head: int, mode: str, bias: bool = True, causal: bool = False) -> QuantAttention:
        return cls(QuantLinear(width, 3 * width, mode, bias=bias), QuantLinear(width, width, mode, bias=bias), n_head,
                   causal)

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}" + (", causal=True" if self.causal else "")


class QuantMLP(nn.Module):
    """``c_fc`` (+ the activation, fused in its GEMM) then ``c_proj``."""

    def __init__(self, c_fc: QuantLinear, c_proj: QuantLinear, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.c_fc = c_fc
        self.c_proj = c_proj

    @classmethod
    def empty(cls, width: int, hidden: int, activation: str, mode: str, smooth_proj: bool = False) -> QuantMLP:
        return cls(QuantLinear(width, hidden, mode), QuantLinear(hidden, width, mode, smooth=smooth_proj), activation)


class QuantBlock(nn.Module):
    """Pre-norm residual block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    The per-token chain is LN+quant -> qkv GEMM -> SDPA -> quant -> out_proj GEMM (+residual)
    -> LN+quant -> c_fc GEMM (+GELU) -> quant -> c_proj GEMM (+residual).
    """

    def __init__(self, ln_1: nn.LayerNorm, attn: QuantAttention, ln_2: nn.LayerNorm, mlp: QuantMLP):
        super().__init__()
        self.ln_1 = ln_1
        self.attn = attn
        self.ln_2 = ln_2
        self.mlp = mlp

    @classmethod
    def empty(
        cls,
        width: int,
        n_head: int,
        hidden: int,
        activation: str,
        eps: float,
        attn_mode: str,
        mlp_mode: str,
        attn_bias: bool = True,
        smooth_proj: bool = False,
        causal: bool = False,
    ) -> QuantBlock:
        """The structure of a block (zero weights), for a state dict to be loaded into."""
        return cls(nn.LayerNorm(width, eps=eps), QuantAttention.empty(width, n_head, attn_mode, bias=attn_bias,
                                                                      causal=causal),
                   nn.LayerNorm(width, eps=eps), QuantMLP.empty(width, hidden, activation, mlp_mode, smooth_proj))

    def _norm_linear(self, x, norm: nn.LayerNorm, linear: QuantLinear, ops, activation="none", out_dtype=None):
        out_dtype = out_dtype or x.dtype
        if linear.mode == "per_token" and linear.smooth_inv is None:
            q, x_scale = ops.layernorm_quant(x, norm.weight, norm.bias, norm.eps)
            return linear.gemm(q, x_scale, ops, activation, None, out_dtype)
        h = F.layer_norm(x.float(), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        return linear(h, ops, activation, out_dtype=out_dtype)

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        """``x[B, T, D]`` in the activation dtype (fp32/bf16/fp16); every GEMM output, the attention
        core and the returned residual stream stay in that dtype."""
        if ops.fused_block is not None:
            y = ops.fused_block(self, x)
            if y is not None:
                return y
        B, T, D = x.shape
        act = x.dtype
        x2 = x.reshape(B * T, D)
        qkv = self._norm_linear(x2, self.ln_1, self.attn.in_proj, ops, out_dtype=act)
        a = ops.attention(qkv.view(B, T, 3 * D), self.attn.n_head, self.attn.causal).reshape(B * T, D)
        x2 = self.attn.out_proj(a, ops, residual=x2, out_dtype=act)
        h = self._norm_linear(x2, self.ln_2, self.mlp.c_fc, ops, self.mlp.activation, out_dtype=act)
        x2 = self.mlp.c_proj(h, ops, residual=x2, out_dtype=act)
        return x2.view(B, T, D)
