"""Per-sample FLOPs of the quantized tower, its exit heads and gates.

Conventions (documented in docs/method.md): a multiply-add is 2 FLOPs, whatever its precision
(INT8 GEMMs count like float ones); LayerNorm 5 FLOPs per element, softmax 5, GELU 8, an add 1;
quantize/dequantize passes are not counted (they are part of the GEMMs' cost model, and
absent in an FP32 tower). The same conventions price the full-depth model, so savings are
like for like.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .names import N_FEATURES

LN, SOFTMAX, GELU, ADD = 5, 5, 8, 1


@dataclass(frozen=True)
class FlopsModel:
    """FLOPs per sample of each stage of a tower with ``num_classes`` zero-shot classes."""

    embed: int
    block: int
    exit_head: int
    gate: int
    final_head: int
    classifier: int
    depth: int

    def full(self) -> int:
        """The full-depth INT8 model with its own head and the classifier."""
        return self.embed + self.depth * self.block + self.final_head + self.classifier

    def per_sample(self, exit_layer: torch.Tensor, exit_layers: tuple[int, ...]) -> torch.Tensor:
        """FLOPs of each sample given where it left (``exit_layer[B]``, ``depth`` = full).

        A sample pays every exit point it reached (head + gate), leaving or not; one that ran
        the full depth also pays the model's head and the classifier.
        """
        exit_layer = exit_layer.to("cpu", torch.int64)
        points = torch.tensor(exit_layers, dtype=torch.int64)
        if len(exit_layers):
            evaluated = (points[None, :] <= exit_layer[:, None]).sum(1)
        else:
            evaluated = torch.zeros_like(exit_layer)
        flops = self.embed + exit_layer * self.block + evaluated * (self.exit_head + self.gate)
        full = exit_layer == self.depth
        return flops + full * (self.final_head + self.classifier)

    def as_dict(self) -> dict[str, int]:
        return {"embed": self.embed, "block": self.block, "exit_head": self.exit_head, "gate": self.gate,
                "final_head": self.final_head, "classifier": self.classifier, "depth": self.depth,
                "full": self.full()}


def flops_model(arch, num_classes: int, head: str = "patch_mean") -> FlopsModel:
    """Count FLOPs for a ``VisionArch`` (see module docstring for the conventions)."""
    T, D, H = arch.num_tokens, arch.width, arch.mlp_hidden
    E = arch.output_dim if arch.has_proj else D
    C = num_classes
    ph, pw = arch.patch_size
    G = T - 1
    embed = 2 * G * 3 * ph * pw * D + T * D * ADD + (0 if arch.no_ln_pre else T * D * LN)
    gemms = 2 * T * D * (3 * D) + 2 * T * D * D + 2 * T * D * H + 2 * T * H * D
    attention = 2 * (2 * T * T * D) + SOFTMAX * arch.heads * T * T
    elementwise = 2 * T * D * LN + T * H * GELU + 2 * T * D * ADD
    block = gemms + attention + elementwise
    proj = 2 * D * E if arch.has_proj else 0
    pool = G * D * ADD if head == "patch_mean" else 0
    exit_head = pool + D * LN + proj + 3 * E + 2 * E * C
    # softmax, top-2, the patch variance (3 per element), standardise + dot (4 per feature), sigmoid
    gate = SOFTMAX * C + 2 * C + 3 * G * D + 4 * N_FEATURES + 4
    if arch.pool_type == "avg":
        final_pool = G * D * ADD + (D * LN if arch.final_ln_after_pool else T * D * LN)
    else:
        final_pool = D * LN
    final_head = final_pool + proj + 3 * E
    return FlopsModel(embed, block, exit_head, gate, final_head, 2 * E * C, arch.layers)
