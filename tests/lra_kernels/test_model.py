"""QuantEarlyExitViT on tiny open_clip towers: conversion, forward contract, bad input, batch invariance."""

import warnings

import pytest
import torch
import torch.nn as nn

from conftest import cosine, images_for, make_tower
from lra_kernels import QuantEarlyExitViT

TOWER_VARIANTS = {
    "gelu": {},
    "quick_gelu": {"act": "quick_gelu"},
    "avg_pool": {"pool_type": "avg"},
    "final_ln_after_pool": {"pool_type": "avg", "final_ln_after_pool": True},
    "layer_scale": {"ls_init_value": 0.3},
    "no_ln_pre": {"no_ln_pre": True},
    "rectangular": {"image_size": (32, 48)},
}


@pytest.mark.parametrize("variant", TOWER_VARIANTS)
def test_variants_track_fp32(variant):
    v = make_tower(**TOWER_VARIANTS[variant])
    x = images_for(v, 6)
    ref = v(x).detach()
    q = QuantEarlyExitViT.from_open_clip(v, compile_blocks=False)
    y = q(x)
    assert y.shape == ref.shape == (6, 32) and y.dtype == torch.float32
    assert cosine(y, ref).min() > 0.995


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"int8_patch_embed": True},
        {"act_quant": "paper"},
        {"smooth_alpha": 0.5, "calibration_images": "cal"},
        {"act_quant": "per_tensor_static", "calibration_images": "cal"},
        {"act_quant": "per_tensor_static", "static_percentile": 99.9, "calibration_images": "cal"},
        {"act_quant": "per_tensor_static", "smooth_alpha": 0.5, "calibration_images": "cal"},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items() if k != "calibration_images") or "default",
)
def test_schemes_track_fp32(kwargs):
    v = make_tower()
    if "calibration_images" in kwargs:
        kwargs = {**kwargs, "calibration_images": images_for(v, 16, seed=7)}
    x = images_for(v, 6)
    q = QuantEarlyExitViT.from_open_clip(v, compile_blocks=False, **kwargs)
    assert cosine(q(x), v(x).detach()).min() > 0.99


def test_keeps_open_clip_attributes(tower):
    q = QuantEarlyExitViT.from_open_clip(tower, compile_blocks=False)
    for name in ("image_size", "patch_size", "grid_size"):
        assert tuple(getattr(q, name)) == tuple(getattr(tower, name)), name
    assert q.output_dim == tower.output_dim
    assert len(q.transformer.resblocks) == q.depth == 3
    assert q.proj.shape == tower.proj.shape
    assert not any(p.requires_grad for p in q.parameters())


def test_output_tokens_like_open_clip():
    v = make_tower(output_tokens=True)
    x = images_for(v, 3)
    ref_pooled, ref_tokens = v(x)
    pooled, tokens = QuantEarlyExitViT.from_open_clip(v, compile_blocks=False)(x)
    assert pooled.shape == ref_pooled.shape and tokens.shape == ref_tokens.shape
    assert cosine(tokens.flatten(1), ref_tokens.detach().flatten(1)).min() > 0.99


def test_fp32_tower_is_not_modified(tower):
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    QuantEarlyExitViT.from_open_clip(tower, smooth_alpha=0.5, calibration_images=images_for(tower, 4),
                                     compile_blocks=False)
    after = tower.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------- unsupported towers
def test_attentional_pool_is_rejected():
    v = make_tower(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=4)
    with pytest.raises(NotImplementedError, match="attentional pool"):
        QuantEarlyExitViT.from_open_clip(v)


def test_custom_block_is_rejected():
    v = make_tower(block_type="custom", qk_norm=True)
    with pytest.raises(NotImplementedError, match="ResidualAttentionBlock"):
        QuantEarlyExitViT.from_open_clip(v)


def test_non_vit_tower_is_rejected():
    from open_clip.modified_resnet import ModifiedResNet

    resnet = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=32, heads=2, image_size=64, width=16)
    with pytest.raises(NotImplementedError, match="VisionTransformer"):
        QuantEarlyExitViT.from_open_clip(resnet)
    with pytest.raises(NotImplementedError, match="VisionTransformer"):
        QuantEarlyExitViT.from_open_clip(nn.Linear(3, 3))


