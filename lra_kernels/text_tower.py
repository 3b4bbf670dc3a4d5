"""The INT8 text tower of open_clip's ``CLIP``: architecture, conversion (calibration, SmoothQuant) and the module.

open_clip's text encoder (``CLIP.encode_text``) for the standard configs (ViT-B-32, ViT-B-16, ...)::

    x = token_embedding[text] + positional_embedding          [B, L, D]   (L = context_length, 77)
    x = blocks(x)             pre-LN ResidualAttentionBlocks, causal self-attention
    pooled = ln_final(x[b, argmax_t text[b, t]])              the EOT token (the largest id of each row)
    out = pooled @ text_projection                             [B, E]

The blocks are the vision tower's ``QuantBlock`` with ``attn.causal`` set: the same INT8 schemes,
GEMMs and backends. Because attention is causal, the tokens after a row's EOT never reach it, so
each row needs only its first ``eot + 1`` positions: rows are sorted by length and run in chunks
truncated to the chunk's longest row (the same numbers as the full context, up to float
rounding; the paper's batch-wide scheme is batch-dependent by design and keeps the full context).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .block import QuantBlock
from .config import QuantConfig
from .convert import ActivationStats, FloatBlockParams, _activation_name, _check_block, quantize_block
from .names import GEMMS

TEXT_POOL_TYPES = ("argmax",)
CALIBRATION_BATCH = 64
PERCENTILE_ROWS = 4096


class UnsupportedCLIP(ValueError, NotImplementedError):
    """The open_clip model is not one ``QuantCLIP`` can convert (the message says what is supported)."""


SUPPORTED = ("open_clip CLIP models with the built-in text transformer: causal mask, argmax (EOT) pooling, "
             "standard ResidualAttentionBlocks with LayerNorm and GELU/QuickGELU (e.g. ViT-B-32, ViT-B-16, ViT-L-14)")


@dataclass(frozen=True)
class TextArch:
    """What is needed to rebuild a quantized open_clip text tower without open_clip."""

    context_length: int
    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_hidden: int
    activation: str
    output_dim: int
    has_proj: bool = True
    proj_bias: bool = False
    pool_type: str = "argmax"
    eps: float = 1e-5
    attn_bias: bool = True

    def __post_init__(self):
        if self.pool_type not in TEXT_POOL_TYPES:
            raise ValueError(f"text pool_type must be one of {TEXT_POOL_TYPES}, got {self.pool_type!r}")
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")
        if min(self.context_length, self.vocab_size, self.layers) < 1:
            raise ValueError("context_length, vocab_size and layers must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextArch:
        return cls(**d)


# ---------------------------------------------------------------------- inspection
def arch_from_clip(clip: nn.Module) -> TextArch:
    """The text architecture of an open_clip ``CLIP``; ``UnsupportedCLIP`` saying what is not supported."""
    from open_clip.model import CLIP

    if not isinstance(clip, CLIP):
        raise UnsupportedCLIP(f"{type(clip).__name__} is not supported (CustomTextCLIP / CoCa / Hugging Face text "
                              f"towers are not); supported: {SUPPORTED}")
    pool = getattr(clip, "text_pool_type", "argmax")
    if pool not in TEXT_POOL_TYPES:
        raise UnsupportedCLIP(f"text pool_type {pool!r} is not supported; supported: {SUPPORTED}")
    mask = getattr(clip, "attn_mask", None)
    L = int(clip.positional_embedding.shape[0])
    causal = torch.full((L, L), float("-inf")).triu_(1)
    if mask is None or tuple(mask.shape) != (L, L) or not torch.equal(mask.float().cpu(), causal):
        raise UnsupportedCLIP(f"the text tower must use open_clip's causal attn_mask; supported: {SUPPORTED}")
    blocks = list(clip.transformer.resblocks)
    if not blocks:
        raise UnsupportedCLIP("a text tower without blocks is not supported")
    try:
        for i, b in enumerate(blocks):
            _check_block(b, i)
        activation = _activation_name(blocks[0].mlp.gelu)
    except NotImplementedError as err:
        raise UnsupportedCLIP(f"text tower: {err}; supported: {SUPPORTED}") from None
    if not isinstance(clip.ln_final, nn.LayerNorm):
        raise UnsupportedCLIP(f"text ln_final {type(clip.ln_final).__name__} is not supported (expected LayerNorm)")
    proj = clip.text_projection
    width = int(clip.token_embedding.weight.shape[1])
    if isinstance(proj, nn.Linear):
        has_proj, proj_bias, out_dim = True, proj.bias is not None, proj.out_features
    elif isinstance(proj, torch.Tensor):
        has_proj, proj_bias, out_dim = True, False, int(proj.shape[1])
    elif proj is None:
        has_proj, proj_bias, out_dim = False, False, width
    else:
        raise UnsupportedCLIP(f"text_projection {type(proj).__name__} is not supported")
    b0 = blocks[0]
    return TextArch(
        context_length=L, vocab_size=int(clip.token_embedding.weight.shape[0]), width=width, layers=len(blocks),
        heads=b0.attn.num_heads, mlp_hidden=b0.mlp.c_fc.out_features, activation=activation, output_dim=out_dim,
        has_proj=has_proj, proj_bias=proj_bias, pool_type=pool, eps=float(b0.ln_1.eps),
        attn_bias=b0.attn.in_proj_bias is not None,
    )


# ---------------------------------------------------------------------- inputs
def check_tokens(text, arch: TextArch, device: torch.device, name: str = "text") -> torch.Tensor:
    """Validate token ids ``[B, context_length]`` (any integer dtype) -> int64 on ``device``; TypeError/ValueError
    saying what was expected."""
    L, V = arch.context_length, arch.vocab_size
    if not isinstance(text, torch.Tensor):
        raise TypeError(f"expected {name} as a LongTensor of token ids [B, {L}] (from the model's tokenizer), "
                        f"got {type(text).__name__}")
    if text.is_floating_point() or text.is_complex() or text.dtype == torch.bool:
        raise TypeError(f"expected integer token ids (torch.long) in {name} [B, {L}], got {text.dtype}")
    if text.ndim != 2 or text.shape[1] != L:
        raise ValueError(f"expected {name} of shape [B, {L}] (context_length {L}; tokenize with the model's "
                         f"tokenizer), got {tuple(text.shape)}")
    if text.device != device:
        raise ValueError(f"{name} is on {text.device} but the model is on {device}; move one with .to()")
    text = text.long()
    if text.numel():
        lo, hi = int(text.min()), int(text.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"{name} holds token ids outside [0, {V}) (vocab_size {V}): min {lo}, max {hi}")
    return text


def chunk_plan(eot: torch.Tensor, chunk_tokens: int | None, context_length: int, truncate: bool):
    """``[(rows, length)]``: row indices (a LongTensor) and the positions they run on.

    ``truncate``: rows sorted by ``eot + 1`` and cut to their chunk's longest; chunks of about
    ``chunk_tokens`` tokens (None: one chunk). Otherwise one chunk of the full context."""
    B = eot.shape[0]
    every = torch.arange(B, device=eot.device)
    if not truncate:
        return [(every, context_length)]
    lengths = eot + 1
    if not chunk_tokens:
        return [(every, int(lengths.max()))]
    order = torch.argsort(lengths.cpu(), stable=True)
    sorted_len = lengths.cpu()[order].tolist()
    plan, start = [], 0
    while start < B:
        stop = start + 1
        while stop < B and (stop - start + 1) * sorted_len[stop] <= chunk_tokens:
            stop += 1
        plan.append((order[start:stop].to(eot.device), sorted_len[stop - 1]))
        start = stop
    return plan


# ---------------------------------------------------------------------- the module
class Float32Storage(nn.Module):
    """Float buffers and parameters stay fp32 whatever dtype a conversion (``.half()``) asks; device moves go through
    (as ``QuantEarlyExitViT``)."""

    def _apply(self, fn, recurse=True):
        def keep_dtype(t):
            out = fn(t)
            if t.is_floating_point() and out.dtype != t.dtype:
                return t.to(out.device)
            return out

        return super()._apply(keep_dtype, recurse)


class TextBlocks(nn.Module):
    """Holds the blocks under open_clip's name, ``transformer.resblocks``."""

    def __init__(self, blocks: list[QuantBlock]):
        super().__init__()
        self.resblocks = nn.ModuleList(blocks)
        self.layers = len(blocks)


