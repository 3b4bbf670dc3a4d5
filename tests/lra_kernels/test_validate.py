"""Loading a model directory is a validator: every way a directory can be wrong is one ``ModelLoadError``.

Fuzzed: the weights file truncated at random offsets and with random bits flipped, every config field
mutated, tensors of the wrong dtype / shape / values, missing and extra tensors. Each attempt must raise
``ModelLoadError`` (never another exception, never a silent load); an intact copy must still load.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import struct
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import images_for, make_tower
from lra_kernels import ExitPolicy, ModelLoadError, QuantEarlyExitViT
from lra_kernels.names import N_FEATURES
from lra_kernels.validate import LIMITS, check_preprocess

WEIGHTS, CONFIG = "model.safetensors", "config.json"


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """A tower with a classifier and an exit policy (tensors of every kind the format holds)."""
    torch.manual_seed(1)
    v = make_tower(layers=3, seed=2)
    q = QuantEarlyExitViT.from_open_clip(v, act_quant="per_tensor_static", smooth_alpha=0.5,
                                         calibration_images=images_for(v, 6, seed=3), compile_blocks=False)
    q.set_classifier(F.normalize(torch.randn(5, q.output_dim), dim=-1), class_names=list("abcde"))
    L = 2
    q.exit_policy = ExitPolicy((1, 2), torch.randn(L, N_FEATURES), torch.randn(L), torch.randn(L, N_FEATURES),
                               torch.rand(L, N_FEATURES) + 0.5, torch.full((L,), 0.7))
    path = q.save(tmp_path_factory.mktemp("validate") / "m")
    x = images_for(v, 3, seed=4)
    return path, x, q.classify(x).logits


def _copy(saved_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(saved_dir[0], dst)
    return dst


def _rejects(path, match: str | None = None) -> str:
    """The one ``ModelLoadError`` loading ``path`` raises (any other exception fails the test)."""
    with pytest.raises(ModelLoadError) as info:
        QuantEarlyExitViT.load(path)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 600, msg
    if match is not None:
        assert match in msg, msg
    return msg


def test_intact_copy_loads_and_answers_the_same(saved_dir, tmp_path):
    path = _copy(saved_dir, tmp_path)
    r = QuantEarlyExitViT.load(path)
    r.compile_blocks = False
    assert torch.equal(r.classify(saved_dir[1]).logits, saved_dir[2])


@pytest.mark.parametrize("seed", range(3))
def test_truncated_at_random_offsets(saved_dir, tmp_path, seed):
    path = _copy(saved_dir, tmp_path)
    blob = (saved_dir[0] / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    rng = np.random.default_rng(seed)
    offsets = {0, 1, 7, 8, 9, 8 + n - 1, 8 + n, 8 + n + 1, len(blob) - 1}
    offsets |= set(rng.integers(0, 8 + n, 12).tolist()) | set(rng.integers(8 + n, len(blob), 12).tolist())
    for cut in sorted(offsets):
        (path / WEIGHTS).write_bytes(blob[:cut])
        _rejects(path)


@pytest.mark.parametrize("seed", range(3))
def test_flipped_bits_anywhere(saved_dir, tmp_path, seed):
    """One flipped bit in the length, the header or the data: the header checks or the recorded SHA-256 catch it."""
    path = _copy(saved_dir, tmp_path)
    blob = (saved_dir[0] / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    rng = np.random.default_rng(100 + seed)
    where = np.concatenate([rng.integers(0, 8, 3), rng.integers(8, 8 + n, 20), rng.integers(8 + n, len(blob), 20)])
    for pos in where.tolist():
        b = bytearray(blob)
        b[pos] ^= 1 << int(rng.integers(0, 8))
        (path / WEIGHTS).write_bytes(bytes(b))
        _rejects(path)


def test_header_length_and_tiny_files(saved_dir, tmp_path):
    path = _copy(saved_dir, tmp_path)
    blob = (saved_dir[0] / WEIGHTS).read_bytes()
    for body, match in [(b"", "8-byte header length"), (b"\x00" * 8, "header length"),
                        (struct.pack("<Q", 2**62) + blob[8:], "header length"),
                        (struct.pack("<Q", 2**64 - 1) + blob[8:], "header length"),
                        (struct.pack("<Q", 4) + b"[1] " + blob[12:], "JSON object"),
                        (struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", "JSON")]:
        (path / WEIGHTS).write_bytes(body)
        _rejects(path, match)


# ---------------------------------------------------------------------- tensors (rewritten without the digests,
# so the structural and value checks are what catches them)
def _rewrite(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / WEIGHTS))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS))


@pytest.mark.parametrize("case, match", [
    ("int8_as_float", "must be I8"),
    ("nan_weight", "NaN or Inf"),
    ("inf_scale", "NaN or Inf"),
    ("negative_scale", "negative"),
    ("extra_tensor", "does not describe"),
    ("missing_tensor", "lacks tensors"),
    ("wrong_shape", "must have shape"),
    ("classifier_rows", "must have shape"),
    ("policy_nan", "NaN or Inf"),
    ("unnormalised_classifier", "L2-normalised"),
    ("policy_std_zero", "feature_std"),
])
def test_bad_tensors(saved_dir, tmp_path, case, match):
    path = _copy(saved_dir, tmp_path)
    qname = "transformer.resblocks.1.mlp.c_fc.qweight"

    def change(t):
        if case == "int8_as_float":
            t[qname] = t[qname].float() * 1000
        elif case == "nan_weight":
            t["ln_post.weight"][3] = math.nan
        elif case == "inf_scale":
            t["transformer.resblocks.0.attn.in_proj.w_scale"][0] = math.inf
        elif case == "negative_scale":
            t["transformer.resblocks.0.attn.in_proj.w_scale"][0] = -1.0
        elif case == "extra_tensor":
            t["surprise"] = torch.zeros(3)
        elif case == "missing_tensor":
            t.pop("transformer.resblocks.2.ln_1.bias")
        elif case == "wrong_shape":
            t["proj"] = torch.zeros(64, 33)
        elif case == "classifier_rows":
            t["classifier.text_features"] = F.normalize(torch.randn(6, 32), dim=-1)
        elif case == "policy_nan":
            t["exit_policy.weight"][0, 0] = math.nan
        elif case == "unnormalised_classifier":
            t["classifier.text_features"] = t["classifier.text_features"] * 3
        elif case == "policy_std_zero":
            t["exit_policy.feature_std"][1, 1] = 0.0

    _rewrite(path, change)
    _rejects(path, match)


def test_rewritten_but_intact_tensors_still_load(saved_dir, tmp_path):
    """Files without the recorded digests (other writers, older versions) load when they are right."""
    path = _copy(saved_dir, tmp_path)
    _rewrite(path, lambda t: None)
    r = QuantEarlyExitViT.load(path)
    r.compile_blocks = False
    assert torch.equal(r.classify(saved_dir[1]).logits, saved_dir[2])


# ---------------------------------------------------------------------- config.json
def _leaves(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "meta":  # free-form provenance records
                continue
            yield from _leaves(v, prefix + (k,))
    elif isinstance(obj, list) and obj and not all(isinstance(t, str) for t in obj):
        for i, v in enumerate(obj):
            yield from _leaves(v, prefix + (i,))
    yield prefix, obj


def _set(cfg, keys, value):
    out = copy.deepcopy(cfg)
    node = out
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return out


def _mutations(value):
    """Values of another type, and for numbers, other values of the same type."""
    out = [{"k": 1}, [[]], "x" if not isinstance(value, str) else "not-a-choice"]
    if value is not None and not isinstance(value, bool):
        out.append(None)
    if isinstance(value, bool):
        out.append(int(value))
    elif isinstance(value, int):
        out += [value + 1, -value - 1, 10**12]
    elif isinstance(value, float):
        out += [value * 2, -value, 1e300]
    return out


def test_every_config_field_mutated(saved_dir, tmp_path):
    path = _copy(saved_dir, tmp_path)
    cfg = json.loads((saved_dir[0] / CONFIG).read_text())
    tried = 0
    for keys, value in list(_leaves(cfg)):
        if not keys or keys[0] in ("backend", "act_dtype"):  # editable: checked below
            continue
        for bad in _mutations(value):
            (path / CONFIG).write_text(json.dumps(_set(cfg, keys, bad)))
            with pytest.raises(ModelLoadError):
                QuantEarlyExitViT.load(path)
            tried += 1
        parent = _set(cfg, keys, None)  # and the field removed
        node = parent
        for k in keys[:-1]:
            node = node[k]
        if isinstance(node, dict):
            del node[keys[-1]]
            (path / CONFIG).write_text(json.dumps(parent))
            with pytest.raises(ModelLoadError):
                QuantEarlyExitViT.load(path)
    assert tried > 100


@pytest.mark.parametrize("key, bad, ok", [("backend", "tpu", "torch"), ("act_dtype", "float8", "float32")])
def test_editable_fields_are_still_checked(saved_dir, tmp_path, key, bad, ok):
    path = _copy(saved_dir, tmp_path)
    cfg = json.loads((saved_dir[0] / CONFIG).read_text())
    (path / CONFIG).write_text(json.dumps({**cfg, key: bad}))
    _rejects(path, key)
    (path / CONFIG).write_text(json.dumps({**cfg, key: ok}))
    QuantEarlyExitViT.load(path)


@pytest.mark.parametrize("text, match", [
    ("[1, 2]", "JSON object"),
    ("{", "not valid JSON"),
    ('{"format_version": 1e400}', "overflows"),
    ('{"format_version": NaN}', "not valid JSON"),
    ("\xff", "not valid JSON"),
])
def test_config_not_an_object(saved_dir, tmp_path, text, match):
    path = _copy(saved_dir, tmp_path)
    (path / CONFIG).write_bytes(text.encode("latin-1"))
    _rejects(path, match)


@pytest.mark.parametrize("keys, value, match", [
    (("arch", "layers"), 1_000_000_000, "layers"),
    (("arch", "width"), -768, "width"),
    (("arch", "output_dim"), 33, "config.json does not match"),
    (("arch", "heads"), 8, "config.json does not match"),  # same shapes: only the recorded digest tells
    (("arch", "image_size"), [4096, 4096], "tokens"),
    (("arch", "preprocess_cfg", "interpolation"), "nope", "interpolation"),
    (("arch", "preprocess_cfg", "std"), [0, 0, 0], "std"),
    (("arch", "preprocess_cfg", "size"), [256, 256], "shape"),
    (("extra", "exit_policy", "exit_layers"), [1, 3], "exit_layers"),
    (("format_version", ), 3, "newer"),
])
def test_named_config_faults(saved_dir, tmp_path, keys, value, match):
    path = _copy(saved_dir, tmp_path)
    cfg = json.loads((saved_dir[0] / CONFIG).read_text())
    (path / CONFIG).write_text(json.dumps(_set(cfg, keys, value)))
    start = time.perf_counter()
    _rejects(path, match)
    assert time.perf_counter() - start < 10  # bounded before anything is built


def test_sizes_are_bounded_before_building(saved_dir, tmp_path):
    """A config at the limits with a digest-less weights file: rejected by the header comparison, without
    building (or allocating) the tower it describes."""
    path = _copy(saved_dir, tmp_path)
    cfg = json.loads((saved_dir[0] / CONFIG).read_text())
    _rewrite(path, lambda t: None)  # no recorded digests
    big = _set(cfg, ("arch", "layers"), LIMITS["layers"])
    big = _set(big, ("arch", "width"), 4096)
    big = _set(big, ("arch", "heads"), 32)
    big = _set(big, ("arch", "mlp_hidden"), 16384)
    (path / CONFIG).write_text(json.dumps(big))
    start = time.perf_counter()
    _rejects(path, "lacks tensors")
    assert time.perf_counter() - start < 30


def test_preprocess_check_builds_the_transform():
    check_preprocess({"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}, (32, 32), "cfg")
    with pytest.raises(ModelLoadError, match="shape"):
        check_preprocess({"size": 48}, (32, 32), "cfg")
    with pytest.raises(ModelLoadError, match="resize_mode"):
        check_preprocess({"resize_mode": "fill"}, (32, 32), "cfg")
    with pytest.raises(ModelLoadError, match="mean"):
        check_preprocess({"mean": [0.5, 0.5]}, (32, 32), "cfg")


def test_missing_directory_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no model directory"):
        QuantEarlyExitViT.load(tmp_path / "nowhere")
    assert issubclass(ModelLoadError, ValueError)
