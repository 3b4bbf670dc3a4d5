"""The quantized block against open_clip's block and its FP32 mirror."""

import pytest
import torch

from conftest import cosine, make_tower
from lra_kernels.backend import TORCH_OPS
from lra_kernels.config import QuantConfig
from lra_kernels.convert import FloatBlockParams, arch_from_visual, collect_stats, quantize_block, smooth_block


@pytest.mark.parametrize("act", ("gelu", "quick_gelu"))
@pytest.mark.parametrize("ls_init_value", (None, 0.5))
def test_float_mirror_matches_open_clip_block(act, ls_init_value):
    v = make_tower(act=act, ls_init_value=ls_init_value)
    if ls_init_value is not None:
        with torch.no_grad():
            for b in v.transformer.resblocks:
                b.ls_1.gamma.uniform_(0.2, 2.0)
                b.ls_2.gamma.uniform_(0.2, 2.0)
    x = torch.randn(3, 17, 64)
    for blk in v.transformer.resblocks:
        with torch.no_grad():
            ref = blk(x)
        got = FloatBlockParams.from_block(blk).forward(x)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act_quant", ("per_token", "per_tensor_static", "paper"))
@pytest.mark.parametrize("smooth_alpha", (None, 0.5))
def test_quant_block_close_to_float(act_quant, smooth_alpha):
    if act_quant == "paper" and smooth_alpha is not None:
        pytest.skip("the paper's scheme has no smoothing")
    v = make_tower()
    arch = arch_from_visual(v)
    cfg = QuantConfig(act_quant=act_quant, smooth_alpha=smooth_alpha)
    params = [FloatBlockParams.from_block(b) for b in v.transformer.resblocks]
    stats = collect_stats(v, params, torch.randn(8, 3, 32, 32), keep_rows=False) if cfg.needs_calibration else None
    x = torch.randn(4, 17, 64)
    for i, p in enumerate(params):
        qb = quantize_block(p, cfg, arch, None if stats is None else stats[i])
        ref = p.forward(x)
        got = qb(x, TORCH_OPS)
        assert got.shape == ref.shape and got.dtype == torch.float32
        # The residual carries x itself; judge the block's update, which is what got quantized.
        cos = cosine((got - x).flatten(1), (ref - x).flatten(1))
        assert cos.min() > 0.99, f"block {i}: update cosine {cos.min():.4f}"


@pytest.mark.parametrize("alpha", (0.0, 0.5, 0.8))
def test_smoothing_preserves_the_float_function(alpha):
    """Folding SmoothQuant factors into LayerNorms, V rows and the c_proj input must not change the FP32 block."""
    v = make_tower()
    params = [FloatBlockParams.from_block(b) for b in v.transformer.resblocks]
    stats = collect_stats(v, params, torch.randn(8, 3, 32, 32), keep_rows=False)
    x = torch.randn(4, 17, 64)
    for p, st in zip(params, stats):
        folded, factors = smooth_block(p, st, alpha)
        assert set(factors) == {"in_proj", "out_proj", "c_fc", "c_proj"}
        if alpha > 0:
            assert any(not torch.allclose(f, torch.ones_like(f)) for f in factors.values()), "smoothing was a no-op"
        torch.testing.assert_close(folded.forward(x), p.forward(x), atol=1e-4, rtol=1e-4)


def test_calibration_rejects_bad_images():
    v = make_tower()
    params = [FloatBlockParams.from_block(b) for b in v.transformer.resblocks]
    with pytest.raises(ValueError, match="float tensor"):
        collect_stats(v, params, torch.zeros(2, 3, 32, 32, dtype=torch.uint8), keep_rows=False)
    with pytest.raises(ValueError, match="empty"):
        collect_stats(v, params, torch.zeros(0, 3, 32, 32), keep_rows=False)
    bad = torch.randn(2, 3, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        collect_stats(v, params, bad, keep_rows=False)
