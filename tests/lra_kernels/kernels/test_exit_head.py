"""Triton exit head (patch mean / CLS -> LayerNorm -> proj -> L2 -> cosine logits) against its reference."""

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import DEVICE, assert_within_torch_error, gpu, ignore_fp_warnings, poisoned
from lra_kernels.kernels.exit_head import exit_head, exit_head_ref

# (B, T, D, E, C): awkward widths, one patch token, many classes spanning several class tiles
SHAPES = ((1, 2, 8, 8, 1), (13, 17, 24, 40, 10), (3, 50, 72, 32, 1000), (2, 197, 136, 24, 7))


def _inputs(B, T, D, E, C, dtype=torch.float32, proj=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g) + torch.randn(D, generator=g) * 3  # channel offsets
    ln_w = torch.randn(D, generator=g) * 0.3 + 1
    ln_b = torch.randn(D, generator=g) * 0.1
    p = torch.randn(D, E, generator=g) / D**0.5 if proj else None
    text = F.normalize(torch.randn(C, E if proj else D, generator=g), dim=-1)
    h = h.to(dtype)
    to = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    return to(h), to(ln_w), to(ln_b), to(p), to(text)


def _exact(h, ln_w, ln_b, eps, p, text, logit_scale, pool):
    """The head's math in float64."""
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    m = h[:, 1:].double().mean(1) if pool == "patch_mean" else h[:, 0].double()
    n = F.layer_norm(m, (m.shape[-1],), d(ln_w), d(ln_b), eps)
    e = n @ d(p) if p is not None else n
    z = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return logit_scale * (z @ d(text).t()), z


def _check(args, pool, logit_scale=100.0):
    h, ln_w, ln_b, p, text = args
    B, C, E = h.shape[0], text.shape[0], text.shape[1]
    out = (poisoned((B, C), torch.float32), poisoned((B, E), torch.float32))
    logits, z = exit_head(h, ln_w, ln_b, 1e-5, p, text, logit_scale, pool, out=out)
    assert logits is out[0] and z is out[1]
    ref_l, ref_z = exit_head_ref(h, ln_w, ln_b, 1e-5, p, text, logit_scale, pool)
    ex_l, ex_z = _exact(h, ln_w, ln_b, 1e-5, p, text, logit_scale, pool)
    assert_within_torch_error(z, ref_z, ex_z, atol=1e-7, name="z")
    assert_within_torch_error(logits, ref_l, ex_l, atol=1e-7 * logit_scale, name="logits")
    return logits, z


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pool", ("patch_mean", "cls"))
def test_matches_reference(shape, pool):
    _check(_inputs(*shape), pool)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_precision_tokens(dtype):
    _check(_inputs(5, 50, 72, 32, 10, dtype=dtype), "patch_mean")


def test_without_projection_and_affine():
    h, _, _, _, text = _inputs(4, 17, 24, 24, 9, proj=False)
    _check((h, None, None, None, text), "patch_mean")


def test_ragged_projection_tiles():
    # D small enough that the projection runs in several column slices with a ragged last one
    _check(_inputs(3, 9, 8, 1100, 3), "patch_mean")


def test_rows_do_not_depend_on_the_batch():
    # 37 samples: three programs of 16; each row alone, at another place in its tile, in a permuted
    # batch and in a strided view (compaction, x[~leave]) gives the same bits
    h, ln_w, ln_b, p, text = _inputs(37, 17, 24, 40, 10)
    logits, z = exit_head(h, ln_w, ln_b, 1e-5, p, text, 100.0)
    for i in (0, 7, 15, 16, 30, 36):
        li, zi = exit_head(h[i : i + 1], ln_w, ln_b, 1e-5, p, text, 100.0)
        assert torch.equal(li, logits[i : i + 1]) and torch.equal(zi, z[i : i + 1]), i
    perm = torch.randperm(37)
    lp, zp = exit_head(h[perm], ln_w, ln_b, 1e-5, p, text, 100.0)
    assert torch.equal(lp, logits[perm]) and torch.equal(zp, z[perm])
    sub = h[::3]
    li, zi = exit_head(sub, ln_w, ln_b, 1e-5, p, text, 100.0)
    assert torch.equal(li, logits[::3]) and torch.equal(zi, z[::3])


