"""Triton INT8 GEMM (int32 accumulation, fused dequant/bias/activation/residual) against its reference.

Both kernels run: the tiled one, and the persistent TMA one wherever the operands allow TMA (K and the
row strides multiples of 16 bytes); under the interpreter the launcher picks the persistent kernel
whenever it applies, so the (K, N) table holds shapes of both kinds.
"""

import pytest
import torch

from conftest import M_SIZES
from kernel_checks import DEVICE, assert_within_torch_error, gpu, ignore_fp_warnings, poisoned
from lra_kernels.kernels.int8_gemm import (
    ACTIVATIONS,
    apply_activation,
    gpu_configs,
    int8_gemm,
    int8_gemm_ref,
    weight_layout,
)
from lra_kernels.kernels.int8_gemm_persistent import tma_compatible

# (K, N): not multiples of the blocks, K spanning several BLOCK_K slices with a ragged tail; the last
# two are TMA-compatible (K % 16 == 0), so the persistent kernel takes them
KN_SIZES = ((8, 8), (24, 40), (136, 96), (48, 40), (144, 200))
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _operands(M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    x_scale = torch.rand(M, generator=g) * 0.05 + 1e-3
    w_scale = torch.rand(N, generator=g) * 0.01 + 1e-4
    bias = torch.randn(N, generator=g)
    residual = torch.randn(M, N, generator=g)
    return [t.to(DEVICE) for t in (q, w, x_scale, w_scale, bias, residual)]


def _exact(q, w, x_scale, w_scale, bias, activation, residual):
    acc = q.double() @ w.double().t()
    y = acc * x_scale.double()[:, None] * w_scale.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    y = apply_activation(y, activation)
    return y + residual.double() if residual is not None else y


@ignore_fp_warnings
@pytest.mark.parametrize("M", M_SIZES)
@pytest.mark.parametrize("K,N", KN_SIZES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference(M, K, N, activation):
    q, w, x_scale, w_scale, bias, residual = _operands(M, K, N)
    use_residual = activation in ("none", "quick_gelu")  # as the block uses them (out_proj/c_proj, c_fc)
    residual = residual if use_residual else None
    out = poisoned((M, N), torch.float32)
    y = int8_gemm(q, w, x_scale, w_scale, bias, activation, residual, out=out)
    assert y is out
    ref = int8_gemm_ref(q, w, x_scale, w_scale, bias, activation, residual)
    exact = _exact(q, w, x_scale, w_scale, bias, activation, residual)
    assert_within_torch_error(y, ref, exact, atol=ATOL[torch.float32] * (1 + exact.abs().max().item()), name=activation)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("activation", ("none", "gelu"))
@pytest.mark.parametrize("residual_dtype", (torch.float32, torch.float16))
def test_out_dtypes(out_dtype, activation, residual_dtype):
    q, w, x_scale, w_scale, bias, residual = _operands(50, 72, 40)
    residual = residual.to(residual_dtype)
    y = int8_gemm(q, w, x_scale, w_scale, bias, activation, residual, out_dtype, out=poisoned((50, 40), out_dtype))
    assert y.dtype == out_dtype
    ref = int8_gemm_ref(q, w, x_scale, w_scale, bias, activation, residual, out_dtype)
    exact = _exact(q, w, x_scale, w_scale, bias, activation, residual)
    assert_within_torch_error(y, ref, exact, atol=ATOL[out_dtype] * exact.abs().max().item(), name=str(out_dtype))


def test_int32_accumulation_is_exact():
    # Unit scales and no epilogue: the fp32 output is the int32 sum itself (exact below 2**24).
    M, K, N = 13, 1000, 24
    q, w, *_ = _operands(M, K, N)
    ones_m, ones_n = torch.ones(M, device=DEVICE), torch.ones(N, device=DEVICE)
    y = int8_gemm(q, w, ones_m, ones_n, out=poisoned((M, N), torch.float32))
    acc = (q.cpu().long() @ w.cpu().long().t()).float()  # int64 matmul: CPU only
    torch.testing.assert_close(y.cpu(), acc, atol=0, rtol=0)
    # the extreme: every product 127 * 127 (K * 16129 > 2**24 rounds to fp32 like acc.float() does)
    qe = torch.full((3, 3072), -127, dtype=torch.int8, device=DEVICE)
    we = torch.full((5, 3072), -127, dtype=torch.int8, device=DEVICE)
    ye = int8_gemm(qe, we, torch.ones(3, device=DEVICE), torch.ones(5, device=DEVICE))
    assert (ye == float(3072 * 127 * 127)).all()


def test_epilogue_is_bitwise_reference_order():
    # With no activation, each output is (acc * x_scale) * w_scale + bias + residual in fp32: the
    # interpreter reproduces the reference bit for bit (on GPU an FMA may differ in the last bit).
    for K in (136, 144):  # the tiled kernel, the persistent one
        q, w, x_scale, w_scale, bias, residual = _operands(50, K, 96, seed=3)
        y = int8_gemm(q, w, x_scale, w_scale, bias, "none", residual)
        ref = int8_gemm_ref(q, w, x_scale, w_scale, bias, "none", residual)
        if DEVICE.type == "cpu":
            torch.testing.assert_close(y, ref, atol=0, rtol=0)
        else:
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-6)


def test_broadcast_per_tensor_scale_and_strided_operands():
    # The paper scheme hands a per-tensor scale expanded to [M] (stride 0).
    q, w, _, w_scale, bias, _ = _operands(50, 72, 40)
    x_scale = torch.tensor(0.0123, device=DEVICE).expand(50)
    assert x_scale.stride(0) == 0
    y = int8_gemm(q, w, x_scale, w_scale, bias)
    torch.testing.assert_close(y, int8_gemm_ref(q, w, x_scale, w_scale, bias), atol=1e-5, rtol=1e-6)
    # non-contiguous q (column slice) and a weight stored transposed ([K, N] memory, viewed [N, K])
    q_wide = torch.randint(-127, 128, (50, 144), dtype=torch.int8, device=DEVICE)
    w_kn = torch.randint(-127, 128, (72, 40), dtype=torch.int8, device=DEVICE)
    qs, ws_t = q_wide[:, ::2], w_kn.t()
    xs = torch.rand(50, device=DEVICE) * 0.01
    y = int8_gemm(qs, ws_t, xs, w_scale, None)
    torch.testing.assert_close(y, int8_gemm_ref(qs.contiguous(), ws_t.contiguous(), xs, w_scale), atol=1e-5, rtol=1e-6)


def test_rows_do_not_depend_on_the_batch():
    q, w, x_scale, w_scale, bias, residual = _operands(197, 136, 96)
    full = int8_gemm(q, w, x_scale, w_scale, bias, "gelu", residual)
    for i in (0, 63, 64, 196):
        alone = int8_gemm(q[i : i + 1], w, x_scale[i : i + 1], w_scale, bias, "gelu", residual[i : i + 1])
        assert torch.equal(alone, full[i : i + 1])


@ignore_fp_warnings
def test_non_finite_rows_stay_local():
    q, w, x_scale, w_scale, bias, residual = _operands(13, 24, 40)
    x_scale[3] = float("nan")
    x_scale[5] = float("inf")
    y = int8_gemm(q, w, x_scale, w_scale, bias, "quick_gelu", residual)
    assert not torch.isfinite(y[[3, 5]]).all(dim=1).any()
    keep = [i for i in range(13) if i not in (3, 5)]
    ref = int8_gemm_ref(q[keep], w, x_scale[keep], w_scale, bias, "quick_gelu", residual[keep])
    torch.testing.assert_close(y[keep], ref, atol=1e-5, rtol=1e-5)


# Every tile a GPU can compile: BLOCK_K >= 32 (8-bit dots), powers of two; ragged M, N, K under each.
TILES = (
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1},
    {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 2},
    {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8},
    {"kernel": "persistent", "BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "EPILOGUE_SUBTILE": 4, "GROUP_M": 2},
    {"kernel": "persistent", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "EPILOGUE_SUBTILE": 2, "GROUP_M": 1},
    {"kernel": "persistent", "BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 128, "EPILOGUE_SUBTILE": 1, "GROUP_M": 8},
)


def _tile_id(c):
    return (f"{c.get('kernel', 'tiled')}-{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}g{c['GROUP_M']}"
            f"s{c.get('EPILOGUE_SUBTILE', 1)}")


@ignore_fp_warnings
@pytest.mark.parametrize("config", TILES, ids=_tile_id)
@pytest.mark.parametrize("out_dtype", (torch.float32, torch.bfloat16))
def test_other_tiles_and_group_orders(config, out_dtype):
    # Ragged edges in M, N and K under several tilings, tile orders and epilogue subtiles: the same
    # output bit for bit (exact sums, element-wise epilogue), whichever kernel computes it.
    q, w, x_scale, w_scale, bias, residual = _operands(197, 144, 200)
    residual = residual.to(out_dtype)
    y = int8_gemm(q, w, x_scale, w_scale, bias, "gelu_tanh", residual, out_dtype, out=poisoned((197, 200), out_dtype),
                  config=config)
    default = int8_gemm(q, w, x_scale, w_scale, bias, "gelu_tanh", residual, out_dtype,
                        config={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64})
    torch.testing.assert_close(y, default, atol=0, rtol=0)


def test_config_is_validated():
    q, w, x_scale, w_scale, *_ = _operands(13, 48, 40)
    with pytest.raises(ValueError, match="config needs"):
        int8_gemm(q, w, x_scale, w_scale, config={"BLOCK_M": 16})
    with pytest.raises(ValueError, match=r"BLOCK_K must be >= 32 \(8-bit tl.dot"):
        int8_gemm(q, w, x_scale, w_scale, config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})
    with pytest.raises(ValueError, match="power of two"):
        int8_gemm(q, w, x_scale, w_scale, config={"BLOCK_M": 48, "BLOCK_N": 16, "BLOCK_K": 32})
    with pytest.raises(ValueError, match="kernel must be one of"):
        int8_gemm(q, w, x_scale, w_scale, config={"kernel": "split-k", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32})
    q2, w2, x2, ws2, *_ = _operands(13, 24, 40)  # K = 24 bytes: not a TMA row
    with pytest.raises(ValueError, match="TMA-compatible"):
        int8_gemm(q2, w2, x2, ws2, config={"kernel": "persistent", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32})


def test_every_gpu_candidate_is_a_tile_the_gpu_compiles():
    # what the tuner may launch: wgmma-sized (>= 64 rows), 8-bit dots with BLOCK_K >= 32, a CTA claim
    for cfg in gpu_configs():
        assert cfg["BLOCK_M"] >= 64 and cfg["BLOCK_K"] >= 32 and cfg["CTAS_PER_SM"] in (1, 2), cfg
    assert all(c["BLOCK_M"] <= 64 for c in gpu_configs(M=50))  # batch 1: no 128-row tiles
    assert not any(c["kernel"] == "persistent" for c in gpu_configs(M=5000, tma=False))


def test_weight_layout_and_tma_eligibility():
    q, w, x_scale, w_scale, *_ = _operands(50, 48, 40)
    out = torch.empty(50, 40, device=DEVICE)
    assert weight_layout(w) == "k-major" and weight_layout(w.t().contiguous().t()) == "strided"
    assert tma_compatible(q, w, out, None)
    assert not tma_compatible(q, w.t().contiguous().t(), out, None)  # N-major weight
    assert not tma_compatible(q[:, 1:], w[:, 1:], out, None)  # 47-byte rows
    assert tma_compatible(q, w, out[:, :39], None)  # a column slice keeps 16-byte rows
    assert not tma_compatible(q, w, out[:, 1:], None)  # base 4 bytes off


def test_empty_problems():
    q, w, x_scale, w_scale, bias, _ = _operands(0, 24, 8)
    assert int8_gemm(q, w, x_scale, w_scale, bias).shape == (0, 8)
    q, w, x_scale, w_scale, bias, _ = _operands(5, 0, 8)
    y = int8_gemm(q, w, x_scale, w_scale, bias)
    torch.testing.assert_close(y, bias.expand(5, 8), atol=0, rtol=0)


def test_launcher_rejects_bad_inputs():
    q, w, x_scale, w_scale, bias, residual = _operands(13, 24, 40)
    with pytest.raises(TypeError, match=r"q\[M, K\] of dtype int8"):
        int8_gemm(q.float(), w, x_scale, w_scale)
    with pytest.raises(TypeError, match=r"w\[N, K\] of dtype int8"):
        int8_gemm(q, w.to(torch.int32), x_scale, w_scale)
    with pytest.raises(ValueError, match=r"w of shape \[N, K=24\]"):
        int8_gemm(q, w[:, :20], x_scale, w_scale)
    with pytest.raises(ValueError, match=r"x_scale of shape \[M=13\]"):
        int8_gemm(q, w, x_scale[:5], w_scale)
    with pytest.raises(ValueError, match=r"x_scale\[M=13\] \(1-D\)"):
        int8_gemm(q, w, x_scale[0], w_scale)
    with pytest.raises(TypeError, match=r"w_scale\[N=40\] of dtype float32"):
        int8_gemm(q, w, x_scale, w_scale.half())
    with pytest.raises(ValueError, match=r"bias of shape \[N=40\]"):
        int8_gemm(q, w, x_scale, w_scale, bias[:3])
    with pytest.raises(ValueError, match=r"residual of shape \[M=13, N=40\]"):
        int8_gemm(q, w, x_scale, w_scale, bias, "none", residual[:, :8])
    with pytest.raises(ValueError, match="activation must be one of"):
        int8_gemm(q, w, x_scale, w_scale, bias, "relu")
    with pytest.raises(TypeError, match="out_dtype"):
        int8_gemm(q, w, x_scale, w_scale, bias, "none", None, torch.int32)
    with pytest.raises(ValueError, match="out of shape"):
        int8_gemm(q, w, x_scale, w_scale, out=torch.empty(13, 40, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="alias"):
        int8_gemm(q, w, x_scale, w_scale, bias, "none", residual, out=residual)
    with pytest.raises(ValueError, match="one device"):
        int8_gemm(q, w.to("meta"), x_scale, w_scale)


def test_cpu_tensors_rejected_when_not_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="CUDA tensors"):
        int8_gemm(q, torch.zeros(8, 8, dtype=torch.int8), torch.ones(4), torch.ones(8))


@gpu
@pytest.mark.parametrize("K,N", ((768, 2304), (768, 3072), (3072, 768)))
@pytest.mark.parametrize("M", (50, 1000, 256 * 50))
def test_vit_b_shapes_on_gpu(M, K, N):
    q, w, x_scale, w_scale, bias, residual = _operands(M, K, N)
    activation = "gelu" if N == 3072 else "none"
    residual = residual if K == 3072 else None
    for out_dtype in (torch.float32, torch.float16):
        y = int8_gemm(q, w, x_scale, w_scale, bias, activation, residual, out_dtype)
        ref = int8_gemm_ref(q, w, x_scale, w_scale, bias, activation, residual, out_dtype)
        exact = _exact(q, w, x_scale, w_scale, bias, activation, residual)
        assert_within_torch_error(y, ref, exact, atol=ATOL[out_dtype] * exact.abs().max().item(), name=f"{M}x{K}x{N}")
    ones = torch.ones(M, device=DEVICE), torch.ones(N, device=DEVICE)  # the int32 sums, exactly
    torch.testing.assert_close(int8_gemm(q, w, *ones), int8_gemm_ref(q, w, *ones), atol=0, rtol=0)


@gpu
def test_every_autotune_candidate_on_gpu():
    # exact sums on ragged problems (K = 136 is no TMA row: the tiled kernel only; 144 takes both),
    # the fused epilogue on a ViT-B one, under every candidate tile
    for (M, K, N), tma in (((197, 136, 96), False), ((197, 144, 200), True)):
        q, w, *_ = _operands(M, K, N)
        ones = torch.ones(M, device=DEVICE), torch.ones(N, device=DEVICE)
        exact = int8_gemm_ref(q, w, *ones)
        for config in gpu_configs(tma=tma):
            out = poisoned((M, N), torch.float32)
            torch.testing.assert_close(int8_gemm(q, w, *ones, out=out, config=config), exact, atol=0, rtol=0,
                                       msg=str(config))
    q2, wq_t2, x_scale, w_scale, bias, residual = _operands(1000, 768, 2304)
    ref = int8_gemm_ref(q2, wq_t2, x_scale, w_scale, bias, "gelu", residual, torch.float16)
    for config in gpu_configs():
        y = int8_gemm(q2, wq_t2, x_scale, w_scale, bias, "gelu", residual, torch.float16, config=config)
        torch.testing.assert_close(y, ref, atol=2e-3, rtol=2e-3, msg=str(config))
