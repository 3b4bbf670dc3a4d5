"""The ``"triton"`` backend: the Triton launchers of ``lra_kernels.kernels``.

CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (slow; tests only). The attention core
is SDPA (``kernels.attention``), the row-wise products ``kernels.matmul_rows`` and the paper's
batch-wide quantizer its torch reference: those have no Triton kernel.
"""

from __future__ import annotations

import functools

from ..kernels._triton import HAVE_TRITON, interpreting
from ..kernels.attention import attention_ref
from ..kernels.exit_head import exit_head
from ..kernels.gate_features import gate_features
from ..kernels.int8_gemm import int8_gemm
from ..kernels.layernorm_quant import layernorm_quant, quantize_per_tensor, quantize_per_token
from ..kernels.matmul_rows import matmul_rows
from ..quant import quantize_paper_dynamic_ref
from .contract import Backend, Ops


@functools.lru_cache(maxsize=None)
def triton_ops() -> Ops:
    """The ``"triton"`` backend's operations (cached)."""
    return Ops(
        name="triton",
        layernorm_quant=layernorm_quant,
        quantize_per_token=quantize_per_token,
        quantize_per_tensor=quantize_per_tensor,
        quantize_paper=quantize_paper_dynamic_ref,
        int8_gemm=int8_gemm,
        attention=attention_ref,
        exit_head=exit_head,
        gate_features=gate_features,
        matmul_rows=matmul_rows,
    )


class TritonBackend(Backend):
    name = "triton"

    def declines(self, device, quant_config=None) -> str | None:
        if not HAVE_TRITON:
            return "the triton package is not installed"
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            return f"it needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors) and the model is on {device}"
        return None

    def ops(self) -> Ops:
        return triton_ops()
