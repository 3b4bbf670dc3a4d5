"""The files of a saved ``QuantCLIP`` beside the image tower's: ``clip.json`` and ``text.safetensors``.

Loading checks them as ``lra_kernels.validate`` checks the image tower's (one ``ModelLoadError`` naming
the file, the field and what was expected): ``clip.json`` is bounded, strict JSON, every field typed and
bounded before anything is allocated; the safetensors header is read first and must hold exactly the
tensors the text architecture implies (worked out on the meta device), with the SHA-256s recorded at
saving (data section; ``text`` / ``quant`` / ``tokenizer_name`` of ``clip.json``); values are finite.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .config import QuantConfig
from .names import ACTIVATIONS
from .serialization import write_weights
from .text_tower import TEXT_POOL_TYPES, QuantTextTower, TextArch
from .validate import (
    CONFIG_DIGEST_KEY,
    LIMITS,
    MAX_CONFIG_BYTES,
    ModelLoadError,
    ModelNotFoundError,
    _Fields,
    check_against,
    check_format_version,
    check_quant,
    check_values,
    load_tensors,
    read_header,
    read_json_file,
    spec_of,
)

CLIP_FORMAT = "lra-kernels/quant-clip"
CLIP_FORMAT_VERSION = 1
CLIP_CONFIG_FILE = "clip.json"
TEXT_WEIGHTS_FILE = "text.safetensors"
KIND = "quant_clip"
CLIP_FIELDS = ("format", "format_version", "kind", "tokenizer_name", "text", "quant", "text_chunk_tokens", "files")
TEXT_FIELDS = tuple(f.name for f in dataclasses.fields(TextArch))
SEALED = ("text", "quant", "tokenizer_name")  # what the text weights' metadata seals
MAX_VOCAB = 4_000_000
MAX_CONTEXT = 65536
MAX_CHUNK_TOKENS = 1 << 24


def sealed_digest(cfg: dict) -> str:
    """SHA-256 of the canonical JSON of ``cfg``'s sealed fields."""
    sealed = {k: cfg.get(k) for k in SEALED}
    return hashlib.sha256(json.dumps(sealed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_quant_clip_dir(path) -> bool:
    """True when ``path`` is a directory written by ``QuantCLIP.save`` (a ``clip.json`` of kind ``quant_clip``)."""
    try:
        cfg_file = Path(path) / CLIP_CONFIG_FILE
        if not cfg_file.is_file() or cfg_file.stat().st_size > MAX_CONFIG_BYTES:
            return False
        cfg = json.loads(cfg_file.read_text())
        return isinstance(cfg, dict) and cfg.get("kind") == KIND
    except (OSError, ValueError, TypeError):
        return False


def check_text_arch(obj: Any, where: str) -> TextArch:
    f = _Fields(obj, where, TEXT_FIELDS, TEXT_FIELDS[:8])
    width, heads = f.int("width", 1, LIMITS["width"]), f.int("heads", 1, LIMITS["heads"])
    if width % heads:
        raise ModelLoadError(f"{where}.width {width} is not divisible by heads {heads}")
    values = {
        "context_length": f.int("context_length", 1, MAX_CONTEXT),
        "vocab_size": f.int("vocab_size", 1, MAX_VOCAB),
        "width": width,
        "layers": f.int("layers", 1, LIMITS["layers"]),
        "heads": heads,
        "mlp_hidden": f.int("mlp_hidden", 1, LIMITS["mlp_hidden"]),
        "activation": f.choice("activation", ACTIVATIONS[1:]),
        "output_dim": f.int("output_dim", 1, LIMITS["output_dim"]),
        "has_proj": f.bool("has_proj", True),
        "proj_bias": f.bool("proj_bias", False),
        "pool_type": f.choice("pool_type", TEXT_POOL_TYPES, "argmax"),
        "eps": f.number("eps", 1e-30, 1.0, 1e-5),
        "attn_bias": f.bool("attn_bias", True),
    }
    if not values["has_proj"] and (values["proj_bias"] or values["output_dim"] != width):
        raise ModelLoadError(f"{where}: without a text projection output_dim must equal width and proj_bias be false")
    try:
        return TextArch(**values)
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"{where}: {err}") from None


@dataclasses.dataclass
class ClipConfig:
    arch: TextArch
    quant_config: QuantConfig
    tokenizer_name: str | None
    chunk_tokens: int | None
    digest: str


def read_clip_config(path: Path) -> ClipConfig:
    """``path/clip.json``, validated; ``ModelNotFoundError`` when the directory is not a saved QuantCLIP."""
    file = path / CLIP_CONFIG_FILE
    if not file.is_file():
        raise ModelNotFoundError(f"{path} is not a saved QuantCLIP: expected a directory with {CLIP_CONFIG_FILE} "
                                 f"(kind {KIND!r}) written by QuantCLIP.save")
    cfg = read_json_file(file)
    f = _Fields(cfg, str(file), CLIP_FIELDS, ("format", "kind", "text", "quant"))
    if cfg["format"] != CLIP_FORMAT or cfg["kind"] != KIND:
        raise ModelLoadError(f"{file} is not a {CLIP_FORMAT} config (format={cfg['format']!r}, kind={cfg['kind']!r})")
    check_format_version(f, CLIP_FORMAT_VERSION)
    name = cfg.get("tokenizer_name")
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 512):
        f.fail("tokenizer_name", "a tokenizer name (a non-empty string of at most 512 characters) or null")
    chunk = cfg.get("text_chunk_tokens")
    if chunk is not None:
        chunk = f.int("text_chunk_tokens", 1, MAX_CHUNK_TOKENS)
    files = cfg.get("files", {})
    if not isinstance(files, dict) or any(not isinstance(v, str) for v in files.values()):
        f.fail("files", "an object of file names")
    return ClipConfig(check_text_arch(cfg["text"], f"{file}: text"), check_quant(cfg["quant"], f"{file}: quant"),
                      name, chunk, sealed_digest(cfg))


def write_text_weights(tensors: dict[str, torch.Tensor], path: Path, cfg: dict) -> None:
    metadata = {"format": CLIP_FORMAT, "format_version": str(CLIP_FORMAT_VERSION),
                CONFIG_DIGEST_KEY: sealed_digest(cfg)}
    write_weights(tensors, path / TEXT_WEIGHTS_FILE, metadata)


def expected_text_tensors(arch: TextArch, quant_config: QuantConfig, logit_bias: bool):
    """``{name: (safetensors dtype, shape)}`` of ``text.safetensors`` for ``arch``, built without weights."""
    with torch.device("meta"):
        tower = QuantTextTower(arch, quant_config)
    spec = {f"text.{k}": v for k, v in spec_of(tower.state_dict()).items()}
    spec["logit_scale"] = ("F32", ())
    if logit_bias:
        spec["logit_bias"] = ("F32", ())
    return spec


def read_text_weights(path: Path, cfg: ClipConfig) -> dict[str, torch.Tensor]:
    """The tensors of ``path/text.safetensors``, checked against ``cfg`` before and after reading."""
    file = path / TEXT_WEIGHTS_FILE
    if not file.is_file():
        raise ModelNotFoundError(f"{path} lacks {TEXT_WEIGHTS_FILE} (the text tower)")
    header = read_header(file, CLIP_FORMAT, str(CLIP_FORMAT_VERSION), cfg.digest)
    check_against(header, expected_text_tensors(cfg.arch, cfg.quant_config, "logit_bias" in header), file)
    tensors = load_tensors(file)
    check_values(tensors, file)
    return tensors
