"""The saved-model validator: a model directory is checked before anything is built from it.

Every way a directory can be wrong raises one ``ModelLoadError`` (a ``ValueError``) naming the file,
the field and what was expected, never another exception:

1. ``config.json``: at most ``MAX_CONFIG_BYTES``, strict JSON (no NaN / Infinity / overflowing numbers),
   an object whose every field has its type and lies in its range; the sizes (layers, width, heads,
   image size, tokens, classes) are bounded (``LIMITS``) before anything is allocated; the preprocessing
   config is validated by building open_clip's eval transform and running it on a small image.
2. ``model.safetensors``: its header (8-byte little-endian length + JSON, the length bounded by the
   file's size and ``MAX_HEADER_BYTES``) is read first; every entry's dtype, shape and byte range is
   checked, and the byte ranges must tile the data section exactly.
3. The header against the config: the names, shapes and dtypes the config implies (``expected``, built
   by the caller without allocating weights, e.g. on the meta device) plus the extra records' tensors
   (exit policy, classifier); a missing or an extra tensor, a wrong shape or dtype is an error.
4. After reading: every float tensor is finite, scales are non-negative.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .names import ACT_QUANT, ACTIVATIONS, BACKENDS, HEADS, N_FEATURES, POOL_TYPES


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded, with a message saying what was expected."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """No model directory, or one without ``config.json`` / ``model.safetensors``."""


MAX_CONFIG_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the bound safetensors itself applies
LIMITS = {
    "layers": 512, "width": 16384, "heads": 1024, "mlp_hidden": 131072, "output_dim": 65536,
    "image_side": 8192, "tokens": 65537, "classes": 1_000_000, "exit_layers": 512,
}
DIGEST_KEY = "sha256"  # the safetensors metadata entry holding the SHA-256 of the data section
# ... and of config.json's ``arch``, ``quant`` and ``extra`` (the parts the weights were saved with; ``backend``
# and ``act_dtype`` may be edited)
CONFIG_DIGEST_KEY = "config_sha256"
SEALED_FIELDS = ("arch", "quant", "extra")
METADATA_KEYS = ("format", "format_version", DIGEST_KEY, CONFIG_DIGEST_KEY)
ACT_DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
# safetensors dtype names and their sizes in bytes
ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_TO_ST = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}


# ---------------------------------------------------------------------- JSON
def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} overflows a float")
    return value


def parse_json(data: bytes, where: str) -> Any:
    """Strict JSON: NaN, Infinity and numbers that overflow a float are errors."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ModelLoadError(f"{where} is not valid JSON: {err}") from None


def read_json_file(file: Path) -> Any:
    """``file`` as strict JSON, refused unread when larger than ``MAX_CONFIG_BYTES``."""
    try:
        size = file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ModelLoadError(f"{file} is {size} bytes, more than {MAX_CONFIG_BYTES}")
        raw = file.read_bytes()
    except OSError as err:
        raise ModelLoadError(f"cannot read {file}: {err.strerror or err}") from None
    return parse_json(raw, str(file))


# ---------------------------------------------------------------------- field checks
class _Fields:
    """Typed access to one JSON object of the config; every error names ``where.key``."""

    def __init__(self, obj: Any, where: str, known: tuple[str, ...], required: tuple[str, ...] = ()):
        if not isinstance(obj, dict):
            raise ModelLoadError(f"{where} must be a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(known))
        if unknown:
            raise ModelLoadError(f"{where} has unknown fields {unknown} (known: {list(known)})")
        missing = [k for k in required if k not in obj]
        if missing:
            raise ModelLoadError(f"{where} lacks the fields {missing}")
        self.obj, self.where = obj, where

    def fail(self, key: str, expected: str):
        raise ModelLoadError(f"{self.where}.{key} must be {expected}, got {self.obj.get(key)!r}"[:400])

    def int(self, key: str, lo: int, hi: int, default=None) -> int:
        v = self.obj.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            self.fail(key, f"an integer in {lo}..{hi}")
        return v

    def number(self, key: str, lo: float, hi: float, default=None, optional: bool = False):
        v = self.obj.get(key, default)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            self.fail(key, f"a number in [{lo}, {hi}]" + (" or null" if optional else ""))
        return float(v)

    def bool(self, key: str, default=None, optional: bool = False):
        v = self.obj.get(key, default)
        if v is None and optional:
            return None
        if not isinstance(v, bool):
            self.fail(key, "true or false" + (" or null" if optional else ""))
        return v

    def choice(self, key: str, choices: tuple, default=None) -> str:
        v = self.obj.get(key, default)
        if not isinstance(v, str) or v not in choices:
            self.fail(key, f"one of {list(choices)}")
        return v

    def pair(self, key: str, lo: int, hi: int) -> tuple[int, int]:
        v = self.obj.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v, v]
        if (not isinstance(v, (list, tuple)) or len(v) != 2
                or any(isinstance(t, bool) or not isinstance(t, int) or not lo <= t <= hi for t in v)):
            self.fail(key, f"two integers in {lo}..{hi}")
        return int(v[0]), int(v[1])


