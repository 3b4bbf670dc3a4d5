"""open_clip ``VisionTransformer`` -> the parts of a quantized tower: checks, calibration, SmoothQuant folding.

``convert_open_clip(visual, config, calibration_images)`` returns ``(VisionArch, TowerParts)``, every
module built whole from the FP32 tower (``QuantEarlyExitViT.from_open_clip`` wraps them); nothing
here knows the model class.

SmoothQuant factors ``s`` divide a GEMM input and multiply the weight's columns:

- ``in_proj`` input: folded into ``ln_1`` (weight and bias divided by ``s``);
- ``out_proj`` input (the attention output, linear in V): folded into the V rows of ``in_proj``;
- ``c_fc`` input: folded into ``ln_2``;
- ``c_proj`` input (after the GELU, nothing to fold into): applied while quantizing
  (``QuantLinear.smooth_inv``).

LayerScale (``ls_1``/``ls_2``) is folded into ``out_proj``/``c_proj`` rows, which leaves their
per-channel INT8 codes unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .block import QuantAttention, QuantBlock, QuantLinear, QuantMLP
from .config import QuantConfig, VisionArch
from .kernels.attention import attention_ref
from .kernels.int8_gemm import apply_activation
from .names import GEMMS, POOL_TYPES, QMAX
from .quant import smooth_factors
from .tower import PatchEmbed, TowerParts

CALIBRATION_BATCH = 32
PERCENTILE_ROWS = 4096  # rows kept per GEMM input for percentile clipping


# ---------------------------------------------------------------------- inspection
def _activation_name(act: nn.Module) -> str:
    from open_clip.transformer import QuickGELU

    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    raise NotImplementedError(f"unsupported MLP activation {type(act).__name__}: "
                              f"expected nn.GELU or open_clip QuickGELU")


def _layer_scale(ls: nn.Module, width: int) -> torch.Tensor | None:
    if isinstance(ls, nn.Identity):
        return None
    gamma = getattr(ls, "gamma", None)
    if isinstance(gamma, torch.Tensor) and gamma.shape == (width,):
        return gamma.detach().float()
    raise NotImplementedError(f"unsupported layer scale {type(ls).__name__}")


def _check_block(block: nn.Module, index: int) -> None:
    from open_clip.transformer import ResidualAttentionBlock

    if type(block) is not ResidualAttentionBlock:
        raise NotImplementedError(
            f"block {index} is {type(block).__name__}; only open_clip's standard ResidualAttentionBlock is supported "
            "(custom blocks with qk-norm / scaled cosine attention are not)"
        )
    if hasattr(block, "ln_1_kv"):
        raise NotImplementedError(f"block {index} is a cross-attention block, which is not supported")
    attn = block.attn
    if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim or attn.bias_k is not None:
        raise NotImplementedError(f"block {index}: only nn.MultiheadAttention with a packed in_proj and no bias_kv "
                                  f"is supported")
    for ln in (block.ln_1, block.ln_2):
        if not isinstance(ln, nn.LayerNorm):
            raise NotImplementedError(f"block {index}: unsupported norm {type(ln).__name__} (expected LayerNorm)")


def arch_from_visual(visual: nn.Module) -> VisionArch:
    """Read a supported open_clip tower's architecture; ``NotImplementedError`` saying what is not supported."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(
            f"{type(visual).__name__} is not supported: expected an open_clip VisionTransformer "
            "(timm towers and ModifiedResNet are not supported)"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError("towers with an attentional pooler (CoCa-style attn_pool) are not supported")
    if visual.pool_type not in POOL_TYPES:
        raise NotImplementedError(f"pool_type {visual.pool_type!r} is not supported (expected one of {POOL_TYPES})")
    blocks = list(visual.transformer.resblocks)
    if not blocks:
        raise NotImplementedError("a tower without blocks is not supported")
    for i, b in enumerate(blocks):
        _check_block(b, i)
    if not isinstance(visual.ln_post, nn.LayerNorm):
        raise NotImplementedError(f"unsupported ln_post {type(visual.ln_post).__name__}")
    b0 = blocks[0]
    width = visual.conv1.out_channels
    if visual.conv1.bias is not None:
        raise NotImplementedError("a patch embedding with bias is not supported")
    preprocess = dict(getattr(visual, "preprocess_cfg", None) or {})
    if not preprocess.get("mean") and getattr(visual, "image_mean", None):
        preprocess["mean"] = tuple(visual.image_mean)
    if not preprocess.get("std") and getattr(visual, "image_std", None):
        preprocess["std"] = tuple(visual.image_std)
    preprocess.setdefault("size", tuple(visual.image_size))
    return VisionArch(
        image_size=tuple(visual.image_size),
        patch_size=tuple(visual.patch_size),
        width=width,
        layers=len(blocks),
        heads=b0.attn.num_heads,
        mlp_hidden=b0.mlp.c_fc.out_features,
        activation=_activation_name(b0.mlp.gelu),
        output_dim=visual.proj.shape[1] if visual.proj is not None else width,
        has_proj=visual.proj is not None,
        pool_type=visual.pool_type,
        final_ln_after_pool=bool(visual.final_ln_after_pool),
        no_ln_pre=isinstance(visual.ln_pre, nn.Identity),
        eps=float(b0.ln_1.eps),
        attn_bias=b0.attn.in_proj_bias is not None,
        output_tokens=bool(getattr(visual, "output_tokens", False)),
        preprocess_cfg=preprocess,
    )


