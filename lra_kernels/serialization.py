"""The saved-model format: a directory with ``model.safetensors`` + ``config.json`` (no pickle).

``config.json`` holds the architecture, the quantization recipe, the backend and whatever extra
records the model registers (exit policy, classifier, class names) under ``"extra"``. The
tensors of those records live in the same safetensors file under their own prefixes.

This module knows the format, not the model class: ``save_model`` takes any module with the
model's ``arch``, ``quant_config``, ``backend``, ``act_dtype_request`` and ``extra_state()``;
``read_model`` returns a ``SavedModel`` that ``QuantEarlyExitViT.load`` builds the model from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import QuantConfig, VisionArch

FORMAT = "lra-kernels/quant-vit"
FORMAT_VERSION = 2  # 2: INT8 weights as ``qweight[N, K]`` (version 1 stored ``qweight_t[K, N]``)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_model(model, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"save path {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    extra_tensors, extra_json = model.extra_state() if hasattr(model, "extra_state") else ({}, {})
    tensors.update({k: v.detach().to("cpu").contiguous() for k, v in extra_tensors.items()})
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": model.arch.to_dict(),
        "quant": model.quant_config.to_dict(),
        "backend": model.backend,
        "act_dtype": model.act_dtype_request,
        "extra": {**extra_json, **(extra or {})},
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"no model directory at {path} "
                                f"(expected a directory written by QuantEarlyExitViT.save)")
    if not cfg_file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a saved model: expected {CONFIG_FILE} and {WEIGHTS_FILE} inside it")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{cfg_file} is not a {FORMAT} config (format={cfg.get('format')!r})")
    if int(cfg.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(
            f"{cfg_file} has format_version {cfg['format_version']}, newer than this lra-kernels reads "
            f"({FORMAT_VERSION}); upgrade lra-kernels"
        )
    return cfg


def _upgrade_v1(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Format 1 stored each INT8 weight transposed (``qweight_t[K, N]``); format 2 keeps ``nn.Linear``'s ``[N, K]``."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(".qweight_t"):
            out[name[: -len("_t")]] = t.t().contiguous()
        else:
            out[name] = t
    return out


@dataclass
class SavedModel:
    """What a model directory holds, read and checked: enough to rebuild the model without open_clip."""

    arch: VisionArch
    quant_config: QuantConfig
    backend: str
    act_dtype: str  # as saved: "auto", "float32", "bfloat16" or "float16"
    tensors: dict[str, torch.Tensor]  # the state dict and the extra records' tensors (format 2 names)
    extra: dict[str, Any]  # the extra records' JSON (exit policy, classifier)


def read_model(path: str | Path) -> SavedModel:
    """Read ``path`` (written by :func:`save_model`); format 1 directories are upgraded on the fly."""
    path = Path(path)
    cfg = read_config(path)
    tensors = load_file(str(path / WEIGHTS_FILE))
    if int(cfg.get("format_version", 1)) < 2:
        tensors = _upgrade_v1(tensors)
    return SavedModel(VisionArch.from_dict(cfg["arch"]), QuantConfig.from_dict(cfg["quant"]),
                      cfg.get("backend", "auto"), cfg.get("act_dtype", "float32"), tensors, cfg.get("extra", {}))


def split_state(saved: SavedModel, own: set[str], path: str | Path) -> tuple[dict, dict]:
    """``(state dict of the keys in own, the other tensors)``; ValueError naming the first missing keys."""
    state = {k: v for k, v in saved.tensors.items() if k in own}
    missing = own - set(state)
    if missing:
        where = Path(path) / WEIGHTS_FILE
        raise ValueError(f"{where} lacks tensors {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}")
    return state, {k: v for k, v in saved.tensors.items() if k not in own}
