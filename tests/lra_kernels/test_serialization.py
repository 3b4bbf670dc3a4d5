"""save / load through safetensors + JSON: bit-identical outputs, no FP32 model, clear errors."""

import json
import pickle

import pytest
import torch

from conftest import images_for, make_tower
from lra_kernels import QuantEarlyExitViT


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"int8_patch_embed": True},
        {"act_quant": "paper"},
        {"act_quant": "per_tensor_static", "smooth_alpha": 0.5, "calibration_images": "cal"},
    ],
    ids=["per_token", "int8_patch_embed", "paper", "static_smooth"],
)
def test_round_trip_is_bit_identical(tmp_path, kwargs):
    v = make_tower(act="quick_gelu", pool_type="avg", ls_init_value=0.5)
    if "calibration_images" in kwargs:
        kwargs = {**kwargs, "calibration_images": images_for(v, 8, seed=5)}
    q = QuantEarlyExitViT.from_open_clip(v, compile_blocks=False, **kwargs)
    x = images_for(v, 4)
    ref = q(x)
    q.save(tmp_path / "m")
    del v  # load needs no FP32 tower
    r = QuantEarlyExitViT.load(tmp_path / "m")
    r.compile_blocks = False
    assert torch.equal(r(x), ref)
    assert r.quant_config == q.quant_config and r.arch == q.arch
    for a, b in zip(q.state_dict().items(), r.state_dict().items()):
        assert a[0] == b[0] and a[1].dtype == b[1].dtype and torch.equal(a[1], b[1])


def test_files_hold_no_pickle(tmp_path):
    q = QuantEarlyExitViT.from_open_clip(make_tower(), compile_blocks=False)
    path = q.save(tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["arch"]["width"] == 64 and cfg["quant"]["act_quant"] == "per_token"
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads((path / "model.safetensors").read_bytes())


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model directory"):
        QuantEarlyExitViT.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        QuantEarlyExitViT.load(tmp_path / "empty")
    q = QuantEarlyExitViT.from_open_clip(make_tower(), compile_blocks=False)
    path = q.save(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["format_version"] = 99
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="newer"):
        QuantEarlyExitViT.load(path)
    with pytest.raises(ValueError, match="not a directory"):
        (tmp_path / "file").write_text("x")
        q.save(tmp_path / "file")


def test_truncated_weights_are_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    q = QuantEarlyExitViT.from_open_clip(make_tower(), compile_blocks=False)
    path = q.save(tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    tensors.pop("transformer.resblocks.1.mlp.c_fc.w_scale")
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks tensors.*c_fc.w_scale"):
        QuantEarlyExitViT.load(path)


def test_format_1_directories_still_load(tmp_path):
    """Format 1 stored INT8 weights transposed (``qweight_t[K, N]``); loading upgrades them."""
    from safetensors.torch import load_file, save_file

    v = make_tower()
    q = QuantEarlyExitViT.from_open_clip(v, compile_blocks=False)
    x = images_for(v, 3)
    path = q.save(tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    old = {(k + "_t" if k.endswith(".qweight") else k): (t.t().contiguous() if k.endswith(".qweight") else t)
           for k, t in tensors.items()}
    assert any(k.endswith(".qweight_t") for k in old)
    save_file(old, str(path / "model.safetensors"), metadata={"format": "lra-kernels/quant-vit", "format_version": "1"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["format_version"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    r = QuantEarlyExitViT.load(path)
    r.compile_blocks = False
    assert torch.equal(r(x), q(x))