class QuantTextTower(Float32Storage):
    """INT8 open_clip text tower (open_clip's names): ``token_embedding``, ``positional_embedding``,
    ``transformer.resblocks`` (causal ``QuantBlock``s), ``ln_final``, ``text_projection`` (float tensors fp32).

    ``forward(text, ops, act_dtype)`` on checked ids ``[B, context_length]`` -> ``[B, output_dim]`` fp32."""

    def __init__(self, arch: TextArch, quant_config: QuantConfig, blocks: list[QuantBlock] | None = None):
        super().__init__()
        self.arch, self.quant_config = arch, quant_config
        D, L = arch.width, arch.context_length
        if blocks is None:
            blocks = [QuantBlock.empty(D, arch.heads, arch.mlp_hidden, arch.activation, arch.eps,
                                       quant_config.attn_mode, quant_config.mlp_mode, attn_bias=arch.attn_bias,
                                       smooth_proj=quant_config.smooth_alpha is not None, causal=True)
                      for _ in range(arch.layers)]
        if len(blocks) != arch.layers or not all(b.attn.causal for b in blocks):
            raise ValueError(f"a text tower of {arch.layers} layers needs as many causal blocks, got {len(blocks)}")
        self.register_buffer("token_embedding", torch.zeros(arch.vocab_size, D))
        self.register_buffer("positional_embedding", torch.zeros(L, D))
        self.transformer = TextBlocks(blocks)
        self.ln_final = nn.LayerNorm(D, eps=arch.eps)
        self.register_buffer("text_projection", torch.zeros(D, arch.output_dim) if arch.has_proj else None)
        self.register_buffer("text_projection_bias", torch.zeros(arch.output_dim) if arch.proj_bias else None)
        # CPU: rows run in length-sorted chunks of about this many tokens (None: one pass)
        self.chunk_tokens: int | None = 4096
        # run each row on its first eot + 1 positions only (False: the whole context, as open_clip; benchmarks)
        self.truncate_to_eot = True
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_open_clip(cls, clip: nn.Module, config: QuantConfig, calibration_texts: torch.Tensor | None = None
                       ) -> QuantTextTower:
        """Quantize ``clip``'s text tower (not modified); ``calibration_texts`` (checked ids ``[N, L]``) is needed
        for static scales and SmoothQuant."""
        arch = arch_from_clip(clip)
        if config.needs_calibration and calibration_texts is None:
            what = "act_quant='per_tensor_static'" if config.act_quant == "per_tensor_static" else "smooth_alpha"
            raise ValueError(f"{what} needs calibration_texts for the text tower: token ids [N, {arch.context_length}]"
                             f" or a list of prompts")
        params = [FloatBlockParams.from_block(b, causal=True).to("cpu") for b in clip.transformer.resblocks]
        stats = None
        if config.needs_calibration:
            stats = collect_text_stats(clip, params, calibration_texts.cpu(), config.static_percentile is not None)
        blocks = [quantize_block(p, config, None, None if stats is None else stats[i]) for i, p in enumerate(params)]
        tower = cls(arch, config, blocks)

        def f32(t):
            return t.detach().float().cpu()

        with torch.no_grad():
            tower.token_embedding.copy_(f32(clip.token_embedding.weight))
            tower.positional_embedding.copy_(f32(clip.positional_embedding))
            tower.ln_final.weight.copy_(f32(clip.ln_final.weight))
            tower.ln_final.bias.copy_(f32(clip.ln_final.bias))
            proj = clip.text_projection
            if isinstance(proj, nn.Linear):
                tower.text_projection.copy_(f32(proj.weight).t())
                if proj.bias is not None:
                    tower.text_projection_bias.copy_(f32(proj.bias))
            elif proj is not None:
                tower.text_projection.copy_(f32(proj))
        return tower

    def embed(self, tokens: torch.Tensor, act_dtype: torch.dtype) -> torch.Tensor:
        L = tokens.shape[1]
        return (F.embedding(tokens, self.token_embedding) + self.positional_embedding[:L]).to(act_dtype)

    def head(self, x: torch.Tensor, eot: torch.Tensor, ops) -> torch.Tensor:
        """``ln_final`` of each row's EOT token, then ``text_projection``: ``[B, E]`` fp32."""
        pooled = self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot].float())
        if self.text_projection is None:
            return pooled
        out = ops.matmul_rows(pooled, self.text_projection)
        return out if self.text_projection_bias is None else out + self.text_projection_bias

    def forward(self, text: torch.Tensor, ops, act_dtype: torch.dtype) -> torch.Tensor:
        B = text.shape[0]
        out = torch.empty(B, self.arch.output_dim, device=text.device)
        if B == 0:
            return out
        eot = text.argmax(dim=-1)
        # the paper's scheme quantizes the whole input at once: it keeps the full context
        truncate = self.truncate_to_eot and self.quant_config.act_quant != "paper"
        chunk = self.chunk_tokens if text.device.type == "cpu" else None
        for rows, length in chunk_plan(eot, chunk, self.arch.context_length, truncate):
            x = self.embed(text[rows, :length], act_dtype)
            for block in self.transformer.resblocks:
                x = block(x, ops)
            out[rows] = self.head(x, eot[rows], ops)
        return out