ARCH_FIELDS = ("image_size", "patch_size", "width", "layers", "heads", "mlp_hidden", "activation", "output_dim",
               "has_proj", "pool_type", "final_ln_after_pool", "no_ln_pre", "eps", "attn_bias", "output_tokens",
               "preprocess_cfg")
QUANT_FIELDS = ("act_quant", "smooth_alpha", "static_percentile", "int8_patch_embed")
PREPROCESS_FIELDS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")


def check_arch(obj: Any, where: str):
    from .config import VisionArch

    f = _Fields(obj, where, ARCH_FIELDS, ARCH_FIELDS[:8])
    L = LIMITS
    image = f.pair("image_size", 1, L["image_side"])
    patch = f.pair("patch_size", 1, L["image_side"])
    if image[0] % patch[0] or image[1] % patch[1]:
        raise ModelLoadError(f"{where}.image_size {list(image)} is not a multiple of patch_size {list(patch)}")
    tokens = (image[0] // patch[0]) * (image[1] // patch[1]) + 1
    if tokens > L["tokens"]:
        raise ModelLoadError(f"{where}: image_size / patch_size give {tokens} tokens, more than {L['tokens']}")
    width, heads = f.int("width", 1, L["width"]), f.int("heads", 1, L["heads"])
    if width % heads:
        raise ModelLoadError(f"{where}.width {width} is not divisible by heads {heads}")
    values = {
        "image_size": image, "patch_size": patch, "width": width, "heads": heads,
        "layers": f.int("layers", 1, L["layers"]), "mlp_hidden": f.int("mlp_hidden", 1, L["mlp_hidden"]),
        "activation": f.choice("activation", ACTIVATIONS[1:]), "output_dim": f.int("output_dim", 1, L["output_dim"]),
        "has_proj": f.bool("has_proj", True), "pool_type": f.choice("pool_type", POOL_TYPES, "tok"),
        "final_ln_after_pool": f.bool("final_ln_after_pool", False), "no_ln_pre": f.bool("no_ln_pre", False),
        "eps": f.number("eps", 1e-30, 1.0, 1e-5), "attn_bias": f.bool("attn_bias", True),
        "output_tokens": f.bool("output_tokens", False),
    }
    pre = obj.get("preprocess_cfg", {})
    check_preprocess(pre, image, f"{where}.preprocess_cfg")
    values["preprocess_cfg"] = {k: tuple(v) if isinstance(v, list) else v for k, v in pre.items()}
    try:
        return VisionArch(**values)
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"{where}: {err}") from None


def check_quant(obj: Any, where: str):
    from .config import QuantConfig

    f = _Fields(obj, where, QUANT_FIELDS, ("act_quant",))
    try:
        return QuantConfig(act_quant=f.choice("act_quant", ACT_QUANT),
                           smooth_alpha=f.number("smooth_alpha", 0.0, 1.0, optional=True),
                           static_percentile=f.number("static_percentile", 0.0, 100.0, optional=True),
                           int8_patch_embed=f.bool("int8_patch_embed", optional=True))
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"{where}: {err}") from None


