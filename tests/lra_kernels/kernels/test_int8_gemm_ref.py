"""The INT8 GEMM reference: exact integer accumulation, epilogue order, the paper-baseline linear."""

import pytest
import torch
import torch.nn.functional as F

from conftest import K_SIZES, M_SIZES, N_SIZES
from lra_kernels.block import QuantLinear
from lra_kernels.kernels.int8_gemm import ACTIVATIONS, apply_activation, int8_gemm_ref, int_mm
from lra_kernels.quant import quantize_per_token_ref, quantize_weight_per_channel


@pytest.mark.parametrize("M", (0,) + M_SIZES)
@pytest.mark.parametrize("K", K_SIZES)
@pytest.mark.parametrize("N", N_SIZES)
def test_int_mm_exact(M, K, N):
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    b = torch.randint(-128, 128, (K, N), dtype=torch.int8)
    out = int_mm(a, b)
    assert out.dtype == torch.int32 and out.shape == (M, N)
    torch.testing.assert_close(out, (a.long() @ b.long()).int(), atol=0, rtol=0)


def test_int_mm_extreme_values_do_not_overflow():
    K = 3072  # ViT-B MLP width: 3072 * 127 * 128 fits int32 comfortably
    a = torch.full((3, K), -127, dtype=torch.int8)
    b = torch.full((K, 5), -128, dtype=torch.int8)
    assert (int_mm(a, b) == K * 127 * 128).all()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("M", M_SIZES)
def test_epilogue_matches_float_math(activation, M):
    K, N = 72, 40
    q = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    x_scale, w_scale, bias = torch.rand(M) * 0.1, torch.rand(N) * 0.01, torch.randn(N)
    residual = torch.randn(M, N)
    y = int8_gemm_ref(q, w, x_scale, w_scale, bias, activation, residual)
    expected = (q.double() @ w.double().t()) * x_scale.double()[:, None] * w_scale.double()[None, :] + bias.double()
    expected = apply_activation(expected, activation) + residual.double()
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("out_dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_out_dtype(out_dtype):
    q = torch.randint(-127, 128, (13, 24), dtype=torch.int8)
    w = torch.randint(-127, 128, (8, 24), dtype=torch.int8)
    y = int8_gemm_ref(q, w, torch.rand(13), torch.rand(8) * 0.01, out_dtype=out_dtype)
    assert y.dtype == out_dtype


def test_quantized_linear_error_is_bounded_by_its_steps():
    M, K, N = 50, 136, 96
    x, w, b = torch.randn(M, K), torch.randn(N, K) / K**0.5, torch.randn(N)
    lin = QuantLinear.from_float(w, b, "per_token")
    from lra_kernels.backend import TORCH_OPS

    y = lin(x, TORCH_OPS)
    ref = F.linear(x, w, b)
    # |error| <= sum_k |x||dw| + |dx||w| + |dx||dw| with |dx| <= x_scale/2, |dw| <= w_scale/2
    _, xs = quantize_per_token_ref(x)
    _, ws = quantize_weight_per_channel(w)
    bound = (x.abs() @ (ws[:, None].expand(N, K) / 2).t()) + (xs[:, None] / 2) * (w.abs().sum(1) + K * ws / 2)[None, :]
    assert ((y - ref).abs() <= bound * 1.001 + 1e-6).all()


def test_paper_linear_matches_torch_ao_quantize_dynamic():
    qmod = pytest.importorskip("torch.ao.quantization")
    torch.backends.quantized.engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "x86"
    lin = torch.nn.Linear(96, 40)
    ref_mod = qmod.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    x = torch.randn(3, 17, 96) * 2 + 0.3  # [B, T, D] as open_clip's MLP sees it: one scale for all of it
    ours = QuantLinear.from_float(lin.weight, lin.bias, "paper")
    from lra_kernels.backend import TORCH_OPS

    y = ours(x.reshape(-1, 96), TORCH_OPS).view(3, 17, 40)
    y_ref = ref_mod(x)
    # Same integer codes and accumulation as fbgemm; only the fp32 epilogue's rounding may differ.
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert (y_ref - lin(x)).abs().max() > 1e-3, "the check is void if quantization were lossless here"