# ---------------------------------------------------------------------- float reference
@dataclass
class FloatBlockParams:
    """One block's float tensors with LayerScale folded in (the FP32 reference of our block)."""

    ln_1: tuple[torch.Tensor, torch.Tensor]
    ln_2: tuple[torch.Tensor, torch.Tensor]
    w: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor | None]
    n_head: int
    eps: float
    activation: str
    c_proj_smooth_inv: torch.Tensor | None = None  # SmoothQuant factor applied at run time
    causal: bool = False  # causal self-attention (open_clip's text tower)

    @classmethod
    def from_block(cls, block: nn.Module, causal: bool = False) -> "FloatBlockParams":
        width = block.ln_1.normalized_shape[0]

        def ln(m):
            w = m.weight.detach().float().clone() if m.weight is not None else torch.ones(width)
            b = m.bias.detach().float().clone() if m.bias is not None else torch.zeros(width)
            return w, b

        attn, mlp = block.attn, block.mlp
        w = {
            "in_proj": attn.in_proj_weight.detach().float().clone(),
            "out_proj": attn.out_proj.weight.detach().float().clone(),
            "c_fc": mlp.c_fc.weight.detach().float().clone(),
            "c_proj": mlp.c_proj.weight.detach().float().clone(),
        }
        b = {
            "in_proj": None if attn.in_proj_bias is None else attn.in_proj_bias.detach().float().clone(),
            "out_proj": None if attn.out_proj.bias is None else attn.out_proj.bias.detach().float().clone(),
            "c_fc": None if mlp.c_fc.bias is None else mlp.c_fc.bias.detach().float().clone(),
            "c_proj": None if mlp.c_proj.bias is None else mlp.c_proj.bias.detach().float().clone(),
        }
        for name, ls in (("out_proj", block.ls_1), ("c_proj", block.ls_2)):
            gamma = _layer_scale(ls, width)
            if gamma is not None:
                w[name] = w[name] * gamma[:, None]
                if b[name] is not None:
                    b[name] = b[name] * gamma
        return cls(ln(block.ln_1), ln(block.ln_2), w, b, attn.num_heads, float(block.ln_1.eps),
                   _activation_name(mlp.gelu), causal=causal)

    def to(self, device) -> "FloatBlockParams":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return FloatBlockParams(
            tuple(map(mv, self.ln_1)), tuple(map(mv, self.ln_2)),
            {k: mv(v) for k, v in self.w.items()}, {k: mv(v) for k, v in self.b.items()},
            self.n_head, self.eps, self.activation, mv(self.c_proj_smooth_inv), self.causal,
        )

    def forward(self, x: torch.Tensor, observe=None) -> torch.Tensor:
        """FP32 forward of the block on ``x[B, T, D]``; ``observe(name, gemm_input[M, K])`` sees each GEMM input."""
        B, T, D = x.shape
        x2 = x.reshape(B * T, D)

        def linear(name, h):
            if observe is not None:
                observe(name, h)
            return F.linear(h, self.w[name], self.b[name])

        h = F.layer_norm(x2, (D,), *self.ln_1, self.eps)
        a = attention_ref(linear("in_proj", h).view(B, T, 3 * D), self.n_head, self.causal).reshape(B * T, D)
        x2 = x2 + linear("out_proj", a)
        h = F.layer_norm(x2, (D,), *self.ln_2, self.eps)
        h = apply_activation(linear("c_fc", h), self.activation)
        if self.c_proj_smooth_inv is not None:
            h = h * self.c_proj_smooth_inv
        x2 = x2 + linear("c_proj", h)
        return x2.view(B, T, D)