# ---------------------------------------------------------------------- calibration
def float_text_embed(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return (F.embedding(tokens, clip.token_embedding.weight.float().cpu())
            + clip.positional_embedding.float().cpu()[: tokens.shape[1]])


def collect_text_stats(clip: nn.Module, blocks: list[FloatBlockParams], texts: torch.Tensor, keep_rows: bool
                       ) -> list[dict[str, ActivationStats]]:
    """Per block, per GEMM input: channel-wise max |x| (and a row sample for percentiles) on FP32 activations,
    over the tokens up to each prompt's EOT (the positions that reach an output)."""
    if texts.shape[0] == 0:
        raise ValueError("calibration_texts is empty; give at least one prompt")
    gen = torch.Generator().manual_seed(0)
    stats = [{name: ActivationStats() for name in GEMMS} for _ in blocks]
    n_batches = -(-texts.shape[0] // CALIBRATION_BATCH)
    per_batch = -(-PERCENTILE_ROWS // n_batches) if keep_rows else 0
    with torch.no_grad():
        for start in range(0, texts.shape[0], CALIBRATION_BATCH):
            tok = texts[start: start + CALIBRATION_BATCH]
            eot = tok.argmax(dim=-1)
            L = int(eot.max()) + 1
            tok = tok[:, :L]
            valid = (torch.arange(L)[None, :] <= eot[:, None]).reshape(-1)
            x = float_text_embed(clip, tok)
            for params, st in zip(blocks, stats):
                x = params.forward(x, lambda name, h, st=st: st[name].update(h.float()[valid], per_batch, gen))
    return stats