def _probe_image():
    """A small RGB gradient, not square, to run a transform on."""
    from PIL import Image

    x = torch.linspace(0, 255, 23 * 19 * 3).reshape(19, 23, 3).to(torch.uint8).numpy()
    return Image.fromarray(x, "RGB")


def check_preprocess(cfg: Any, image_size: tuple[int, int], where: str) -> None:
    """Validate a ``preprocess_cfg``: known fields of the right types, and open_clip's eval transform built from
    it turns an image into finite ``[3, H, W]`` for the tower's ``image_size``."""
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{where} must be a JSON object, got {type(cfg).__name__}")
    known = {k: v for k, v in cfg.items() if k in PREPROCESS_FIELDS}  # other keys are ignored, as open_clip does
    f = _Fields(known, where, PREPROCESS_FIELDS)
    if "size" in known:
        f.pair("size", 1, LIMITS["image_side"])
    if "mode" in known:
        f.choice("mode", ("RGB",))
    for key in ("mean", "std"):
        v = known.get(key)
        if v is None:
            continue
        if (not isinstance(v, (list, tuple)) or len(v) != 3
                or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) for t in v)
                or (key == "std" and any(t <= 0 for t in v))):
            f.fail(key, "three finite numbers" + (" > 0" if key == "std" else ""))
    if "interpolation" in known:
        f.choice("interpolation", ("bicubic", "bilinear", "random"))
    if "resize_mode" in known:
        f.choice("resize_mode", ("shortest", "longest", "squash"))
    if "fill_color" in known:
        f.int("fill_color", 0, 255)
    try:
        from open_clip.transform import PreprocessCfg, image_transform_v2
    except ImportError:  # open_clip absent: the field checks above are all we can do
        return
    pcfg = {k: tuple(v) if isinstance(v, list) else v for k, v in known.items()}
    pcfg.setdefault("size", tuple(image_size))
    try:
        out = image_transform_v2(PreprocessCfg(**pcfg), is_train=False)(_probe_image())
    except Exception as err:  # any failure of the transform on a plain RGB image is the config's
        raise ModelLoadError(f"{where}: open_clip's transform fails on it ({type(err).__name__}: {err})") from None
    want = (3, *image_size)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelLoadError(f"{where} gives images of shape {got}, the tower takes {want} (image_size)")
    if not torch.isfinite(out).all():
        raise ModelLoadError(f"{where} gives non-finite pixels")


