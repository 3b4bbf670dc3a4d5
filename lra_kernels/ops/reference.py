"""The ``"torch"`` backend: every operation as its pure-torch reference.

These define the numerical contracts the other backends reproduce (bit for bit for the integer
paths, see docs/kernels.md): ``torch._int_mm`` for the INT8 GEMMs, SDPA for attention. On CPU the
model compiles its blocks with TorchInductor on this backend (``lra_kernels.compiled``), so that
the quantize / dequantize element-wise passes fuse. It runs on any device and declines nothing.
"""

from __future__ import annotations

from ..kernels.attention import attention_ref
from ..kernels.exit_head import exit_head_ref
from ..kernels.gate_features import gate_features_ref
from ..kernels.int8_gemm import int8_gemm_ref
from ..kernels.layernorm_quant import layernorm_quant_ref
from ..kernels.matmul_rows import matmul_rows
from ..quant import quantize_paper_dynamic_ref, quantize_per_tensor_ref, quantize_per_token_ref
from .contract import Backend, Ops

TORCH_OPS = Ops(
    name="torch",
    layernorm_quant=layernorm_quant_ref,
    quantize_per_token=quantize_per_token_ref,
    quantize_per_tensor=quantize_per_tensor_ref,
    quantize_paper=quantize_paper_dynamic_ref,
    int8_gemm=int8_gemm_ref,
    attention=attention_ref,
    exit_head=exit_head_ref,
    gate_features=gate_features_ref,
    matmul_rows=matmul_rows,
)


class TorchBackend(Backend):
    name = "torch"

    def declines(self, device, quant_config=None) -> str | None:
        return None

    def ops(self) -> Ops:
        return TORCH_OPS