def test_one_program_per_tile_of_samples(monkeypatch):
    # proj and text are read once per BLOCK_B samples, not once per sample
    import lra_kernels.kernels.exit_head as mod

    kernel, grids = mod._exit_head_kernel, []

    class Recording:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(mod, "_exit_head_kernel", Recording())
    for B in (1, 16, 17, 256):
        _check(_inputs(B, 5, 24, 16, 3), "patch_mean")
    assert mod.BLOCK_B >= 16 and [g[0] for g in grids] == [1, 1, 2, 256 // mod.BLOCK_B]


@ignore_fp_warnings
def test_non_finite_rows_stay_local():
    h, ln_w, ln_b, p, text = _inputs(6, 17, 24, 40, 10)
    h[1, 5, 3] = float("nan")
    h[4, 2, 0] = float("inf")
    logits, z = exit_head(h, ln_w, ln_b, 1e-5, p, text, 100.0)
    assert torch.isnan(logits[[1, 4]]).all() and torch.isnan(z[[1, 4]]).all()
    keep = [0, 2, 3, 5]
    ref_l, ref_z = exit_head_ref(h[keep], ln_w, ln_b, 1e-5, p, text, 100.0)
    torch.testing.assert_close(logits[keep], ref_l, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(z[keep], ref_z, atol=1e-6, rtol=1e-5)


def test_class_token_is_ignored_by_patch_mean():
    h, ln_w, ln_b, p, text = _inputs(2, 9, 24, 16, 5)
    a = exit_head(h, ln_w, ln_b, 1e-5, p, text, 50.0)
    h2 = h.clone()
    h2[:, 0] = 1e4
    b = exit_head(h2, ln_w, ln_b, 1e-5, p, text, 50.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty_batch():
    h, ln_w, ln_b, p, text = _inputs(1, 5, 8, 8, 3)
    logits, z = exit_head(h[:0], ln_w, ln_b, 1e-5, p, text, 100.0)
    assert logits.shape == (0, 3) and z.shape == (0, 8)


def test_launcher_rejects_bad_inputs():
    h, ln_w, ln_b, p, text = _inputs(2, 9, 24, 16, 5)
    with pytest.raises(ValueError, match="pool must be one of"):
        exit_head(h, ln_w, ln_b, 1e-5, p, text, 100.0, "max")
    with pytest.raises(ValueError, match=r"h\[B, T, D\] \(3-D\)"):
        exit_head(h[0], ln_w, ln_b, 1e-5, p, text, 100.0)
    with pytest.raises(TypeError, match=r"h\[B, T, D\] of dtype"):
        exit_head(h.to(torch.int32), ln_w, ln_b, 1e-5, p, text, 100.0)
    with pytest.raises(ValueError, match=r"ln_weight of shape \[D=24\]"):
        exit_head(h, ln_w[:3], ln_b, 1e-5, p, text, 100.0)
    with pytest.raises(ValueError, match=r"proj of shape \[D=24, E\]"):
        exit_head(h, ln_w, ln_b, 1e-5, p[:5], text, 100.0)
    with pytest.raises(ValueError, match=r"text of shape \[C, E=16\]"):
        exit_head(h, ln_w, ln_b, 1e-5, p, text[:, :4], 100.0)
    with pytest.raises(TypeError, match=r"text\[C, E=16\] of dtype float32"):
        exit_head(h, ln_w, ln_b, 1e-5, p, text.half(), 100.0)
    with pytest.raises(ValueError, match="T >= 2"):
        exit_head(h[:, :1], ln_w, ln_b, 1e-5, p, text, 100.0)
    with pytest.raises(ValueError, match="one device"):
        exit_head(h, ln_w, ln_b, 1e-5, p.to("meta"), text, 100.0)


def test_cpu_tensors_rejected_when_not_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        exit_head(torch.randn(1, 3, 8), None, None, 1e-5, None, torch.randn(2, 8), 100.0)


@gpu
@pytest.mark.parametrize("B", (1, 256))
def test_vit_b_32_head_on_gpu(B):
    _check(_inputs(B, 50, 768, 512, 1000), "patch_mean")
    _check(_inputs(B, 50, 768, 512, 1000), "cls")
