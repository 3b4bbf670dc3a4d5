"""Save / load a ``QuantEarlyExitViT`` as a directory: ``model.safetensors`` + ``config.json`` (no pickle).

``config.json`` holds the architecture, the quantization recipe, the backend and whatever extra
records other parts register (exit policy, classifier, class names) under ``"extra"``. The
tensors of those records live in the same safetensors file under their own prefixes.
"""

from __future__ import annotations

import json
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
        raise FileNotFoundError(f"no model directory at {path} (expected a directory written by QuantEarlyExitViT.save)")
    if not cfg_file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a saved model: expected {CONFIG_FILE} and {WEIGHTS_FILE} inside it")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{cfg_file} is not a {FORMAT} config (format={cfg.get('format')!r})")
    if int(cfg.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(
            f"{cfg_file} has format_version {cfg['format_version']}, newer than this lra-kernels reads ({FORMAT_VERSION}); upgrade lra-kernels"
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


def load_model(path: str | Path, device: str | torch.device = "cpu", backend: str | None = None, act_dtype=None):
    from .model import QuantEarlyExitViT

    path = Path(path)
    cfg = read_config(path)
    arch = VisionArch.from_dict(cfg["arch"])
    quant = QuantConfig.from_dict(cfg["quant"])
    model = QuantEarlyExitViT(arch, quant, backend=backend or cfg.get("backend", "auto"),
                              act_dtype=act_dtype if act_dtype is not None else cfg.get("act_dtype", "float32"))
    tensors = load_file(str(path / WEIGHTS_FILE))
    if int(cfg.get("format_version", 1)) < 2:
        tensors = _upgrade_v1(tensors)
    own = set(model.state_dict())
    state = {k: v for k, v in tensors.items() if k in own}
    missing = own - set(state)
    if missing:
        raise ValueError(f"{path / WEIGHTS_FILE} lacks tensors {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=True)
    if hasattr(model, "load_extra_state"):
        rest = {k: v for k, v in tensors.items() if k not in own}
        model.load_extra_state(rest, cfg.get("extra", {}))
    return model.to(device).eval()