def test_bad_options_are_rejected(tower):
    with pytest.raises(ValueError, match="act_quant"):
        QuantEarlyExitViT.from_open_clip(tower, act_quant="per_channel")
    with pytest.raises(ValueError, match="calibration_images"):
        QuantEarlyExitViT.from_open_clip(tower, smooth_alpha=0.5)
    with pytest.raises(ValueError, match="calibration_images"):
        QuantEarlyExitViT.from_open_clip(tower, act_quant="per_tensor_static")
    with pytest.raises(ValueError, match="backend"):
        QuantEarlyExitViT.from_open_clip(tower, backend="cuda")
    with pytest.raises(ValueError, match="smooth_alpha"):
        QuantEarlyExitViT.from_open_clip(tower, smooth_alpha=2.0, calibration_images=images_for(tower, 2))


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(tower, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = QuantEarlyExitViT.from_open_clip(tower, backend="triton")
    with pytest.raises(ValueError, match="CUDA"):
        q(images_for(tower, 1))


# ---------------------------------------------------------------------- bad input
@pytest.fixture
def qvit(tower):
    return QuantEarlyExitViT.from_open_clip(tower, compile_blocks=False)


def test_empty_batch(qvit):
    out = qvit(torch.zeros(0, 3, 32, 32))
    assert out.shape == (0, 32)


def test_wrong_size_names_expected(qvit):
    with pytest.raises(ValueError, match="32 x 32"):
        qvit(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="3 colour channels"):
        qvit(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        qvit(torch.randn(3, 32, 32))


def test_wrong_dtype_and_type(qvit):
    with pytest.raises(TypeError, match="float images.*uint8"):
        qvit(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        qvit([[0.0]])


def test_wrong_device_names_both(qvit):
    meta = torch.randn(2, 3, 32, 32, device="meta")
    with pytest.raises(ValueError, match="meta.*cpu"):
        qvit(meta)


@pytest.mark.parametrize("act_quant", ("per_token", "per_tensor_static"))
@pytest.mark.parametrize("poison", (float("nan"), float("inf")))
def test_nonfinite_image_changes_only_its_row(tower, act_quant, poison):
    q = QuantEarlyExitViT.from_open_clip(
        tower, act_quant=act_quant, calibration_images=images_for(tower, 8, seed=3), compile_blocks=False
    )
    x = images_for(tower, 5)
    clean = q(x)
    x[2, 1, 4, 5] = poison
    out = q(x)
    keep = [0, 1, 3, 4]
    assert torch.equal(out[keep], clean[keep])
    assert not torch.isfinite(out[2]).all(), "a poisoned image must not produce a plausible embedding"


# ---------------------------------------------------------------------- batch invariance, compile
@pytest.mark.parametrize("compile_blocks", (False, True))
def test_rows_do_not_depend_on_the_batch(tower, compile_blocks):
    q = QuantEarlyExitViT.from_open_clip(tower, compile_blocks=compile_blocks)
    x = images_for(tower, 9)
    full = q(x)
    for sub in (slice(4, 5), slice(0, 3), slice(2, 9)):
        assert torch.equal(q(x[sub]), full[sub])


def test_compiled_matches_eager(tower):
    x = images_for(tower, 7)
    eager = QuantEarlyExitViT.from_open_clip(tower, compile_blocks=False)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a silent fallback to eager would pass vacuously
        compiled_model = QuantEarlyExitViT.from_open_clip(tower, compile_blocks=True)
        compiled = compiled_model(x)
    assert not compiled_model._compile_failed
    # Inductor may reassociate the LayerNorm sums, flipping an occasional rounding tie: tiny differences only.
    assert cosine(compiled, eager).min() > 0.99999


def test_inference_mode_no_grad_autocast_and_dtypes(qvit):
    x = images_for(qvit, 4)
    ref = qvit(x)
    with torch.inference_mode():
        assert torch.equal(qvit(x), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(qvit(x), ref), "CPU autocast must not change the INT8 tower's arithmetic"
    out_bf16 = qvit(x.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    half = qvit.to(torch.float16)
    assert half.class_embedding.dtype == torch.float32, "float storage stays fp32"
    assert half.transformer.resblocks[0].attn.in_proj.w_scale.dtype == torch.float32
    assert torch.equal(half(x), ref)
    assert qvit.eval() is qvit and qvit.to("cpu") is qvit


def test_hidden_states(qvit):
    x = images_for(qvit, 2)
    states = qvit.hidden_states(x)
    assert len(states) == qvit.depth + 1
    assert all(s.shape == (2, 17, 64) for s in states)
    pooled, _ = qvit.pool(states[-1])
    assert torch.equal(pooled, qvit(x))
