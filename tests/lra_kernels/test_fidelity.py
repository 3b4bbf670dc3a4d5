"""Whole-tower fidelity on full-size open_clip architectures with seeded random weights.

Random weights lack trained CLIP's outlier channels, so the outlier tower plants them
(``lra_ee.synthetic.plant_outlier_channels``); these are fidelity checks, not accuracy.
"""

import copy

import pytest
import torch

from conftest import cosine, sqnr_db
from lra_ee.synthetic import plant_outlier_channels, random_tower
from lra_kernels import QuantEarlyExitViT


@pytest.fixture(scope="module")
def towers():
    base = random_tower("ViT-B-32", seed=0)
    outlier = copy.deepcopy(base)
    plan = plant_outlier_channels(outlier, seed=0)
    gen = torch.Generator().manual_seed(11)
    images = torch.randn(16, 3, 224, 224, generator=gen)
    calib = torch.randn(32, 3, 224, 224, generator=gen)
    with torch.no_grad():
        refs = {"random": base(images), "outlier": outlier(images)}
    return {"random": base, "outlier": outlier}, refs, images, calib, plan


def _fidelity(towers, which, **kwargs):
    t, refs, images, calib, _ = towers
    if kwargs.pop("calibrate", False):
        kwargs["calibration_images"] = calib
    q = QuantEarlyExitViT.from_open_clip(t[which], compile_blocks=False, **kwargs)
    out = q(images)
    return cosine(out, refs[which]), sqnr_db(refs[which], out)


def test_planted_outliers_are_like_trained_clip(towers):
    plan = towers[-1]
    assert 10 <= plan.ratio <= 100, f"outlier channels should be 10-100x the rest, got {plan.ratio:.1f}x"


def test_per_token_random_tower(towers):
    cos, sqnr = _fidelity(towers, "random")
    assert cos.mean() >= 0.9995, f"cosine {cos.mean():.5f}, SQNR {sqnr:.1f} dB"


def test_smoothquant_rescues_outlier_tower(towers):
    plain, plain_sqnr = _fidelity(towers, "outlier")
    smooth, smooth_sqnr = _fidelity(towers, "outlier", smooth_alpha=0.5, calibrate=True)
    paper, paper_sqnr = _fidelity(towers, "outlier", act_quant="paper")
    assert smooth.mean() >= 0.9995, f"SmoothQuant cosine {smooth.mean():.5f}"
    # The planted outliers must actually hurt the quantizers that cannot handle them.
    assert plain.mean() < smooth.mean() and plain_sqnr < smooth_sqnr
    assert paper.mean() < plain.mean() and paper_sqnr < plain_sqnr


def test_static_smoothquant_outlier_tower(towers):
    cos, _ = _fidelity(towers, "outlier", act_quant="per_tensor_static", smooth_alpha=0.5, calibrate=True)
    assert cos.mean() >= 0.999


def test_int8_patch_embed_fidelity(towers):
    cos, _ = _fidelity(towers, "random", int8_patch_embed=True)
    assert cos.mean() >= 0.9995


def test_compiled_full_tower_is_batch_invariant(towers):
    t, refs, images, _, _ = towers
    q = QuantEarlyExitViT.from_open_clip(t["random"], compile_blocks=True)
    full = q(images[:8])
    assert not q._compile_failed
    for sub in (slice(0, 1), slice(3, 8), slice(1, 4)):
        assert torch.equal(q(images[sub]), full[sub])
    assert cosine(full, refs["random"][:8]).mean() >= 0.9995


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-L-14", "ViT-B-32-quickgelu"])
def test_other_architectures(name):
    v = random_tower(name, seed=0)
    x = torch.randn(2, 3, *v.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = v(x)
    q = QuantEarlyExitViT.from_open_clip(v, compile_blocks=False)
    assert q.arch.activation == ("quick_gelu" if "quickgelu" in name else "gelu")
    assert cosine(q(x), ref).min() >= 0.999
