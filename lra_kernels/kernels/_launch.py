"""Checks shared by the Triton launchers: device, dtype and shape validation with clear messages."""

from __future__ import annotations

import torch

from ._triton import interpreting

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def check_tensor(op: str, name: str, t, *, dtypes=None, ndim: int | None = None, shape_hint: str = "",
                 sizes: dict[int, int] | None = None) -> torch.Tensor:
    """Type, dtype, rank and (``sizes``: {dim: size}) sizes of one launcher argument; raises
    TypeError / ValueError naming what was expected."""
    expected = f"{name}{shape_hint}" if shape_hint else name
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: expected {expected} as a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: expected {expected} of dtype {names}, got {t.dtype}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{op}: expected {expected} ({ndim}-D), got shape {tuple(t.shape)}")
    if sizes and any(t.shape[d] != n for d, n in sizes.items()):
        raise ValueError(f"{op}: expected {name} of shape {shape_hint}, got {list(t.shape)}")
    return t


def check_device(op: str, tensors: dict[str, torch.Tensor | None]) -> torch.device:
    """All tensors on one device: CUDA, or CPU when Triton interprets (``TRITON_INTERPRET=1``)."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"{op}: expected every tensor on one device, got {where}")
    device = devices.pop()
    if device.type == "cuda":
        return device
    if device.type == "cpu" and interpreting():
        return device
    raise ValueError(
        f"{op}: the Triton kernel needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got tensors on "
        f"{device}; use the torch backend ({op}_ref) on this device"
    )


def check_out(op: str, out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              name: str = "out"):
    """A caller-provided output buffer must match exactly (shape, dtype, device)."""
    if out is None:
        return None
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: expected {name} as a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{op}: expected {name} of shape {list(shape)}, dtype {dtype} on {device}; got {list(out.shape)}, "
            f"{out.dtype} on {out.device}"
        )
    return out
