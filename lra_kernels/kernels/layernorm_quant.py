"""LayerNorm fused with per-token INT8 quantization.

    mean[m]    = sum_k x[m, k] / K
    var[m]     = sum_k (x[m, k] - mean[m])**2 / K
    h[m, k]    = (x[m, k] - mean[m]) / sqrt(var[m] + eps) * weight[k] + bias[k]      (fp32)
    then the per-token quantizer of ``lra_kernels.quant``:
    q[m, k]    = clamp(round(h[m, k] * 127 / amax[m]), -127, 127)     int8
    x_scale[m] = amax[m] / 127                                        fp32

Shapes and dtypes: ``x[M, K]`` fp32/fp16/bf16, ``weight[K]``/``bias[K]`` fp32 (SmoothQuant factors
already folded in), outputs ``q[M, K]`` int8 and ``x_scale[M]`` fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import quantize_per_token_ref


def layernorm_quant_ref(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference: ``F.layer_norm`` in fp32, then per-token quantization."""
    h = F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)
    return quantize_per_token_ref(h)
