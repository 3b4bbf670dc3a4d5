"""Quantize / dequantize primitives: exact integer checks, edge rows, the paper-baseline emulation."""

import pytest
import torch

from conftest import K_SIZES, M_SIZES
from lra_kernels.quant import (
    AMAX_FLOOR,
    choose_qparams_dynamic,
    dequantize,
    quantize_paper_dynamic_ref,
    quantize_per_tensor_ref,
    quantize_per_token_ref,
    quantize_weight_paper,
    quantize_weight_per_channel,
    smooth_factors,
)


def test_per_token_hand_values():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [-2.54, 1.27, 0.01, 0.03]])
    q, s = quantize_per_token_ref(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    torch.testing.assert_close(s, torch.tensor([1 / 127, AMAX_FLOOR / 127, 2.54 / 127]), atol=0, rtol=1e-6)
    # 1.27 * 127 / 2.54 = 63.5 -> 64 (half to even); 0.01 * 50 = 0.5 -> 0; 0.03 * 50 = 1.5 -> 2
    expected = torch.tensor([[127, -64, 32, 0], [0, 0, 0, 0], [-127, 64, 0, 2]], dtype=torch.int8)
    torch.testing.assert_close(q, expected, atol=0, rtol=0)


def test_round_half_to_even_ties():
    # amax = 127 makes the multiplier exactly 1, so the codes are round(x) itself.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]])
    q, _ = quantize_per_token_ref(x)
    torch.testing.assert_close(q, torch.tensor([[127, 0, 2, 2, 0, -2, -2, 4]], dtype=torch.int8), atol=0, rtol=0)


@pytest.mark.parametrize("M", M_SIZES)
@pytest.mark.parametrize("K", K_SIZES)
def test_per_token_matches_formula_and_bounds(M, K):
    x = torch.randn(M, K) * torch.rand(M, 1) * 10
    q, s = quantize_per_token_ref(x)
    amax = x.abs().amax(-1)
    expected = torch.round(x * (127.0 / amax)[:, None]).clamp(-127, 127).to(torch.int8)
    torch.testing.assert_close(q, expected, atol=0, rtol=0)
    assert (q.abs().amax(-1) == 127).all(), "the largest element of each row must use the full range"
    err = (dequantize(q, s) - x).abs()
    assert (err <= s[:, None] * 0.5 * (1 + 1e-5)).all(), "round-to-nearest error exceeds half a step"


def test_per_token_rows_are_independent_and_nonfinite_rows_stay_local():
    x = torch.randn(5, 33)
    q_ref, s_ref = quantize_per_token_ref(x)
    bad = x.clone()
    bad[1, 3] = float("nan")
    bad[3, 0] = float("inf")
    q, s = quantize_per_token_ref(bad)
    for r in (0, 2, 4):
        assert torch.equal(q[r], q_ref[r]) and torch.equal(s[r], s_ref[r])
    assert torch.isnan(s[1]) and not torch.isfinite(s[3])
    assert (q[1] == 0).all(), "a NaN row must not produce arbitrary codes"


def test_per_token_smooth_inv_is_applied_first():
    x = torch.randn(7, 16)
    smooth_inv = torch.rand(16) + 0.5
    q1, s1 = quantize_per_token_ref(x, smooth_inv)
    q2, s2 = quantize_per_token_ref(x * smooth_inv)
    assert torch.equal(q1, q2) and torch.equal(s1, s2)


def test_per_tensor_static_saturates_and_flags_nonfinite_rows():
    x = torch.tensor([[0.5, -1.0, 3.0], [0.1, 0.2, float("nan")]])
    q, s = quantize_per_tensor_ref(x, torch.tensor(1.0 / 127))
    torch.testing.assert_close(q[0], torch.tensor([64, -127, 127], dtype=torch.int8), atol=0, rtol=0)
    assert s[0] == pytest.approx(1.0 / 127) and torch.isnan(s[1])


@pytest.mark.parametrize("K", K_SIZES)
def test_weight_per_channel_exact(K):
    w = torch.randn(12, K)
    w[3] = 0.0  # an all-zero output channel
    wq, ws = quantize_weight_per_channel(w)
    assert wq.dtype == torch.int8 and ws.shape == (12,)
    assert ws[3] == 0 and (wq[3] == 0).all()
    expected = torch.round(w / torch.where(ws > 0, ws, 1)[:, None]).clamp(-127, 127).to(torch.int8)
    torch.testing.assert_close(wq, expected, atol=0, rtol=0)
    assert (wq.abs().amax(1)[ws > 0] == 127).all()
    assert ((dequantize(wq, ws) - w).abs() <= ws[:, None] / 2 * (1 + 1e-5)).all()


def test_weight_per_channel_rejects_bad_input():
    with pytest.raises(ValueError, match="float weight"):
        quantize_weight_per_channel(torch.ones(3, dtype=torch.int32))


def test_choose_qparams_matches_aten():
    for _ in range(20):
        x = torch.randn(64, 48) * torch.rand(()) * 5 + torch.randn(()) * 2
        scale, zp = choose_qparams_dynamic(x)
        ref_scale, ref_zp = torch._choose_qparams_per_tensor(x, True)  # reduce_range=True, as fbgemm's dynamic linear
        assert float(scale) == pytest.approx(ref_scale, rel=1e-6)
        assert int(zp) == ref_zp


def test_paper_dynamic_codes_fit_int8_and_dequantize():
    x = torch.randn(40, 24) * 3 + 1
    qc, s = quantize_paper_dynamic_ref(x)
    assert qc.dtype == torch.int8 and s.shape == (40,)
    assert (s == s[0]).all(), "the paper's scheme has one scale for the whole tensor"
    err = (qc.float() * s[:, None] - x).abs().max()
    assert err <= s[0] * 0.5 * (1 + 1e-4)


def test_paper_weight_quant_matches_torch_ao_observer():
    obs_mod = pytest.importorskip("torch.ao.quantization")
    w = torch.randn(32, 20)
    wq, ws = quantize_weight_paper(w)
    obs = obs_mod.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    obs(w)
    scale, zp = obs.calculate_qparams()
    assert int(zp) == 0 and float(ws[0]) == pytest.approx(float(scale), rel=1e-6)
    ref = torch.quantize_per_tensor(w, float(scale), 0, torch.qint8).int_repr()
    torch.testing.assert_close(wq, ref, atol=0, rtol=0)


def test_smooth_factors():
    amax = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([[1.0, 2.0, 1.0], [0.5, -4.0, 1.0]])
    s = smooth_factors(amax, w, 0.5)
    torch.testing.assert_close(s[:2], torch.tensor([4.0**0.5 / 1.0**0.5, 1.0 / 4.0**0.5]))
    assert s[2] > 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        smooth_factors(amax, w, 1.5)
