"""A saved ``QuantCLIP`` directory is validated as the image tower's is: ``text.safetensors`` truncated at random
offsets or with random bits flipped, every field of ``clip.json`` mutated, sizes bounded before building, wrong or
extra tensors, non-finite values: always ``ModelLoadError``, never another exception, never a silent load."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lra_kernels import ModelLoadError, QuantCLIP
from lra_kernels.clip_files import CLIP_CONFIG_FILE, TEXT_WEIGHTS_FILE
from test_clip import TOKENIZER, WORDS, prompts, small_clip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    q = QuantCLIP.from_open_clip(small_clip(), calibration_texts=prompts(WORDS[:4]), tokenizer_name=TOKENIZER)
    return q, q.save(tmp_path_factory.mktemp("clip") / "model")


@pytest.fixture
def m(saved, tmp_path):
    """A fresh copy of the saved model directory, for a test to damage."""
    return _copy(saved[1], tmp_path)


def _copy(src, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _config(path):
    return json.loads((path / CLIP_CONFIG_FILE).read_text())


def _write_config(path, cfg):
    (path / CLIP_CONFIG_FILE).write_text(json.dumps(cfg))


def test_intact_copy_loads_and_answers_the_same(saved, tmp_path):
    q, path = saved
    back = QuantCLIP.load(_copy(path, tmp_path))
    tokens = prompts(WORDS[4:7])
    assert torch.equal(back.encode_text(tokens), q.encode_text(tokens))


@pytest.mark.parametrize("seed", range(4))
def test_truncated_text_weights(m, seed):
    file = m / TEXT_WEIGHTS_FILE
    data = file.read_bytes()
    cut = int(np.random.default_rng(seed).integers(0, len(data)))
    file.write_bytes(data[:cut])
    with pytest.raises(ModelLoadError):
        QuantCLIP.load(m)


@pytest.mark.parametrize("seed", range(6))
def test_flipped_bits_in_text_weights(m, seed):
    file = m / TEXT_WEIGHTS_FILE
    data = bytearray(file.read_bytes())
    rng = np.random.default_rng(50 + seed)
    # the length, the header, and the data section each get flipped bits across the seeds
    n = int.from_bytes(data[:8], "little")
    pos = [int(rng.integers(0, 8)), int(rng.integers(8, 8 + n)), int(rng.integers(8 + n, len(data)))][seed % 3]
    data[pos] ^= 1 << int(rng.integers(0, 8))
    file.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError):
        QuantCLIP.load(m)


def _rewrite_tensors(m, change):
    file = m / TEXT_WEIGHTS_FILE
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "lra-kernels/quant-clip", "format_version": "1"})


@pytest.mark.parametrize("change,match", [
    (lambda t: t.pop("logit_scale"), "lacks tensors"),
    (lambda t: t.__setitem__("text.extra", torch.zeros(3)), "does not describe"),
    (lambda t: t.__setitem__("text.token_embedding", t["text.token_embedding"][:-1].clone()), "must have shape"),
    (lambda t: t.__setitem__("logit_scale", torch.tensor(float("nan"))), "NaN or Inf"),
    (lambda t: t.__setitem__("text.positional_embedding", t["text.positional_embedding"].double()), "must be F32"),
])
def test_bad_tensors(m, change, match):
    _rewrite_tensors(m, change)
    with pytest.raises(ModelLoadError, match=match):
        QuantCLIP.load(m)


def test_int8_weight_replaced_by_floats(m):
    name = next(k for k, v in load_file(str(m / TEXT_WEIGHTS_FILE)).items() if v.dtype == torch.int8)
    _rewrite_tensors(m, lambda t: t.__setitem__(name, t[name].float() * 1000))
    with pytest.raises(ModelLoadError, match="must be I8"):
        QuantCLIP.load(m)


def test_intact_rewrite_without_digest_still_loads(saved, tmp_path):
    """A file rewritten by another tool (no recorded SHA-256) loads when its tensors are exactly right."""
    q, path = saved
    m = _copy(path, tmp_path)
    _rewrite_tensors(m, lambda t: None)
    tokens = prompts(WORDS[7:9])
    assert torch.equal(QuantCLIP.load(m).encode_text(tokens), q.encode_text(tokens))


def _mutations(cfg):
    """Every field of clip.json set to values of the wrong type, out of range, or missing."""
    bad_values = [None, "x", -1, 0, 10**12, 1.5, [], {}, True]
    for key in cfg:
        for v in bad_values:
            yield (key,), v
    for key in cfg["text"]:
        for v in bad_values:
            yield ("text", key), v
    for key in cfg["quant"]:
        for v in bad_values:
            yield ("quant", key), v


def test_every_config_field_mutated(m):
    original = _config(m)
    loaded = 0
    for keys, value in _mutations(original):
        cfg = copy.deepcopy(original)
        target = cfg
        for k in keys[:-1]:
            target = target[k]
        if target.get(keys[-1]) == value and type(target.get(keys[-1])) is type(value):
            continue
        target[keys[-1]] = value
        _write_config(m, cfg)
        try:
            QuantCLIP.load(m)
            loaded += 1  # a change that is valid and sealed-irrelevant (e.g. text_chunk_tokens, files) may load
            assert keys[-1] in ("text_chunk_tokens", "files") or keys == ("tokenizer_name",), (keys, value)
        except ModelLoadError:
            pass
    assert loaded < 20


@pytest.mark.parametrize("text,match", [
    ("[1, 2]", "must be a JSON object"),
    ('{"format": "lra-kernels/quant-clip", "kind": "quant_clip", "text": {}, "quant": {}, "x": NaN}', "NaN"),
    ("{", "JSON"),
])
def test_clip_json_not_an_object(m, text, match):
    (m / CLIP_CONFIG_FILE).write_text(text)
    with pytest.raises(ModelLoadError, match=match):
        QuantCLIP.load(m)


def test_sizes_are_bounded_before_building(m):
    for key, value in (("layers", 10**9), ("vocab_size", 10**10), ("context_length", 10**7), ("width", -768)):
        cfg = _config(m)
        cfg["text"][key] = value
        _write_config(m, cfg)
        with pytest.raises(ModelLoadError, match=key):
            QuantCLIP.load(m)


def test_sealed_fields_cannot_be_edited(m):
    """heads 4 -> 2 keeps every tensor shape; the digest recorded at saving catches it."""
    cfg = _config(m)
    cfg["text"]["heads"] = 2
    _write_config(m, cfg)
    with pytest.raises(ModelLoadError, match="does not match"):
        QuantCLIP.load(m)


def test_missing_text_weights_and_newer_format(m, saved, tmp_path):
    (m / TEXT_WEIGHTS_FILE).unlink()
    with pytest.raises(ModelLoadError, match="lacks text.safetensors"):
        QuantCLIP.load(m)
    m2 = _copy(saved[1], tmp_path, "m2")
    cfg = _config(m2)
    cfg["format_version"] = 99
    _write_config(m2, cfg)
    with pytest.raises(ModelLoadError, match="newer"):
        QuantCLIP.load(m2)