def config_digest(cfg: dict) -> str:
    """SHA-256 of the canonical JSON of ``cfg``'s sealed fields (``SEALED_FIELDS``)."""
    sealed = {k: cfg.get(k) for k in SEALED_FIELDS}
    return hashlib.sha256(json.dumps(sealed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class CheckedConfig:
    """``config.json``, validated."""

    arch: Any  # VisionArch
    quant_config: Any  # QuantConfig
    backend: str
    act_dtype: str
    extra: dict[str, Any]
    format_version: int
    digest: str  # config_digest of the file


def check_format_version(f: _Fields, newest: int) -> int:
    """The config's ``format_version`` (default 1): an integer this lra-kernels reads (1..``newest``)."""
    v = f.obj.get("format_version", 1)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        f.fail("format_version", f"an integer in 1..{newest}")
    if v > newest:
        raise ModelLoadError(f"{f.where} has format_version {v}, newer than this lra-kernels reads ({newest}); "
                             f"upgrade lra-kernels")
    return v


def check_config(cfg: Any, where: str, fmt: str, version: int) -> CheckedConfig:
    f = _Fields(cfg, where, ("format", "format_version", "arch", "quant", "backend", "act_dtype", "extra"),
                ("format", "arch", "quant"))
    if cfg["format"] != fmt:
        raise ModelLoadError(f"{where} is not a {fmt} config (format={cfg['format']!r})")
    v = check_format_version(f, version)
    arch = check_arch(cfg["arch"], f"{where}: arch")
    quant = check_quant(cfg["quant"], f"{where}: quant")
    backend = f.choice("backend", BACKENDS, "auto")
    act_dtype = f.choice("act_dtype", ACT_DTYPE_NAMES, "float32")
    extra = cfg.get("extra", {})
    if not isinstance(extra, dict):
        f.fail("extra", "a JSON object")
    _check_extra(extra, arch, f"{where}: extra")
    return CheckedConfig(arch, quant, backend, act_dtype, extra, v, config_digest(cfg))


def _check_extra(extra: dict, arch, where: str) -> None:
    if "exit_policy" in extra:
        p = _Fields(extra["exit_policy"], f"{where}.exit_policy", ("exit_layers", "head", "meta"), ("exit_layers",))
        layers = p.obj["exit_layers"]
        if (not isinstance(layers, list) or len(layers) > LIMITS["exit_layers"]
                or any(isinstance(t, bool) or not isinstance(t, int) for t in layers)
                or any(not 1 <= t <= arch.layers - 1 for t in layers)
                or any(a >= b for a, b in zip(layers, layers[1:]))):
            p.fail("exit_layers", f"ascending integers in 1..{arch.layers - 1}")
        p.choice("head", HEADS, "patch_mean")
        if not isinstance(p.obj.get("meta", {}), dict):
            p.fail("meta", "a JSON object")
    if "classifier" in extra:
        c = _Fields(extra["classifier"], f"{where}.classifier", ("logit_scale", "class_names"), ("logit_scale",))
        c.number("logit_scale", 1e-6, 1e6)
        names = c.obj.get("class_names")
        if names is not None and (not isinstance(names, list) or not 1 <= len(names) <= LIMITS["classes"]
                                  or not all(isinstance(n, str) for n in names)):
            c.fail("class_names", f"null or a list of 1..{LIMITS['classes']} strings")


def expected_extra(extra: dict, arch, header: Mapping[str, "TensorInfo"]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors of the extra records: ``{name: (safetensors dtype, shape)}``."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    if "exit_policy" in extra:
        L, F = len(extra["exit_policy"]["exit_layers"]), N_FEATURES
        for name, shape in (("weight", (L, F)), ("bias", (L,)), ("feature_mean", (L, F)), ("feature_std", (L, F)),
                            ("threshold", (L,))):
            out[f"exit_policy.{name}"] = ("F32", shape)
    if "classifier" in extra:
        names = extra["classifier"].get("class_names")
        dim = arch.output_dim if arch.has_proj else arch.width
        got = header.get("classifier.text_features")
        if names is not None:
            rows = len(names)
        elif got is not None and len(got.shape) == 2 and 1 <= got.shape[0] <= LIMITS["classes"]:
            rows = got.shape[0]
        else:
            rows = -1  # any shape found is wrong
        out["classifier.text_features"] = ("F32", (rows, dim))
    return out


def spec_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (safetensors dtype, shape)}`` of a (meta) state dict."""
    return {k: (TORCH_TO_ST.get(t.dtype, str(t.dtype)), tuple(t.shape)) for k, t in state.items()}


# ---------------------------------------------------------------------- safetensors
@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(file: Path, fmt: str | None = None, version: str | None = None,
                digest: str | None = None) -> dict[str, TensorInfo]:
    """The safetensors header of ``file``, checked: entries, dtypes, shapes and byte ranges that tile the data;
    the metadata's ``format`` / ``format_version`` (when recorded) must be ``fmt`` / ``version``, and the data
    section must have the recorded SHA-256, and ``digest`` (``config_digest`` of config.json) the recorded one."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{file} is {size} bytes long: a safetensors file starts with an 8-byte "
                                     f"header length")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
                raise ModelLoadError(f"{file} is truncated or corrupt: its header length {n} does not fit in the "
                                     f"{size}-byte file (at most {min(MAX_HEADER_BYTES, max(size - 8, 0))})")
            raw = fh.read(n)
    except OSError as err:
        raise ModelLoadError(f"cannot read {file}: {err.strerror or err}") from None
    header = parse_json(raw, f"the header of {file}")
    if not isinstance(header, dict):
        raise ModelLoadError(f"the header of {file} must be a JSON object, got {type(header).__name__}")
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ModelLoadError(f"the __metadata__ of {file} must map strings to strings")
            metadata = entry
            continue
        where = f"{file}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ModelLoadError(f"{where} must have dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in ST_DTYPES:
            raise ModelLoadError(f"{where} has an unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)):
            raise ModelLoadError(f"{where} has a bad shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or any(isinstance(o, bool) or not isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise ModelLoadError(f"{where} has data_offsets {offsets!r} outside the {data_len}-byte data section "
                                 f"(truncated file?)")
        nbytes = math.prod(shape) * ST_DTYPES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise ModelLoadError(f"{where}: shape {shape} of {dtype} needs {nbytes} bytes, data_offsets give "
                                 f"{offsets[1] - offsets[0]}")
        out[name] = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    pos = 0
    for name, info in sorted(out.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != pos:
            raise ModelLoadError(f"{file}: the tensors' byte ranges overlap or leave a gap at byte {pos} "
                                 f"(tensor {name!r} starts at {info.begin})")
        pos = info.end
    if pos != data_len:
        raise ModelLoadError(f"{file} is truncated or has trailing bytes: the tensors end at byte {pos} of a "
                             f"{data_len}-byte data section")
    _check_metadata(file, metadata, fmt, version, digest, 8 + n)
    return out


def _check_metadata(file: Path, metadata: dict[str, str], fmt: str | None, version: str | None, digest: str | None,
                    start: int) -> None:
    unknown = sorted(set(metadata) - set(METADATA_KEYS))
    if unknown:
        raise ModelLoadError(f"the metadata of {file} has unknown keys {unknown} (known: {list(METADATA_KEYS)})")
    for key, want in (("format", fmt), ("format_version", version)):
        if want is not None and key in metadata and metadata[key] != want:
            raise ModelLoadError(f"{file} records {key} {metadata[key]!r}, config.json says {want!r}")
    if digest is not None and CONFIG_DIGEST_KEY in metadata and metadata[CONFIG_DIGEST_KEY] != digest:
        raise ModelLoadError(f"config.json does not match {file}: its arch, quant or extra fields differ from the "
                             f"ones the weights were saved with (only backend and act_dtype may be edited)")
    if DIGEST_KEY in metadata:
        data_digest = hashlib.sha256()
        with open(file, "rb") as fh:
            fh.seek(start)
            while chunk := fh.read(1 << 22):
                data_digest.update(chunk)
        if data_digest.hexdigest() != metadata[DIGEST_KEY]:
            raise ModelLoadError(f"{file} is corrupt: the SHA-256 of its data section does not match the one "
                                 f"recorded when it was saved")


def _shorten(names) -> str:
    names = sorted(names)
    return f"{names[:5]}{'...' if len(names) > 5 else ''}"


def check_against(header: Mapping[str, TensorInfo], expected: Mapping[str, tuple[str, tuple[int, ...]]],
                  file: Path) -> None:
    """The header holds exactly the ``expected`` tensors, each with its dtype and shape."""
    missing = set(expected) - set(header)
    if missing:
        raise ModelLoadError(f"{file} lacks tensors {_shorten(missing)} (the config implies them)")
    extra = set(header) - set(expected)
    if extra:
        raise ModelLoadError(f"{file} holds tensors the config does not describe: {_shorten(extra)}")
    for name, (dtype, shape) in expected.items():
        got = header[name]
        if got.dtype != dtype:
            raise ModelLoadError(f"{file}: tensor {name!r} must be {dtype}, got {got.dtype}")
        if got.shape != tuple(shape):
            want = "[C, " + str(shape[1]) + "]" if shape and shape[0] == -1 else list(shape)
            raise ModelLoadError(f"{file}: tensor {name!r} must have shape {want}, got {list(got.shape)}")


def check_values(tensors: Mapping[str, torch.Tensor], file: Path) -> None:
    """Every float tensor finite; scales non-negative."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        if not torch.isfinite(t).all():
            raise ModelLoadError(f"{file}: tensor {name!r} holds NaN or Inf")
        if name.endswith(("w_scale", "x_scale")) and (t < 0).any():
            raise ModelLoadError(f"{file}: scale {name!r} holds negative values")


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a header-checked safetensors file (any failure of the reader is a ``ModelLoadError``)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as err:  # SafetensorError and friends: the file changed or is corrupt in a way we missed
        raise ModelLoadError(f"cannot read {file}: {type(err).__name__}: {err}") from None
