"""The saved-model format: a directory with ``model.safetensors`` + ``config.json`` (no pickle).

``config.json`` holds the architecture, the quantization recipe, the backend and whatever extra
records the model registers (exit policy, classifier, class names) under ``"extra"``. The
tensors of those records live in the same safetensors file under their own prefixes.

This module knows the format, not the model class: ``save_model`` takes any module with the
model's ``arch``, ``quant_config``, ``backend``, ``act_dtype_request`` and ``extra_state()``;
``read_model`` returns a ``SavedModel`` that ``QuantEarlyExitViT.load`` builds the model from.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import save as safetensors_bytes

from .config import QuantConfig, VisionArch
from .validate import (
    CONFIG_DIGEST_KEY,
    DIGEST_KEY,
    CheckedConfig,
    ModelLoadError,
    ModelNotFoundError,
    check_against,
    check_config,
    check_values,
    config_digest,
    expected_extra,
    load_tensors,
    read_header,
    read_json_file,
)

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
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": model.arch.to_dict(),
        "quant": model.quant_config.to_dict(),
        "backend": model.backend,
        "act_dtype": model.act_dtype_request,
        "extra": {**extra_json, **(extra or {})},
    }
    text = json.dumps(config, indent=2, sort_keys=True)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                CONFIG_DIGEST_KEY: config_digest(json.loads(text))}
    write_weights(tensors, path / WEIGHTS_FILE, metadata)
    (path / CONFIG_FILE).write_text(text)
    return path


def write_weights(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file whose metadata also records the SHA-256 of its data section (``DIGEST_KEY``),
    so that loading detects a changed byte anywhere in the weights."""
    blob = safetensors_bytes(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    data = memoryview(blob)[8 + n :]
    header.setdefault("__metadata__", {})[DIGEST_KEY] = hashlib.sha256(data).hexdigest()
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors keeps the data 8-byte aligned
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.write(data)
    tmp.replace(file)


def _config_file(path: Path) -> Path:
    if not path.is_dir():
        raise ModelNotFoundError(f"no model directory at {path} "
                                 f"(expected a directory written by QuantEarlyExitViT.save)")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ModelNotFoundError(f"{path} is not a saved model: expected {CONFIG_FILE} and {WEIGHTS_FILE} inside it")
    return cfg_file


def read_checked_config(path: str | Path) -> CheckedConfig:
    """``config.json`` of the model directory ``path``, validated; ``ModelLoadError`` saying what is wrong."""
    cfg_file = _config_file(Path(path))
    return check_config(read_json_file(cfg_file), str(cfg_file), FORMAT, FORMAT_VERSION)


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of ``path`` as a dict, after :func:`read_checked_config` validated it."""
    read_checked_config(path)
    return json.loads((Path(path) / CONFIG_FILE).read_text())


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


StateSpec = Callable[[VisionArch, QuantConfig], Mapping[str, tuple[str, tuple[int, ...]]]]


def _v1_names(spec: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {(k + "_t" if k.endswith(".qweight") else k): ((d, tuple(reversed(s))) if k.endswith(".qweight") else (d, s))
            for k, (d, s) in spec.items()}


def read_model(path: str | Path, state_spec: StateSpec | None = None) -> SavedModel:
    """Read ``path`` (written by :func:`save_model`), validating it first (``lra_kernels.validate``).

    ``state_spec(arch, quant_config)``: the model's state dict as ``{name: (safetensors dtype, shape)}``; with it
    the weights file must hold exactly those tensors plus the extra records'. Format 1 directories are upgraded on
    the fly. Every problem is a ``ModelLoadError``."""
    path = Path(path)
    cfg = read_checked_config(path)
    file = path / WEIGHTS_FILE
    header = read_header(file, FORMAT, str(cfg.format_version), cfg.digest)
    if state_spec is not None:
        expected = dict(state_spec(cfg.arch, cfg.quant_config))
        if cfg.format_version < 2:
            expected = _v1_names(expected)
        expected.update(expected_extra(cfg.extra, cfg.arch, header))
        check_against(header, expected, file)
    tensors = load_tensors(file)
    check_values(tensors, file)
    if cfg.format_version < 2:
        tensors = _upgrade_v1(tensors)
    return SavedModel(cfg.arch, cfg.quant_config, cfg.backend, cfg.act_dtype, tensors, cfg.extra)


def split_state(saved: SavedModel, own: set[str], path: str | Path) -> tuple[dict, dict]:
    """``(state dict of the keys in own, the other tensors)``; ValueError naming the first missing keys."""
    state = {k: v for k, v in saved.tensors.items() if k in own}
    missing = own - set(state)
    if missing:
        where = Path(path) / WEIGHTS_FILE
        raise ModelLoadError(f"{where} lacks tensors {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}")
    return state, {k: v for k, v in saved.tensors.items() if k not in own}
