"""Exit head: spatio-semantic aggregation and cosine logits.

    m[b, d]   = mean_{t >= 1} h[b, t, d]            ("patch_mean"; "cls": m = h[b, 0, :])
    n[b, d]   = LayerNorm(m[b, :])[d] * ln_weight[d] + ln_bias[d]
    e[b, j]   = sum_d n[b, d] * proj[d, j]
    z[b, j]   = e[b, j] / max(||e[b, :]||_2, 1e-12)
    logits[b, c] = logit_scale * sum_j z[b, j] * text[c, j]

Shapes and dtypes: ``h[B, T, D]`` float (fp32/fp16/bf16), ``ln_weight[D]``, ``ln_bias[D]``,
``proj[D, E]``, ``text[C, E]`` (L2-normalised rows) fp32; outputs ``logits[B, C]`` and
``z[B, E]`` fp32. Every row is computed on its own (no batch-dependent blocking), so a
sample's exit decision never depends on the batch it shares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backend import matmul_rows

POOLS = ("patch_mean", "cls")


def exit_head_ref(
    h: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    proj: torch.Tensor | None,
    text: torch.Tensor,
    logit_scale: float,
    pool: str = "patch_mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference: ``(logits[B, C], z[B, E])``."""
    if pool == "patch_mean":
        m = h[:, 1:, :].float().mean(dim=1)
    elif pool == "cls":
        m = h[:, 0, :].float()
    else:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    n = F.layer_norm(m, (m.shape[-1],), ln_weight, ln_bias, eps)
    e = matmul_rows(n, proj.float()) if proj is not None else n
    z = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    logits = logit_scale * matmul_rows(z, text.float().t())
    return logits, z
