"""The transformer block on the CPU kernels: five fused calls instead of a dozen passes.

    codes  = LayerNorm_1 + quantize(x)                        (lra_cpu.quantize)
    qkv    = in_proj GEMM                                    -> act_dtype
    codes  = attention(qkv), quantized per token             (the float output is never stored)
    x, codes = out_proj GEMM + residual, LayerNorm_2 + quantize of the new x
    codes  = c_fc GEMM + GELU, (x SmoothQuant factor), quantized per token
    x      = c_proj GEMM + residual                          -> act_dtype

Same arithmetic as the generic block on the torch references except that fused intermediates
(attention output, MLP hidden) are quantized from fp32 rather than from their act_dtype rounding.
Weights are packed once per ``QuantLinear`` (cached beside its ``qweight``, repacked if the
weight changes). ``decline(block)`` says why a block cannot run here (the paper's per-tensor
dynamic scheme, float layers): the caller then runs the generic block.
"""

from __future__ import annotations

import torch

from . import ops as cpu

FUSED_MODES = ("per_token", "per_tensor_static")


def decline(block) -> str | None:
    """None when ``block`` runs on the CPU kernels; otherwise the reason it cannot."""
    for name, lin in (("attn.in_proj", block.attn.in_proj), ("attn.out_proj", block.attn.out_proj),
                      ("mlp.c_fc", block.mlp.c_fc), ("mlp.c_proj", block.mlp.c_proj)):
        if lin.mode not in FUSED_MODES:
            return f"{name} is {lin.mode!r} (the CPU kernels fuse {' and '.join(FUSED_MODES)} activations)"
    for name, lin in (("attn.in_proj", block.attn.in_proj), ("attn.out_proj", block.attn.out_proj),
                      ("mlp.c_fc", block.mlp.c_fc)):
        if lin.smooth_inv is not None:
            return f"{name} has a run-time SmoothQuant factor (only c_proj's is fused)"
    return None


def packed(linear) -> cpu.PackedWeight:
    """``linear.qweight`` packed for the micro-kernels, cached on the module.

    The cache holds the tensor it was packed from and is used only for that very object, unmodified
    since (its version): an address alone would match a new tensor the allocator placed where a freed
    one was."""
    w = linear.qweight
    key = (w._version, w.data_ptr(), tuple(w.shape))
    cache = getattr(linear, "_cpu_packed", None)
    if cache is None or cache[0] is not w or cache[1] != key:
        cache = (w, key, cpu.PackedWeight.pack(w))
        object.__setattr__(linear, "_cpu_packed", cache)  # not a buffer: never saved, never moved
    return cache[2]


def _static(linear):
    return float(linear.x_scale) if linear.mode == "per_tensor_static" else None


def _ln(norm) -> tuple:
    return (norm.weight, norm.bias, norm.eps)


def forward(block, x: torch.Tensor) -> torch.Tensor:
    """``x[B, T, D]`` (act_dtype, contiguous) through ``block`` (a ``QuantBlock`` that ``decline`` accepts), in
    one call into the library: the kernels of ``forward_stepwise`` without Python between them."""
    attn, mlp = block.attn, block.mlp
    linears = (attn.in_proj, attn.out_proj, mlp.c_fc, mlp.c_proj)
    return cpu.block(x, [packed(lin) for lin in linears], [lin.w_scale for lin in linears],
                     [lin.bias for lin in linears],
                     (block.ln_1.weight, block.ln_1.bias, block.ln_2.weight, block.ln_2.bias),
                     (block.ln_1.eps, block.ln_2.eps), mlp.c_proj.smooth_inv, [_static(lin) for lin in linears],
                     attn.n_head, attn.causal, mlp.activation)


def forward_stepwise(block, x: torch.Tensor) -> torch.Tensor:
    """``forward`` as one Python call per kernel (the reference its single call must equal, bit for bit)."""
    B, T, D = x.shape
    act = x.dtype
    x2 = x.reshape(B * T, D)
    attn, mlp = block.attn, block.mlp
    a = cpu.quantize(x2, ln=_ln(block.ln_1), static_scale=_static(attn.in_proj))
    qkv = cpu.gemm(a, packed(attn.in_proj), attn.in_proj.w_scale, attn.in_proj.bias, "none", None, act)
    a = cpu.attention_quant(qkv, B, T, attn.n_head, static_scale=_static(attn.out_proj), causal=attn.causal)
    x2, a = cpu.gemm_ln_quant(a, packed(attn.out_proj), attn.out_proj.w_scale, attn.out_proj.bias, x2, act,
                              _ln(block.ln_2), static_scale=_static(mlp.c_fc))
    a = cpu.gemm_quant(a, packed(mlp.c_fc), mlp.c_fc.w_scale, mlp.c_fc.bias, mlp.activation,
                       smooth=mlp.c_proj.smooth_inv, static_scale=_static(mlp.c_proj))
    x2 = cpu.gemm(a, packed(mlp.c_proj), mlp.c_proj.w_scale, mlp.c_proj.bias, "none", x2, act)
    return x2.view(B, T, D)


def forward_or_decline(block, x: torch.Tensor) -> torch.Tensor | None:
    """``forward(block, x)``, or None when ``decline(block)`` (the caller runs the generic block)."""
    if decline(block) is not None:
        return None
    return forward(block, x.contiguous())


def linear_or_decline(linear, x: torch.Tensor, activation: str, residual, out_dtype) -> torch.Tensor | None:
    """A single ``QuantLinear`` (the INT8 patch embedding): quantize + GEMM, or None to decline."""
    if linear.mode not in FUSED_MODES:
        return None
    a = cpu.quantize(x, smooth=linear.smooth_inv, static_scale=_static(linear))
    return cpu.gemm(a, packed(linear), linear.w_scale, linear.bias, activation, residual, out_dtype)
