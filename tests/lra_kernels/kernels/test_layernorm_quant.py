"""Triton LayerNorm + per-token quantize and the quantize-only variants against their references."""

import pytest
import torch
import torch.nn.functional as F

from conftest import K_SIZES, M_SIZES
from kernel_checks import DEVICE, assert_within_torch_error, gpu, ignore_fp_warnings, poisoned
from lra_kernels.kernels.layernorm_quant import (
    layernorm_quant,
    layernorm_quant_ref,
    quantize_per_tensor,
    quantize_per_token,
)
from lra_kernels.quant import AMAX_FLOOR, quantize_per_tensor_ref, quantize_per_token_ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _x(M, K, dtype=torch.float32, outliers=True):
    x = torch.randn(M, K) * 2 + 0.3
    if outliers and K >= 8:
        x[:, K // 3] *= 40  # an outlier channel, as in trained CLIP
    return x.to(dtype).to(DEVICE)


def _poisoned_out(shape):
    return poisoned(shape, torch.int8), poisoned(shape[:-1], torch.float32)


def _assert_exact(got, ref):
    (q, s), (qr, sr) = got, ref
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    torch.testing.assert_close(q, qr, atol=0, rtol=0)
    torch.testing.assert_close(s, sr, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("M", M_SIZES)
@pytest.mark.parametrize("K", K_SIZES)
@pytest.mark.parametrize("smooth", (False, True))
def test_quantize_per_token_is_bit_exact(M, K, smooth):
    x = _x(M, K)
    smooth_inv = (torch.rand(K) + 0.5).to(DEVICE) if smooth else None
    out = _poisoned_out((M, K))
    got = quantize_per_token(x, smooth_inv, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    _assert_exact(got, quantize_per_token_ref(x, smooth_inv))


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_token_half_inputs(dtype):
    x = _x(50, 72, dtype)
    _assert_exact(quantize_per_token(x), quantize_per_token_ref(x))


@pytest.mark.parametrize("M", M_SIZES)
@pytest.mark.parametrize("K", (8, 136))
@pytest.mark.parametrize("smooth", (False, True))
def test_quantize_per_tensor_is_bit_exact(M, K, smooth):
    x = _x(M, K)
    x[:, 0], x[:, 1] = 60.0, -1e6  # beyond 127 * x_scale: saturate
    x_scale = torch.tensor(0.37, device=DEVICE)
    smooth_inv = (torch.rand(K) + 0.5).to(DEVICE) if smooth else None
    got = quantize_per_tensor(x, x_scale, smooth_inv, out=_poisoned_out((M, K)))
    _assert_exact(got, quantize_per_tensor_ref(x, x_scale, smooth_inv))
    assert (got[0] == 127).any() and (got[0] == -127).any()  # saturation was exercised


def test_round_half_to_even_and_near_ties():
    halves = torch.arange(-300, 301, dtype=torch.float32) / 2  # every tie in [-150, 150]
    near = torch.cat([torch.nextafter(halves, halves + 1), torch.nextafter(halves, halves - 1)])
    special = torch.tensor([0.49999997, -0.49999997, 0.5, -0.5, 1.5, 2.5, 126.5, -126.5, 127.49998, 1e30, -1e30,
                            0.0, -0.0])
    x = torch.cat([halves, near, special]).view(1, -1).to(DEVICE)
    one = torch.tensor(1.0, device=DEVICE)
    _assert_exact(quantize_per_tensor(x, one), quantize_per_tensor_ref(x, one))
    q = quantize_per_tensor(x, one)[0].cpu().view(-1)
    assert q[300 + 1].item() == 0 and q[300 + 3].item() == 2 and q[300 + 5].item() == 2  # 0.5->0, 1.5->2, 2.5->2


def test_amax_floor_for_zero_and_tiny_rows():
    x = torch.randn(5, 24)
    x[0] = 0
    x[1] *= 1e-20
    x[2, :] = 0
    x[2, 7] = 3e-13  # below AMAX_FLOOR: scale stays at the floor
    x = x.to(DEVICE)
    q, s = quantize_per_token(x)
    _assert_exact((q, s), quantize_per_token_ref(x))
    assert s[0].item() == pytest.approx(AMAX_FLOOR / 127)


@ignore_fp_warnings
@pytest.mark.parametrize("static", (False, True))
def test_non_finite_rows_stay_local(static):
    x = _x(13, 72)
    x[2, 5] = float("nan")
    x[4, 0] = float("inf")
    x[6, 71] = float("-inf")
    x[8, :] = float("nan")
    x_scale = torch.tensor(0.05, device=DEVICE)
    if static:
        got, ref = quantize_per_tensor(x, x_scale), quantize_per_tensor_ref(x, x_scale)
    else:
        got, ref = quantize_per_token(x), quantize_per_token_ref(x)
    _assert_exact(got, ref)
    bad = torch.tensor([2, 4, 6, 8])
    good = torch.tensor([i for i in range(13) if i not in bad.tolist()])
    assert not torch.isfinite(got[1][bad.to(DEVICE)]).any()
    assert torch.isfinite(got[1][good.to(DEVICE)]).all()
    if not static:  # per-token: the bad rows' codes are all zero (finite ones of an Inf row round to 0)
        assert (got[0][bad.to(DEVICE)] == 0).all()


def _near_tie(x, weight, bias, eps, tol=2e-3):
    """Positions where the reference's pre-rounding value lies within ``tol`` of a rounding boundary."""
    h = F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)
    amax = h.abs().amax(-1).clamp_min(AMAX_FLOOR)
    v = (h * (127 / amax)[:, None]).abs()
    return ((v - v.floor() - 0.5).abs() < tol) | ((v - 127.5).abs() < tol)


@pytest.mark.parametrize("M", M_SIZES)
@pytest.mark.parametrize("K", K_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_quant_matches_reference(M, K, dtype):
    x = _x(M, K, dtype)
    weight, bias = (torch.randn(K) * 0.5 + 1).to(DEVICE), (torch.randn(K) * 0.1).to(DEVICE)
    out = _poisoned_out((M, K))
    q, s = layernorm_quant(x, weight, bias, 1e-5, out=out)
    qr, sr = layernorm_quant_ref(x, weight, bias, 1e-5)
    # The LayerNorm rounds differently from F.layer_norm by an ulp or so: scales within 2x torch's
    # own error, codes exact except where the value sits on a rounding boundary (then off by one).
    s64 = F.layer_norm(x.double(), (K,), weight.double(), bias.double(), 1e-5).abs().amax(-1) / 127
    assert_within_torch_error(s, sr, s64, atol=1e-7 * s64.abs().max().item(), name="x_scale")
    diff = (q.int() - qr.int()).abs()
    assert diff.max().item() <= 1
    assert (diff == 0)[~_near_tie(x, weight, bias, 1e-5)].all()


def test_layernorm_quant_without_affine_and_3d_input():
    x = _x(6, 50, outliers=False).view(2, 3, 50)
    q, s = layernorm_quant(x, None, None, 1e-6)
    qr, sr = layernorm_quant_ref(x.view(6, 50), None, None, 1e-6)
    assert q.shape == (2, 3, 50) and s.shape == (2, 3)
    assert (q.view(6, 50).int() - qr.int()).abs().max().item() <= 1
    torch.testing.assert_close(s.view(6), sr, atol=0, rtol=1e-6)


@ignore_fp_warnings
def test_layernorm_quant_non_finite_rows_stay_local():
    x = _x(13, 24)
    x[3, 3] = float("nan")
    x[7, 0] = float("inf")
    w, b = torch.ones(24, device=DEVICE), torch.zeros(24, device=DEVICE)
    q, s = layernorm_quant(x, w, b, 1e-5)
    qr, sr = layernorm_quant_ref(x, w, b, 1e-5)
    assert torch.isnan(s[[3, 7]]).all() and (q[[3, 7]] == 0).all()
    keep = [i for i in range(13) if i not in (3, 7)]
    torch.testing.assert_close(s[keep], sr[keep], atol=0, rtol=1e-6)


def test_strided_rows_and_row_independence():
    base = _x(50, 144)
    x = base[:, ::2]  # last-dim stride 2
    _assert_exact(quantize_per_token(x), quantize_per_token_ref(x))
    # a row's codes do not depend on the batch it shares
    full = quantize_per_token(base)
    for i in (0, 13, 49):
        alone = quantize_per_token(base[i : i + 1])
        assert torch.equal(alone[0], full[0][i : i + 1]) and torch.equal(alone[1], full[1][i : i + 1])
    w, b = torch.randn(144, device=DEVICE), torch.randn(144, device=DEVICE)
    full = layernorm_quant(base, w, b, 1e-5)
    alone = layernorm_quant(base[13:14], w, b, 1e-5)
    assert torch.equal(alone[0], full[0][13:14]) and torch.equal(alone[1], full[1][13:14])


def test_empty_batch():
    q, s = quantize_per_token(torch.randn(0, 24, device=DEVICE))
    assert q.shape == (0, 24) and s.shape == (0,)


def test_launchers_reject_bad_inputs():
    x = _x(4, 24)
    with pytest.raises(TypeError, match=r"x\[M, K\] of dtype float32/float16/bfloat16"):
        quantize_per_token(x.to(torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_per_token([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"smooth_inv of shape \[24\]"):
        quantize_per_token(x, torch.ones(23, device=DEVICE))
    with pytest.raises(TypeError, match=r"smooth_inv\[24\] of dtype float32"):
        quantize_per_token(x, torch.ones(24, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"weight of shape \[24\]"):
        layernorm_quant(x, torch.ones(8, device=DEVICE), None, 1e-5)
    with pytest.raises(ValueError, match="single calibrated x_scale"):
        quantize_per_tensor(x, torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="K >= 1"):
        quantize_per_token(torch.randn(3, 0, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        quantize_per_token(x, out=(torch.empty(4, 24, dtype=torch.int32, device=DEVICE), torch.empty(4, device=DEVICE)))
    with pytest.raises(ValueError, match="one device"):
        quantize_per_token(x, torch.ones(24, device="meta"))


def test_cpu_tensors_rejected_when_not_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        layernorm_quant(torch.randn(3, 8), None, None, 1e-5)
    with pytest.raises(ValueError, match="CUDA tensors"):
        quantize_per_tensor(torch.randn(3, 8), torch.tensor(1.0))


@gpu
def test_vit_b_shapes_on_gpu():
    M, K = 256 * 50, 768
    x = torch.randn(M, K, device="cuda") * 2
    x[:, 100] *= 50
    _assert_exact(quantize_per_token(x), quantize_per_token_ref(x))
    h = torch.randn(M, 3072, device="cuda", dtype=torch.float16)
    _assert_exact(quantize_per_token(h), quantize_per_token_ref(h))
    w, b = torch.randn(K, device="cuda"), torch.randn(K, device="cuda")
    q, s = layernorm_quant(x, w, b, 1e-5)
    qr, sr = layernorm_quant_ref(x, w, b, 1e-5)
    torch.testing.assert_close(s, sr, atol=0, rtol=1e-6)
    assert (q.int() - qr.int()).abs().max().item() <= 1
    assert (q != qr).float().mean().item() < 1e-3
