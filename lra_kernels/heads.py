"""The heads, in one place: the model's own head, the exit head, and their cosine logits.

A *tower* here is anything with open_clip's head attributes: ``ln_post``, ``proj``, ``pool_type``,
``final_ln_after_pool`` and ``output_tokens`` — a ``QuantEarlyExitViT`` or an open_clip
``VisionTransformer`` (the FP32 reference of ``lra_ee.qirc``).

    own head:   open_clip's ``_pool`` + ``proj``: ``tok``: ln_post(x[:, 0]) @ proj;
                ``avg``: mean_t ln_post(x)[:, 1:] @ proj (or ln_post of the mean, final_ln_after_pool)
    exit head:  ``ops.exit_head``: patch mean (or CLS) -> ln_post -> @ proj (kernels/exit_head.py)
    logits:     logit_scale * normalise(embedding) @ text^T

Every product is row-wise (``matmul``, by default ``kernels.matmul_rows``): a row's result never
depends on the batch it shares.
"""

from __future__ import annotations

import torch

from .kernels.matmul_rows import matmul_rows


def normalise(e: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (norms floored at 1e-12)."""
    return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _global_pool(tower, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if tower.pool_type == "avg":
        return x[:, 1:].mean(dim=1), x[:, 1:]
    return x[:, 0], x[:, 1:]


def own_head(tower, x: torch.Tensor, matmul=matmul_rows) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own head on tokens ``x[B, T, D]``: ``(pooled[B, E], tokens[B, T-1, D])``, fp32.

    ``tokens`` are normalised by ``ln_post`` when the tower has ``output_tokens`` (as open_clip)."""
    ln_post = tower.ln_post
    if tower.pool_type == "tok" and not tower.final_ln_after_pool and not tower.output_tokens:
        pooled = ln_post(x[:, 0].float())  # LayerNorm is per token: the class token alone, converted alone
        return (matmul(pooled, tower.proj) if tower.proj is not None else pooled), x[:, 1:]
    x = x.float()
    if tower.final_ln_after_pool:
        pooled, tokens = _global_pool(tower, x)
        pooled = ln_post(pooled)
    elif tower.pool_type == "tok":
        # LayerNorm is per token: normalising the class token alone gives the same pooled row.
        pooled, tokens = ln_post(x[:, 0]), x[:, 1:]
        if tower.output_tokens:
            tokens = ln_post(tokens)
    else:
        x = ln_post(x)
        pooled, tokens = _global_pool(tower, x)
    if tower.proj is not None:
        pooled = matmul(pooled, tower.proj)
    return pooled, tokens


def final_head(tower, x: torch.Tensor, text: torch.Tensor, logit_scale: float,
               matmul=matmul_rows) -> tuple[torch.Tensor, torch.Tensor]:
    """The own head on tokens ``x``, then cosine logits against ``text[C, E]``: ``(logits[B, C], z[B, E])``."""
    pooled, _ = own_head(tower, x, matmul)
    z = normalise(pooled.float())
    return logit_scale * matmul(z, text.t()), z


def exit_head(tower, exit_head_op, x: torch.Tensor, text: torch.Tensor, logit_scale: float,
              pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An exit head (``exit_head_op``: a backend's ``ops.exit_head``, or ``exit_head_ref``) with the tower's
    ``ln_post`` and ``proj``: ``(logits[B, C], z[B, E])``."""
    ln = tower.ln_post
    return exit_head_op(x, ln.weight, ln.bias, ln.eps, tower.proj, text, logit_scale, pool)


def check_text_features(text_features, output_dim: int, class_names=None, logit_scale: float = 100.0) -> torch.Tensor:
    """A zero-shot classifier ``text_features[C, output_dim]`` (L2-normalised rows) as fp32;
    ``TypeError``/``ValueError`` saying what is wrong with it, its ``class_names`` or its ``logit_scale``."""
    if not isinstance(text_features, torch.Tensor) or not text_features.is_floating_point():
        raise TypeError(f"text_features must be a float tensor [C, {output_dim}], got {type(text_features).__name__}")
    if text_features.ndim != 2 or text_features.shape[1] != output_dim or text_features.shape[0] < 1:
        raise ValueError(f"text_features must have shape [C, {output_dim}] with C >= 1, got "
                         f"{tuple(text_features.shape)}")
    t = text_features.detach().float()
    if not torch.isfinite(t).all():
        raise ValueError("text_features contain NaN or Inf")
    norms = t.norm(dim=-1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
        raise ValueError(
            f"text_features rows must be L2-normalised (norms range {norms.min():.4f}..{norms.max():.4f}); "
            "use torch.nn.functional.normalize(text_features, dim=-1)"
        )
    if class_names is not None and len(class_names) != t.shape[0]:
        raise ValueError(f"{len(class_names)} class names for {t.shape[0]} classes")
    if not (isinstance(logit_scale, (int, float)) and logit_scale > 0):
        raise ValueError(f"logit_scale must be a positive number, got {logit_scale!r}")
    return t