def float_embed(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """open_clip's ``_embeds`` in fp32 (no patch dropout)."""
    x = F.conv2d(images.float(), visual.conv1.weight.float(), stride=visual.conv1.stride)
    x = x.flatten(2).transpose(1, 2)
    cls_tok = visual.class_embedding.float().view(1, 1, -1).expand(x.shape[0], 1, -1)
    x = torch.cat([cls_tok, x], dim=1) + visual.positional_embedding.float()
    ln = visual.ln_pre
    if isinstance(ln, nn.Identity):
        return x
    return F.layer_norm(x, ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)


# ---------------------------------------------------------------------- calibration
@dataclass
class ActivationStats:
    """Running statistics of one GEMM input over the calibration images."""

    amax: torch.Tensor | None = None  # per channel [K]
    rows: list[torch.Tensor] = field(default_factory=list)

    def update(self, h: torch.Tensor, keep_rows: int, gen: torch.Generator) -> None:
        a = h.abs().amax(dim=0)
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        if keep_rows:
            take = min(h.shape[0], keep_rows)
            idx = torch.randperm(h.shape[0], generator=gen)[:take]
            self.rows.append(h[idx].clone())


def collect_stats(
    visual: nn.Module, blocks: list[FloatBlockParams], images: torch.Tensor, keep_rows: bool
) -> list[dict[str, ActivationStats]]:
    """Per block, per GEMM input: channel-wise max |x| (and a row sample for percentiles) on FP32 activations."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            "calibration_images must be a float tensor [N, 3, H, W] normalised like the model's inputs, got "
            f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}"
        )
    if images.shape[0] == 0:
        raise ValueError("calibration_images is empty; give at least one image")
    if not torch.isfinite(images).all():
        raise ValueError("calibration_images contain NaN or Inf")
    gen = torch.Generator().manual_seed(0)
    stats = [{name: ActivationStats() for name in GEMMS} for _ in blocks]
    n_batches = -(-images.shape[0] // CALIBRATION_BATCH)
    per_batch = -(-PERCENTILE_ROWS // n_batches) if keep_rows else 0
    device = visual.conv1.weight.device
    with torch.no_grad():
        for start in range(0, images.shape[0], CALIBRATION_BATCH):
            x = float_embed(visual, images[start : start + CALIBRATION_BATCH].to(device))
            for params, st in zip(blocks, stats):
                x = params.forward(x, lambda name, h, st=st: st[name].update(h.float().cpu(), per_batch, gen))
    return stats


def _static_scale(st: ActivationStats, smooth: torch.Tensor | None, percentile: float | None) -> torch.Tensor:
    if percentile is None:
        amax = st.amax if smooth is None else st.amax / smooth
        return amax.max().clamp_min(1e-12) / float(QMAX)
    rows = torch.cat(st.rows)
    if smooth is not None:
        rows = rows / smooth
    flat = rows.abs().flatten()
    k = max(1, min(flat.numel(), int(round(flat.numel() * percentile / 100.0))))
    return flat.kthvalue(k).values.clamp_min(1e-12) / float(QMAX)


# ---------------------------------------------------------------------- conversion
def _layer_norm(weight: torch.Tensor, bias: torch.Tensor, eps: float) -> nn.LayerNorm:
    ln = nn.LayerNorm(weight.shape[0], eps=eps)
    with torch.no_grad():
        ln.weight.copy_(weight)
        ln.bias.copy_(bias)
    return ln


def smooth_block(p: FloatBlockParams, stats: dict[str, ActivationStats], alpha: float):
    """Fold SmoothQuant factors into a block's float parameters.

    Returns ``(folded, factors)``: ``folded`` computes the same function as ``p`` (up to float
    rounding) with flattened GEMM inputs; ``factors[name]`` is the ``s[K]`` each GEMM input was
    divided by (the weights' columns are multiplied by it).
    """
    D = p.ln_1[0].shape[0]
    s = {name: smooth_factors(stats[name].amax, p.w[name], alpha) for name in GEMMS}
    w = {name: p.w[name] * s[name][None, :] for name in GEMMS}
    b = dict(p.b)
    # out_proj's input is softmax(QK^T) V, linear in V: divide the V rows of in_proj.
    w["in_proj"][2 * D :] /= s["out_proj"][:, None]
    if b["in_proj"] is not None:
        b["in_proj"] = b["in_proj"].clone()
        b["in_proj"][2 * D :] /= s["out_proj"]
    folded = FloatBlockParams(
        ln_1=(p.ln_1[0] / s["in_proj"], p.ln_1[1] / s["in_proj"]),
        ln_2=(p.ln_2[0] / s["c_fc"], p.ln_2[1] / s["c_fc"]),
        w=w, b=b, n_head=p.n_head, eps=p.eps, activation=p.activation,
        c_proj_smooth_inv=1.0 / s["c_proj"], causal=p.causal,
    )
    return folded, s


def quantize_block(
    p: FloatBlockParams, config: QuantConfig, arch: VisionArch, stats: dict[str, ActivationStats] | None
) -> QuantBlock:
    """Quantize one block's float parameters (``stats`` from :func:`collect_stats` when calibrating)."""
    p = p.to("cpu")
    smooth: dict[str, torch.Tensor | None] = dict.fromkeys(GEMMS)
    if config.smooth_alpha is not None:
        p, smooth = smooth_block(p, stats, float(config.smooth_alpha))
    x_scale = dict.fromkeys(GEMMS)
    if config.act_quant == "per_tensor_static":
        x_scale = {name: _static_scale(stats[name], smooth[name], config.static_percentile) for name in GEMMS}
    mode = {"in_proj": config.attn_mode, "out_proj": config.attn_mode,
            "c_fc": config.mlp_mode, "c_proj": config.mlp_mode}
    smooth_inv = {"c_proj": p.c_proj_smooth_inv}
    linear = {name: QuantLinear.from_float(p.w[name], p.b[name], mode[name], x_scale=x_scale[name],
                                           smooth_inv=smooth_inv.get(name))
              for name in GEMMS}
    return QuantBlock(
        _layer_norm(*p.ln_1, p.eps),
        QuantAttention(linear["in_proj"], linear["out_proj"], p.n_head, causal=p.causal),
        _layer_norm(*p.ln_2, p.eps),
        QuantMLP(linear["c_fc"], linear["c_proj"], p.activation),
    )


def convert_open_clip(
    visual: nn.Module,
    config: QuantConfig,
    calibration_images: torch.Tensor | None = None,
) -> tuple[VisionArch, TowerParts]:
    """The architecture and the quantized parts of ``visual`` (an open_clip ``VisionTransformer``, not modified).

    ``calibration_images`` is required when ``config.needs_calibration`` (static scales, SmoothQuant).
    Parts are on the CPU, float tensors fp32."""
    arch = arch_from_visual(visual)
    if config.needs_calibration and calibration_images is None:
        what = "act_quant='per_tensor_static'" if config.act_quant == "per_tensor_static" else "smooth_alpha"
        raise ValueError(f"{what} needs calibration_images: a normalised float batch [N, 3, H, W]")
    blocks = [FloatBlockParams.from_block(b) for b in visual.transformer.resblocks]
    stats = None
    if config.needs_calibration:
        keep = config.static_percentile is not None
        stats = collect_stats(visual, blocks, calibration_images, keep_rows=keep)

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().cpu().clone()

    conv_w = f32(visual.conv1.weight)
    if config.int8_patch_embed:
        conv1 = PatchEmbed(arch.patch_size, linear=QuantLinear.from_float(conv_w.reshape(arch.width, -1), None,
                                                                           "per_token"))
    else:
        conv1 = PatchEmbed(arch.patch_size, weight=conv_w)
    ln_pre = nn.Identity() if arch.no_ln_pre else _layer_norm(f32(visual.ln_pre.weight), f32(visual.ln_pre.bias),
                                                              arch.eps)
    parts = TowerParts(
        conv1=conv1,
        class_embedding=f32(visual.class_embedding),
        positional_embedding=f32(visual.positional_embedding),
        ln_pre=ln_pre,
        blocks=[quantize_block(p, config, arch, None if stats is None else stats[i]) for i, p in enumerate(blocks)],
        ln_post=_layer_norm(f32(visual.ln_post.weight), f32(visual.ln_post.bias), arch.eps),
        proj=f32(visual.proj) if arch.has_proj else None,
    )
    return arch, parts.check(arch)
