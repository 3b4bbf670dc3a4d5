"""The ``"cpu"`` backend: the C++ CPU kernels of ``lra_kernels.cpu`` where they apply.

AVX-512 VNNI / AMX-INT8 GEMMs on packed weights with fused epilogues and fused attention run whole
blocks (``fused_block``) and the INT8 patch embedding (``fused_linear``); the exit head, the
gate features and the heads' row products are the kernels' own (fixed order). Everything else,
and any block the kernels decline (``lra_kernels.cpu.block.decline``), runs on the torch references.

Declines: tensors off the CPU, the paper's scheme (per-tensor dynamic activations over the whole
batch), and machines where the kernels cannot be built (``lra_kernels.cpu.reason()``). Asking
builds the kernels on first use (cached on disk afterwards).
"""

from __future__ import annotations

import functools

from .contract import Backend, Ops
from .reference import TORCH_OPS


@functools.lru_cache(maxsize=None)
def cpu_ops() -> Ops:
    """The ``"cpu"`` backend's operations (cached; imports the kernels' wrappers)."""
    from ..cpu import block as cpu_block
    from ..cpu import ops as cpu

    return TORCH_OPS.replace(
        name="cpu",
        matmul_rows=cpu.rows_matmul,
        exit_head=cpu.exit_head,
        gate_features=cpu.gate_features,
        fused_block=cpu_block.forward_or_decline,
        fused_linear=cpu_block.linear_or_decline,
    )


class CpuBackend(Backend):
    name = "cpu"

    def declines(self, device, quant_config=None) -> str | None:
        if device.type != "cpu":
            return f"the CPU kernels run on CPU tensors (the model is on {device})"
        if quant_config is not None and quant_config.act_quant == "paper":
            return ("the paper's scheme (per-tensor dynamic activations over the whole batch) is not fused by the CPU "
                    "kernels")
        from .. import cpu

        return None if cpu.available() else cpu.reason()

    def ops(self) -> Ops:
        return cpu_ops()
