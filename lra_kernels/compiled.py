"""TorchInductor for the ``"torch"`` backend on CPU: the stages of the tower, compiled once per structure.

On CPU the reference path is a chain of element-wise quantize / dequantize passes around
``torch._int_mm``; Inductor fuses them. The model compiles its stages (``call_embed``,
``call_block``) when it runs on that backend and a C++ compiler is present (``wanted``), and falls
back to eager, with a warning, if compiling fails.
"""

from __future__ import annotations

import functools
import shutil

import torch

# Graphs per compiled function: (static + dynamic batch + batch of 1) per block structure, and
# structures differ per quantization scheme; dynamo's default of 8 would silently fall back to
# eager once a process holds a few schemes.
RECOMPILE_LIMIT = 64


def call_block(block, x: torch.Tensor, ops) -> torch.Tensor:
    return block(x, ops)


def call_embed(model, images: torch.Tensor, ops, act_dtype: torch.dtype) -> torch.Tensor:
    return model.embed_eager(images, ops, act_dtype)


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """``fn`` through ``torch.compile`` (one compiled function per stage function, shared by every model)."""
    # dynamic=None: the first shape compiles static; later batch sizes mark the batch dimension
    # dynamic (maybe_mark_dynamic in the caller), so one graph serves every batch size.
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
    # realize_opcount_threshold: store (in a per-row local buffer) rather than recompute an
    # elementwise chain read twice, as the GELU output is by the amax and the quantize passes of
    # the c_proj input; Inductor's default recomputes its erf, 12% of the tower's time on CPU.
    return torch.compile(fn, dynamic=None, options={"realize_opcount_threshold": 4})


@functools.lru_cache(maxsize=None)
def have_cxx() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def wanted(compile_blocks: bool | None, backend: str, device: torch.device) -> bool:
    """Whether stages are compiled: the torch backend on CPU, when asked (None: when a C++ compiler is present)."""
    if backend != "torch" or device.type != "cpu":
        return False
    return have_cxx() if compile_blocks is None else bool(compile_blocks)
