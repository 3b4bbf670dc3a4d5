"""The C++ CPU kernels (``lra_kernels.cpu``) against the torch references: exact integer paths, exact
quantizers, fused epilogues within rounding, attention, row-wise products; awkward shapes, NaN rows,
batch independence, bad inputs; and the whole tower on the ``"cpu"`` backend."""

import pytest
import torch
import torch.nn.functional as F

from conftest import M_SIZES, cosine, images_for, make_tower
from lra_kernels import QuantEarlyExitViT
from lra_kernels import cpu as cpu_kernels
from lra_kernels.kernels.attention import attention_ref
from lra_kernels.kernels.int8_gemm import ACTIVATIONS, int8_gemm_ref
from lra_kernels.kernels.layernorm_quant import layernorm_quant_ref
from lra_kernels.quant import quantize_per_tensor_ref, quantize_per_token_ref

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=f"CPU kernels unavailable: {cpu_kernels.reason()}")

if cpu_kernels.available():
    from lra_kernels.cpu import ops as co

KN = ((8, 8), (24, 40), (136, 96), (768, 200))
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _gemm_operands(M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 2
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    w_scale = torch.rand(N, generator=g) * 0.01 + 1e-4
    bias = torch.randn(N, generator=g)
    residual = torch.randn(M, N, generator=g)
    return x, w, w_scale, bias, residual


def test_describe_names_the_isa_and_cpu():
    assert cpu_kernels.isa() in ("avx512_vnni", "amx_int8")
    assert cpu_kernels.isa() in cpu_kernels.describe()


@pytest.mark.parametrize("M", M_SIZES)
@pytest.mark.parametrize("K,N", KN)
def test_int32_sums_are_exact(M, K, N):
    x, w, *_ = _gemm_operands(M, K, N)
    a = co.quantize(x)
    acc = co.gemm_acc(a, co.PackedWeight.pack(w))
    torch.testing.assert_close(acc.long(), a.int8().long() @ w.long().t(), atol=0, rtol=0)


def test_extreme_codes_do_not_overflow():
    K = 3072
    a = co.quantize(torch.full((3, K), -1.0))  # every code -127 (u8 1)
    w = torch.full((5, K), -127, dtype=torch.int8)
    assert (co.gemm_acc(a, co.PackedWeight.pack(w)) == K * 127 * 127).all()


@pytest.mark.parametrize("M", (1, 13, 197))
def test_quantizers_are_bit_exact(M):
    x = torch.randn(M, 72) * 3
    smooth = torch.rand(72) + 0.5
    for got, (q, s) in ((co.quantize(x), quantize_per_token_ref(x)),
                        (co.quantize(x, smooth=smooth), quantize_per_token_ref(x, smooth)),
                        (co.quantize(x, static_scale=0.02), quantize_per_tensor_ref(x, torch.tensor(0.02))),
                        (co.quantize(x, smooth=smooth, static_scale=0.02),
                         quantize_per_tensor_ref(x, torch.tensor(0.02), smooth))):
        torch.testing.assert_close(got.int8(), q, atol=0, rtol=0)
        torch.testing.assert_close(got.scale, s, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_layernorm_quant_codes(dtype):
    x = (torch.randn(197, 768) * 2 + 0.5).to(dtype)
    w, b = torch.rand(768) + 0.5, torch.randn(768) * 0.1
    got = co.quantize(x, ln=(w, b, 1e-5))
    q, s = layernorm_quant_ref(x, w, b, 1e-5)
    diff = (got.int8().int() - q.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # LayerNorm rounds differently by an ulp
    torch.testing.assert_close(got.scale, s, atol=0, rtol=1e-5)


@pytest.mark.parametrize("M", M_SIZES)
@pytest.mark.parametrize("K,N", KN)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gemm_epilogue_matches_reference(M, K, N, activation):
    x, w, w_scale, bias, residual = _gemm_operands(M, K, N)
    a = co.quantize(x)
    pw = co.PackedWeight.pack(w)
    for dtype in FLOAT_DTYPES:
        y = co.gemm(a, pw, w_scale, bias, activation, residual.to(dtype), dtype)
        ref = int8_gemm_ref(a.int8(), w, a.scale, w_scale, bias, activation, residual.to(dtype), dtype)
        assert y.dtype == dtype and y.shape == (M, N)
        if activation == "none":  # same fp32 operations in the same order
            torch.testing.assert_close(y, ref, atol=0, rtol=0)
        else:  # the activations' exp/erf differ by a few ulp; then the output's own rounding
            tol = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
            torch.testing.assert_close(y.float(), ref.float(), atol=tol * (1 + ref.float().abs().max().item()),
                                       rtol=tol)


@pytest.mark.parametrize("static", (None, 0.05))
def test_gemm_then_quantize_matches_the_two_references(static):
    x, w, w_scale, bias, _ = _gemm_operands(197, 136, 96)
    a = co.quantize(x)
    smooth = torch.rand(96) + 0.5
    got = co.gemm_quant(a, co.PackedWeight.pack(w), w_scale, bias, "none", smooth=smooth, static_scale=static)
    y = int8_gemm_ref(a.int8(), w, a.scale, w_scale, bias)
    if static is None:
        q, s = quantize_per_token_ref(y, smooth)
    else:
        q, s = quantize_per_tensor_ref(y, torch.tensor(static), smooth)
    torch.testing.assert_close(got.int8(), q, atol=0, rtol=0)
    torch.testing.assert_close(got.scale, s, atol=0, rtol=0)
    assert got.K == 96


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gemm_residual_then_layernorm_quant(dtype):
    x, w, w_scale, bias, residual = _gemm_operands(50, 136, 96, seed=2)
    a = co.quantize(x)
    ln = (torch.rand(96) + 0.5, torch.randn(96) * 0.1, 1e-5)
    y, nxt = co.gemm_ln_quant(a, co.PackedWeight.pack(w), w_scale, bias, residual.to(dtype), dtype, ln)
    ref = int8_gemm_ref(a.int8(), w, a.scale, w_scale, bias, "none", residual.to(dtype), dtype)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)  # the residual stream, as stored
    q, s = layernorm_quant_ref(ref, *ln)  # LayerNorm of the stored (rounded) row
    diff = (nxt.int8().int() - q.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    torch.testing.assert_close(nxt.scale, s, atol=0, rtol=1e-5)


def test_non_finite_rows_stay_local():
    x, w, w_scale, bias, residual = _gemm_operands(13, 72, 40)
    x[3, 5], x[7, 0] = float("nan"), float("inf")
    a = co.quantize(x)
    assert (a.int8()[[3, 7]] == 0).all() and torch.isnan(a.scale[3]) and torch.isinf(a.scale[7])
    pw = co.PackedWeight.pack(w)
    y = co.gemm(a, pw, w_scale, bias, "gelu")
    keep = [i for i in range(13) if i not in (3, 7)]
    assert not torch.isfinite(y[[3, 7]]).any()
    clean = co.gemm(co.quantize(x[keep]), pw, w_scale, bias, "gelu")
    torch.testing.assert_close(y[keep], clean, atol=0, rtol=0)
    nxt = co.gemm_quant(a, pw, w_scale, bias, "gelu")
    assert (nxt.int8()[[3, 7]] == 0).all() and not torch.isfinite(nxt.scale[[3, 7]]).any()
    static = co.quantize(x, static_scale=0.1)
    assert torch.isnan(static.scale[[3, 7]]).all() and torch.isfinite(static.scale[keep]).all()


def test_rows_do_not_depend_on_the_batch():
    x, w, w_scale, bias, residual = _gemm_operands(197, 768, 200, seed=4)
    pw = co.PackedWeight.pack(w)
    ln = (torch.rand(200) + 0.5, torch.randn(200) * 0.1, 1e-5)
    full_y, full_q = co.gemm_ln_quant(co.quantize(x), pw, w_scale, bias, residual, torch.float32, ln)
    for rows in (slice(0, 1), slice(13, 63), slice(190, 197)):
        y, q = co.gemm_ln_quant(co.quantize(x[rows]), pw, w_scale, bias, residual[rows], torch.float32, ln)
        assert torch.equal(y, full_y[rows]) and torch.equal(q.int8(), full_q.int8()[rows])


def test_results_do_not_depend_on_the_thread_count():
    """The GEMM splits rows (VNNI) or columns (AMX) over the threads: the bits must not move with their number,
    including more threads than 64-column panels and a last row block of a single row."""
    x, w, w_scale, bias, residual = _gemm_operands(97, 320, 584, seed=5)
    pw = co.PackedWeight.pack(w)
    ln = (torch.rand(584) + 0.5, torch.randn(584) * 0.1, 1e-5)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3, 16):
            torch.set_num_threads(threads)
            a = co.quantize(x)
            y, q = co.gemm_ln_quant(a, pw, w_scale, bias, residual, torch.float32, ln)
            h = co.gemm_quant(a, pw, w_scale, bias, "gelu")
            outs.append((co.gemm_acc(a, pw), y, q.int8(), q.scale, h.int8(), h.scale))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(u, v) for u, v in zip(outs[0], other))
    torch.testing.assert_close(outs[0][0].long(), co.quantize(x).int8().long() @ w.long().t(), atol=0, rtol=0)


@pytest.mark.parametrize("B,T,heads,D", [(1, 50, 12, 768), (3, 13, 4, 64), (2, 197, 6, 384), (2, 5, 4, 320),
                                         (2, 7, 12, 768), (1, 10, 2, 128), (2, 9, 1, 128)])  # every tail of a row group
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_attention_matches_sdpa(B, T, heads, D, dtype):
    qkv = torch.randn(B * T, 3 * D).to(dtype)
    out = co.attention(qkv, B, T, heads, dtype)
    exact = attention_ref(qkv.double().view(B, T, 3 * D), heads).reshape(B * T, D)
    ref = attention_ref(qkv.view(B, T, 3 * D), heads).reshape(B * T, D)
    assert out.dtype == dtype
    # no worse than SDPA's own error in the same dtype, plus a small atol
    err, ref_err = (out.double() - exact).abs().max(), (ref.double() - exact).abs().max()
    assert err <= 2 * ref_err + 1e-5, (err, ref_err)
    got = co.attention_quant(qkv, B, T, heads)
    q, s = quantize_per_token_ref(attention_ref(qkv.float().view(B, T, 3 * D), heads).reshape(B * T, D))
    diff = (got.int8().int() - q.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    for b in range(B):  # each batch element alone gives the same codes
        alone = co.attention_quant(qkv[b * T : (b + 1) * T], 1, T, heads)
        assert torch.equal(alone.int8(), got.int8()[b * T : (b + 1) * T])


def test_rows_matmul_is_exact_per_row_and_accurate():
    g = torch.Generator().manual_seed(7)
    a, w = torch.randn(37, 768, generator=g), torch.randn(768, 512, generator=g)
    text = torch.randn(1000, 512, generator=g)
    out = co.rows_matmul(a, w)
    torch.testing.assert_close(out.double(), a.double() @ w.double(), atol=1e-4, rtol=1e-5)
    logits = co.rows_matmul(out, text.t())  # the transpose of a contiguous [N, K]: read as rows
    torch.testing.assert_close(logits.double(), out.double() @ text.double().t(), atol=1e-3, rtol=1e-5)
    for rows in (slice(0, 1), slice(5, 12), slice(36, 37)):
        assert torch.equal(co.rows_matmul(a[rows], w), out[rows])
        assert torch.equal(co.rows_matmul(out[rows], text.t()), logits[rows])


def test_bad_inputs_are_rejected():
    x, w, w_scale, bias, _ = _gemm_operands(13, 24, 40)
    with pytest.raises(TypeError, match="int8 weight"):
        co.PackedWeight.pack(w.float())
    a = co.quantize(x)
    with pytest.raises(ValueError, match="K=24 but the weight is"):
        co.gemm(a, co.PackedWeight.pack(torch.zeros(40, 32, dtype=torch.int8)), w_scale)
    with pytest.raises(RuntimeError, match="w_scale"):
        co.gemm(a, co.PackedWeight.pack(w), w_scale[:5])
    with pytest.raises(RuntimeError, match="float32/bfloat16/float16"):
        co.quantize(torch.ones(3, 8, dtype=torch.float64))


# ---------------------------------------------------------------------- the tower on the "cpu" backend
@pytest.fixture(scope="module")
def tower():
    return make_tower(layers=3)


def _models(tower, **kwargs):
    cpu = QuantEarlyExitViT.from_open_clip(tower, backend="cpu", **kwargs)
    ref = QuantEarlyExitViT.from_open_clip(tower, backend="torch", compile_blocks=False, act_dtype=cpu.act_dtype,
                                           **{k: v for k, v in kwargs.items() if k != "act_dtype"})
    return cpu, ref


@pytest.mark.parametrize("kwargs", [{}, {"act_dtype": torch.float32}, {"smooth_alpha": 0.5, "calib": True},
                                    {"act_quant": "per_tensor_static", "smooth_alpha": 0.5, "calib": True}],
                         ids=["per_token", "per_token-fp32", "smoothquant", "static-smooth"])
def test_cpu_backend_tower_matches_torch_backend(tower, kwargs):
    kwargs = dict(kwargs)
    if kwargs.pop("calib", False):
        kwargs["calibration_images"] = images_for(tower, 8, seed=5)
    cpu, ref = _models(tower, **kwargs)
    assert cpu.resolved_backend == "cpu" and ref.resolved_backend == "torch"
    x = images_for(tower, 6)
    y, y_ref = cpu(x), ref(x)
    with torch.no_grad():
        y_fp32 = tower(x)
    assert cosine(y, y_ref).min() > 0.9999
    assert cosine(y, y_fp32).mean() >= cosine(y_ref, y_fp32).mean() - 1e-4
    for rows in (slice(0, 1), slice(2, 5)):  # rows never depend on the batch
        assert torch.equal(cpu(x[rows]), y[rows])


def test_cpu_backend_declines_the_papers_scheme(tower):
    auto = QuantEarlyExitViT.from_open_clip(tower, act_quant="paper")
    assert auto.resolved_backend == "torch"
    with pytest.raises(ValueError, match="backend='cpu' cannot run this model: the paper's scheme"):
        QuantEarlyExitViT.from_open_clip(tower, act_quant="paper", backend="cpu").resolved_backend


def test_cpu_backend_classify_is_batch_invariant(tower):
    from lra_kernels import ExitPolicy

    q = QuantEarlyExitViT.from_open_clip(tower, backend="cpu")
    q.set_classifier(F.normalize(torch.randn(5, q.output_dim), dim=-1))
    q.exit_policy = ExitPolicy((1, 2), torch.tensor([[2.0, 1.0, 0.0]] * 2), torch.zeros(2), torch.zeros(2, 3),
                               torch.ones(2, 3), torch.tensor([0.6, 0.55]))
    x = images_for(tower, 9)
    res = q.classify(x)
    assert set(res.exit_layer.tolist()) - {1, 2, 3} == set()
    for i in range(9):
        one = q.classify(x[i : i + 1])
        assert torch.equal(one.logits, res.logits[i : i + 1]) and torch.equal(one.exit_layer, res.exit_layer[i : i + 1])


@pytest.mark.parametrize("pool", ["patch_mean", "cls"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_exit_head_and_gate_features_match_references(pool, dtype):
    from lra_kernels.kernels.exit_head import exit_head_ref
    from lra_kernels.kernels.gate_features import gate_features_ref

    g = torch.Generator().manual_seed(9)
    B, T, D, E, C = 13, 50, 96, 40, 37
    h = (torch.randn(B, T, D, generator=g) + 3 * torch.randn(D, generator=g)).to(dtype)
    ln_w, ln_b = torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g) * 0.1
    proj = torch.randn(D, E, generator=g) / D**0.5
    text = F.normalize(torch.randn(C, E, generator=g), dim=-1)
    logits, z = co.exit_head(h, ln_w, ln_b, 1e-5, proj, text, 50.0, pool)
    ref_l, ref_z = exit_head_ref(h, ln_w, ln_b, 1e-5, proj, text, 50.0, pool)
    torch.testing.assert_close(z, ref_z, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, ref_l, atol=1e-3, rtol=1e-4)
    feats = co.gate_features(logits, h)
    torch.testing.assert_close(feats, gate_features_ref(logits, h), atol=1e-5, rtol=1e-4)
    h2 = h.clone()
    h2[4, 7, 3] = float("nan")
    l2 = logits.clone()
    l2[9, 0] = float("inf")
    f2 = co.gate_features(l2, h2)
    assert torch.isnan(f2[[4, 9]]).all() and torch.isfinite(f2[[0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12]]).all()
    for rows in (slice(0, 1), slice(3, 9)):  # each row computed alone
        lr, zr = co.exit_head(h[rows], ln_w, ln_b, 1e-5, proj, text, 50.0, pool)
        assert torch.equal(lr, logits[rows]) and torch.equal(zr, z[rows])
        assert torch.equal(co.gate_features(lr, h[rows]), feats[rows])



def test_a_classifier_at_a_freed_classifiers_address_is_read_afresh():
    """A new classifier tensor at the address (and version 0) of an earlier one, as the allocator hands out
    after a model is freed: the exit head and the row products read the new values, never a cached copy
    of the old ones. (numpy writes under the tensors without bumping their version: the worst case.)"""
    import numpy as np

    g = torch.Generator().manual_seed(11)
    B, T, D, C = 5, 17, 64, 7
    h = torch.randn(B, T, D, generator=g)
    ln_w, ln_b = torch.ones(D), torch.zeros(D)
    z = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    memory = np.empty((C, D), dtype=np.float32)
    for seed in (1, 2, 3):
        memory[:] = F.normalize(torch.randn(C, D, generator=torch.Generator().manual_seed(seed)), dim=-1).numpy()
        text = torch.from_numpy(memory)  # a fresh tensor object, same address, version 0
        assert text._version == 0
        logits, _ = co.exit_head(h, ln_w, ln_b, 1e-5, None, text, 10.0, "patch_mean")
        ref = 10.0 * F.normalize(F.layer_norm(h[:, 1:].mean(1), (D,), ln_w, ln_b), dim=-1) @ text.t()
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(co.rows_matmul(z, text.t()), z @ text.t(), atol=1e-5, rtol=1e-5)


def test_a_replaced_weight_is_repacked():
    """A ``QuantLinear`` whose ``qweight`` is replaced by another tensor (even at the same address, version
    0) runs on the new weight: the packed copy belongs to the tensor object it was packed from."""
    import numpy as np

    from lra_kernels.cpu import block as cpu_block

    q = QuantEarlyExitViT.from_open_clip(make_tower(layers=1, seed=4), backend="cpu", act_dtype=torch.float32)
    lin = q.transformer.resblocks[0].mlp.c_fc
    memory = lin.qweight.numpy().copy()
    lin.qweight = torch.from_numpy(memory)
    first = cpu_block.packed(lin)
    memory[:] = np.flip(memory, axis=1)  # new values under the same tensor, version unchanged
    lin.qweight = torch.from_numpy(memory)  # a new tensor object at the same address
    again = cpu_block.packed(lin)
    assert again is not first
    fresh = cpu_kernels.ops.PackedWeight.pack(lin.qweight)
    assert torch.equal(again.packed, fresh.packed) and torch.equal(again.colsum, fresh.colsum)


@pytest.mark.parametrize("scheme", [{}, {"smooth_alpha": 0.5}, {"act_quant": "per_tensor_static"}],
                         ids=["per_token", "smoothquant", "static"])
@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_one_call_block_equals_the_stepwise_kernels(scheme, act):
    """``cpu.block.forward`` (one library call per block) gives the bits of ``forward_stepwise`` (one call per
    kernel): every scheme the CPU kernels take, both activations, every dtype, causal or not, awkward T."""
    from lra_kernels.cpu import block as cpu_block

    tower = make_tower(layers=2, act=act, seed=5)
    calib = images_for(tower, 8, seed=2) if scheme else None
    q = QuantEarlyExitViT.from_open_clip(tower, backend="cpu", calibration_images=calib, **scheme)
    g = torch.Generator().manual_seed(3)
    for blk in q.transformer.resblocks:
        assert cpu_block.decline(blk) is None
        for dtype in FLOAT_DTYPES:
            for B, T in ((1, 17), (3, 50), (2, 77)):
                x = (3 * torch.randn(B, T, 64, generator=g)).to(dtype)
                for causal in (False, True):
                    blk.attn.causal = causal
                    got = cpu_block.forward(blk, x)
                    assert got.dtype == dtype and got.shape == x.shape
                    assert torch.equal(got, cpu_block.forward_stepwise(blk, x)), (dtype, B, T, causal)
        blk.attn.causal = False


def test_one_call_block_rejects_a_malformed_call():
    from lra_kernels.cpu import block as cpu_block

    q = QuantEarlyExitViT.from_open_clip(make_tower(layers=1), backend="cpu")
    blk = q.transformer.resblocks[0]
    with pytest.raises(RuntimeError, match="contiguous x"):
        cpu_block.forward(blk, torch.randn(2, 64, 17).transpose(1, 2))
    linears = (blk.attn.in_proj, blk.attn.out_proj, blk.mlp.c_fc)
    with pytest.raises(RuntimeError, match="4 linears"):
        co.block(torch.randn(1, 17, 64), [cpu_block.packed(lin) for lin in linears], [lin.w_scale for lin in linears],
                 [lin.bias for lin in linears], (None,) * 4, (1e-5, 1e-5), None, [None] * 3, 4, False, "gelu")


def test_threads_calling_one_model_at_once_get_their_own_answers():
    """The kernels' scratch is per calling thread: four Python threads running one model at once (a threaded
    server) each get exactly what the model gives their batch alone, every batch size and round."""
    from concurrent.futures import ThreadPoolExecutor

    q = QuantEarlyExitViT.from_open_clip(make_tower(layers=2, seed=6), backend="cpu")
    batches = [images_for(q, n, seed=10 + n) for n in (1, 2, 5, 9)]
    alone = [q(x) for x in batches]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            got = list(pool.map(q, batches))
            for a, b in zip(got, alone):
                assert torch.equal(a, b)
