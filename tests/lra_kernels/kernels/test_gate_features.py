"""Triton gate features (softmax confidence, top-2 margin, spatial variance) against the reference."""

import pytest
import torch

from kernel_checks import DEVICE, assert_within_torch_error, gpu, ignore_fp_warnings, poisoned
from lra_kernels.kernels.gate_features import gate_features, gate_features_ref

# (B, C, T, D): one class, two classes, more classes than one logit slice (1024), awkward widths
SHAPES = ((1, 1, 2, 8), (13, 2, 17, 24), (3, 1000, 50, 72), (2, 2500, 197, 136), (50, 10, 5, 8))


def _inputs(B, C, T, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, generator=g) * 4
    h = torch.randn(B, T, D, generator=g) * 0.7 + torch.randn(D, generator=g) * 30  # large channel means
    return logits.to(DEVICE), h.to(dtype).to(DEVICE)


def _exact(logits, h):
    p = torch.softmax(logits.double(), dim=-1)
    top = p.topk(min(2, p.shape[-1]), dim=-1).values
    conf = top[:, 0]
    margin = top[:, 0] - top[:, 1] if p.shape[-1] >= 2 else torch.ones_like(conf)
    svar = h[:, 1:].double().var(dim=1, unbiased=False).mean(-1)
    return torch.stack([conf, margin, svar], -1)


def _check(logits, h):
    out = gate_features(logits, h, out=poisoned((logits.shape[0], 3), torch.float32))
    ref = gate_features_ref(logits, h)
    exact = _exact(logits, h)
    for i, name in enumerate(("confidence", "margin", "spatial_variance")):
        assert_within_torch_error(out[:, i], ref[:, i], exact[:, i], atol=1e-7 * (1 + exact[:, i].abs().max().item()),
                                  name=name)
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape):
    _check(*_inputs(*shape))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_precision_tokens(dtype):
    _check(*_inputs(4, 10, 50, 72, dtype=dtype))


def test_single_class_and_ties():
    logits, h = _inputs(3, 1, 9, 8)
    out = gate_features(logits, h)
    assert (out[:, 0] == 1).all() and (out[:, 1] == 1).all()
    logits = torch.tensor([[2.0, 5.0, 5.0, 1.0], [7.0, 7.0, 7.0, 7.0], [0.0, -1e30, 3.0, 3.0 - 1e-6]], device=DEVICE)
    _, h = _inputs(3, 4, 9, 8)
    out = _check(logits, h)
    assert out[0, 1] == 0 and out[1, 1] == 0 and out[1, 0] == pytest.approx(0.25)
    # the top-1 class sits in the second logit slice (index > 1024)
    logits, h = _inputs(2, 2000, 5, 8)
    logits[:, 1500] = 40
    _check(logits, h)


def test_variance_is_accurate_under_large_channel_means():
    # Channel means 1e4 times the spread (condition number ~1e8): a one-pass fp32 sum of squares
    # would get the variance wrong by O(1); the shifted sums keep it to a few fp32 ulps.
    logits, h = _inputs(2, 5, 197, 24)
    h = h * 0 + 1e4 + torch.randn_like(h)
    out = gate_features(logits, h)
    exact = _exact(logits, h)[:, 2]
    ref = gate_features_ref(logits, h)[:, 2]
    torch_err = (ref.double() - exact).abs().max().item()
    err = (out[:, 2].double() - exact).abs().max().item()
    assert err <= max(2 * torch_err, 8 * torch.finfo(torch.float32).eps * exact.abs().max().item())


def test_rows_do_not_depend_on_the_batch():
    logits, h = _inputs(13, 10, 17, 24)
    full = gate_features(logits, h)
    for i in (0, 6, 12):
        assert torch.equal(gate_features(logits[i : i + 1], h[i : i + 1]), full[i : i + 1])
    assert torch.equal(gate_features(logits[::2], h[::2]), full[::2])  # strided (compacted) batch


@ignore_fp_warnings
def test_non_finite_rows_stay_local():
    logits, h = _inputs(7, 10, 9, 8)
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    logits[3, 9] = float("-inf")
    h[4, 5, 2] = float("nan")
    h[5, 1, 0] = float("-inf")
    h[6, 0, 0] = float("nan")  # the class token is not part of any feature
    out = gate_features(logits, h)
    ref = gate_features_ref(logits, h)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5, equal_nan=True)
    assert torch.isnan(out[1:6]).all() and torch.isfinite(out[[0, 6]]).all()


def test_empty_batch():
    logits, h = _inputs(1, 4, 5, 8)
    assert gate_features(logits[:0], h[:0]).shape == (0, 3)


def test_launcher_rejects_bad_inputs():
    logits, h = _inputs(3, 10, 9, 8)
    with pytest.raises(ValueError, match=r"h of shape \[B=3, T, D\]"):
        gate_features(logits, h[:2])
    with pytest.raises(ValueError, match=r"logits\[B, C\] \(2-D\)"):
        gate_features(logits[0], h)
    with pytest.raises(TypeError, match=r"h\[B, T, D\] of dtype"):
        gate_features(logits, h.to(torch.int64))
    with pytest.raises(ValueError, match="C >= 1"):
        gate_features(logits[:, :0], h)
    with pytest.raises(ValueError, match="T >= 2"):
        gate_features(logits, h[:, :1])
    with pytest.raises(ValueError, match="out of shape"):
        gate_features(logits, h, out=torch.empty(3, 2, device=DEVICE))
    with pytest.raises(ValueError, match="one device"):
        gate_features(logits, h.to("meta"))


def test_cpu_tensors_rejected_when_not_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        gate_features(torch.randn(2, 3), torch.randn(2, 4, 8))


@gpu
@pytest.mark.parametrize("B", (1, 256))
def test_vit_b_32_shapes_on_gpu(B):
    _check(*_inputs(B, 1000, 50, 768))
    _check(*_inputs(B, 21843, 197, 1024))
