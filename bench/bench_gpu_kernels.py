"""GPU benchmarks of the Triton kernels and of the INT8 ViT-B-32 tower (skipped without CUDA).

    pytest bench/bench_gpu_kernels.py --benchmark-json=gpu.json     (scripts/gpu_check.sh runs it)

- INT8 GEMM with its fused epilogue vs ``torch._int_mm`` + a separate dequant epilogue
  (cuBLASLt, what the torch backend does) and vs FP16 ``torch.matmul`` (cuBLAS, no epilogue), at
  the four GEMMs of ViT-B/32 (M = batch * 50 tokens): TOPS and % of the card's dense INT8 peak.
- LayerNorm + quantize, exit head, gate features vs their torch references.
- ViT-B-32 (random weights) end to end at batch 1, 32, 256 vs open_clip FP16 and, if installed,
  torchao's int8 dynamic quantization (compiled).

Every provider is checked against a reference before it is timed. Times are medians of
``triton.testing.do_bench`` (CUDA events, L2 flushed between runs); figures of merit go to
``benchmark.extra_info`` (and, with ``LRA_GPU_BENCH_JSONL=path``, one JSON line per benchmark,
which ``scripts/gpu_summary.py`` turns into a table). pytest-benchmark's own statistics time
synchronised rounds of the same call and include launch overhead.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

# LRA_BENCH_DEVICE=cpu (with TRITON_INTERPRET=1): a smoke run of this file's code paths on tiny
# shapes, so that the one short GPU run does not fail on a typo. Its timings mean nothing.
DEVICE = torch.device(os.environ.get("LRA_BENCH_DEVICE", "cuda"))
SMOKE = DEVICE.type == "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Dense (non-sparse) tensor-core peaks from NVIDIA's data sheets: (INT8 TOPS, FP16 TFLOPS).
PEAKS = (
    ("H200 NVL", 1671.0, 835.0),
    ("H200", 1979.0, 989.0),  # H200 SXM
    ("H100 NVL", 1671.0, 835.0),
    ("H100 PCIe", 1513.0, 756.0),
    ("H100", 1979.0, 989.0),  # H100 SXM5 ("H100 80GB HBM3")
    ("A100", 624.0, 312.0),
)

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # a bare GPU image: keep the figures (do_bench, JSONL), drop pytest-benchmark's rounds

    class _Untimed:
        def __init__(self):
            self.extra_info = {}

        def pedantic(self, fn, *args, **kwargs):
            return fn()

    @pytest.fixture
    def benchmark():
        return _Untimed()


TOKENS = 50  # ViT-B/32 at 224 px: 49 patches + class token
# name, M, K, N, activation, residual, out_dtype (as the block calls it; c_fc also in fp16)
GEMMS = (
    ("qkv b256", 256 * TOKENS, 768, 2304, "none", False, torch.float16),
    ("out_proj b256", 256 * TOKENS, 768, 768, "none", True, torch.float32),
    ("c_fc b256", 256 * TOKENS, 768, 3072, "gelu", False, torch.float32),
    ("c_fc b256 fp16", 256 * TOKENS, 768, 3072, "gelu", False, torch.float16),
    ("c_proj b256", 256 * TOKENS, 3072, 768, "none", True, torch.float32),
    ("qkv b32", 32 * TOKENS, 768, 2304, "none", False, torch.float16),
    ("c_fc b1", 1 * TOKENS, 768, 3072, "gelu", False, torch.float32),
)
if SMOKE:
    GEMMS = tuple((n, min(M, 64), K // 16, N // 16, a, r, o) for n, M, K, N, a, r, o in GEMMS[:3])
TARGET_VS_INT_MM = 1.0  # at M = 256*50, K = 768, N in {2304, 3072}
TARGET_VS_FP16 = 1.4
TARGET_PCT_PEAK = 50.0  # at the largest ViT-B shape (c_fc / c_proj at batch 256)
TARGET_E2E_VS_FP16 = 1.6  # ViT-B-32 at batch 256
TORCHAO = "torchao int8 dynamic (compiled)"


def card_peaks() -> tuple[str, float | None, float | None]:
    if SMOKE:
        return "cpu (smoke run, timings meaningless)", None, None
    name = torch.cuda.get_device_name()
    for key, int8, fp16 in PEAKS:
        if key in name:
            return name, int8, fp16
    return name, None, None


def time_ms(fn) -> float:
    import triton.testing

    if SMOKE:
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def time_if_supported(fn) -> float:
    """``time_ms`` for a peer call that may reject a layout (inf then)."""
    try:
        fn()
    except RuntimeError:
        return float("inf")
    return time_ms(fn)


def record(benchmark, fn, **info):
    """Time ``fn`` with pytest-benchmark (synchronised rounds) and store ``info`` everywhere."""
    name, int8_peak, fp16_peak = card_peaks()
    info = {"device": name, "int8_peak_tops": int8_peak, "fp16_peak_tflops": fp16_peak, **info}
    benchmark.extra_info.update(info)

    def synced():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=1 if SMOKE else 10, warmup_rounds=0 if SMOKE else 2)
    path = os.environ.get("LRA_GPU_BENCH_JSONL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(info, default=str) + "\n")


# ---------------------------------------------------------------------------------- INT8 GEMM
def _gemm_operands(M, K, N, residual):
    """Operands; the weight in both layouts: ``[K, N]`` contiguous (N-major, as ``QuantLinear``
    stores ``qweight_t`` today) and the transpose of an ``[N, K]`` tensor (K-major, which int8
    ``wgmma`` wants: no transpose of the B tile in registers)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=DEVICE, generator=g)
    w_nk = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEVICE, generator=g)
    x_scale = torch.rand(M, device=DEVICE, generator=g) * 0.02 + 1e-3
    w_scale = torch.rand(N, device=DEVICE, generator=g) * 1e-3 + 1e-4
    bias = torch.randn(N, device=DEVICE, generator=g)
    res = torch.randn(M, N, device=DEVICE, generator=g) if residual else None
    return q, w_nk.t().contiguous(), w_nk.t(), x_scale, w_scale, bias, res


@pytest.mark.parametrize("name,M,K,N,activation,residual,out_dtype", GEMMS, ids=[g[0] for g in GEMMS])
def test_int8_gemm(benchmark, name, M, K, N, activation, residual, out_dtype):
    from lra_kernels.kernels.int8_gemm import int8_gemm, int8_gemm_ref, tuned_config

    q, w_nmajor, w_kmajor, x_scale, w_scale, bias, res = _gemm_operands(M, K, N, residual)

    def ours(w):
        return lambda: int8_gemm(q, w, x_scale, w_scale, bias, activation, res, out_dtype)

    def peer(w):  # cuBLASLt INT8 GEMM, then the dequant epilogue as separate torch ops
        return lambda: int8_gemm_ref(q, w, x_scale, w_scale, bias, activation, res, out_dtype)

    x16 = (q.half() * 0.01).contiguous()
    w16 = {"nmajor": (w_nmajor.half() * 0.01).contiguous(), "kmajor": (w_kmajor.half() * 0.01).t().contiguous().t()}

    y_ref = peer(w_nmajor)()
    tol = 1e-4 if out_dtype == torch.float32 else 2e-3
    ones = torch.ones_like(x_scale), torch.ones_like(w_scale)
    for w in (w_nmajor, w_kmajor):
        torch.testing.assert_close(ours(w)().float(), y_ref.float(), atol=tol * y_ref.abs().max().item(), rtol=tol)
        unit = int8_gemm(q, w, *ones)  # the int32 sums, as fp32
        torch.testing.assert_close(unit, torch._int_mm(q, w_nmajor).float(), atol=0, rtol=0)
    for w in w16.values():
        torch.testing.assert_close(torch.matmul(x16, w).float(), x16.float() @ w.float(), atol=2e-2, rtol=2e-2)

    t_n, t_k = time_ms(ours(w_nmajor)), time_ms(ours(w_kmajor))
    t_peer = min(time_ms(peer(w_nmajor)), time_if_supported(peer(w_kmajor)))
    t_int_mm = min(time_ms(lambda: torch._int_mm(q, w_nmajor)), time_if_supported(lambda: torch._int_mm(q, w_kmajor)))
    t_fp16 = min(time_ms(lambda w=w: torch.matmul(x16, w)) for w in w16.values())
    ops = 2.0 * M * N * K
    _, int8_peak, _ = card_peaks()
    tops_n, tops_k = ops / t_n / 1e9, ops / t_k / 1e9
    info = dict(
        kind="gemm",
        label=f"int8_gemm {name} [{M}x{K}x{N}] {activation}{' +res' if residual else ''} -> {str(out_dtype)[6:]}",
        ms=t_n,  # the layout the tower uses today
        tops=tops_n,
        pct_int8_peak=100 * tops_n / int8_peak if int8_peak else None,
        ms_kmajor=t_k,
        tops_kmajor=tops_k,
        pct_int8_peak_kmajor=100 * tops_k / int8_peak if int8_peak else None,
        ms_int_mm_dequant=t_peer,  # the faster weight layout for cuBLASLt
        ms_int_mm_only=t_int_mm,
        ms_fp16_cublas=t_fp16,
        vs_int_mm_dequant=t_peer / t_n,
        vs_fp16_cublas=t_fp16 / t_n,
        vs_int_mm_dequant_kmajor=t_peer / t_k,
        vs_fp16_cublas_kmajor=t_fp16 / t_k,
        config=tuned_config(M, N, K),
    )
    checks = []
    if M == 256 * TOKENS and K == 768 and N in (2304, 3072):
        checks.append(("vs_int_mm_dequant", TARGET_VS_INT_MM, f">= {TARGET_VS_INT_MM}x int_mm+dequant"))
        checks.append(("vs_fp16_cublas", TARGET_VS_FP16, f">= {TARGET_VS_FP16}x fp16"))
    if M == 256 * TOKENS and N * K == 768 * 3072 and int8_peak:
        checks.append(("pct_int8_peak", TARGET_PCT_PEAK, f">= {TARGET_PCT_PEAK:.0f}% INT8 peak"))
    if checks:
        info["target"] = ", ".join(c[2] for c in checks)
        info["meets_target"] = all(info[k] >= v for k, v, _ in checks)  # N-major, as the tower runs
        info["meets_target_kmajor"] = all(info[k + "_kmajor"] >= v for k, v, _ in checks)
    record(benchmark, ours(w_nmajor), **info)


# ---------------------------------------------------------------------------------- small kernels
def _op_info(label, t_ours, t_ref, bytes_moved):
    return dict(kind="op", label=label, ms=t_ours, ms_torch_ref=t_ref, vs_torch_ref=t_ref / t_ours, gb_per_s=bytes_moved / t_ours / 1e6)


QUANT_M = 64 if SMOKE else 256 * TOKENS
WIDTH, EMBED, CLASSES = (64, 32, 10) if SMOKE else (768, 512, 1000)
BATCHES = (1, 2) if SMOKE else (1, 32, 256)


@pytest.mark.parametrize("M,K,op", ((QUANT_M, WIDTH, "layernorm_quant"), (QUANT_M, 4 * WIDTH, "quantize_per_token")))
def test_quantize(benchmark, M, K, op):
    from lra_kernels.kernels.layernorm_quant import layernorm_quant, layernorm_quant_ref, quantize_per_token
    from lra_kernels.quant import quantize_per_token_ref

    x = torch.randn(M, K, device=DEVICE)
    w, b = torch.randn(K, device=DEVICE), torch.randn(K, device=DEVICE)
    if op == "layernorm_quant":
        ours, ref = (lambda: layernorm_quant(x, w, b, 1e-5)), (lambda: layernorm_quant_ref(x, w, b, 1e-5))  # noqa: E731
        assert (ours()[0].int() - ref()[0].int()).abs().max().item() <= 1
    else:
        ours, ref = (lambda: quantize_per_token(x)), (lambda: quantize_per_token_ref(x))  # noqa: E731
        assert torch.equal(ours()[0], ref()[0]) and torch.equal(ours()[1], ref()[1])
    t, tr = time_ms(ours), time_ms(ref)
    record(benchmark, ours, **_op_info(f"{op} [{M}x{K}] fp32 -> int8", t, tr, M * K * 5))


@pytest.mark.parametrize("B", BATCHES)
def test_exit_head(benchmark, B):
    from lra_kernels.kernels.exit_head import exit_head, exit_head_ref

    h = torch.randn(B, TOKENS, WIDTH, device=DEVICE)
    w, b = torch.randn(WIDTH, device=DEVICE), torch.randn(WIDTH, device=DEVICE)
    proj = torch.randn(WIDTH, EMBED, device=DEVICE) / WIDTH**0.5
    text = F.normalize(torch.randn(CLASSES, EMBED, device=DEVICE), dim=-1)
    ours = lambda: exit_head(h, w, b, 1e-5, proj, text, 100.0)  # noqa: E731
    ref = lambda: exit_head_ref(h, w, b, 1e-5, proj, text, 100.0)  # noqa: E731
    torch.testing.assert_close(ours()[0], ref()[0], atol=1e-3, rtol=1e-4)
    t, tr = time_ms(ours), time_ms(ref)
    label = f"exit_head B={B} [T={TOKENS}, D={WIDTH}, E={EMBED}, C={CLASSES}]"
    record(benchmark, ours, **_op_info(label, t, tr, B * TOKENS * WIDTH * 4))


@pytest.mark.parametrize("B", BATCHES)
def test_gate_features(benchmark, B):
    from lra_kernels.kernels.gate_features import gate_features, gate_features_ref

    logits = torch.randn(B, CLASSES, device=DEVICE) * 5
    h = torch.randn(B, TOKENS, WIDTH, device=DEVICE)
    ours, ref = (lambda: gate_features(logits, h)), (lambda: gate_features_ref(logits, h))  # noqa: E731
    torch.testing.assert_close(ours(), ref(), atol=1e-5, rtol=1e-4)
    t, tr = time_ms(ours), time_ms(ref)
    label = f"gate_features B={B} [C={CLASSES}, T={TOKENS}, D={WIDTH}]"
    record(benchmark, ours, **_op_info(label, t, tr, B * TOKENS * WIDTH * 4))


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def vit_b_32():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    if SMOKE:
        from open_clip.transformer import VisionTransformer

        return VisionTransformer(32, 8, 64, 2, 4, 4.0, output_dim=32).eval()
    return open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()


@pytest.fixture(scope="module")
def providers(vit_b_32):
    """name -> (callable on fp32 images, note); the FP32 tower is the reference."""
    from lra_kernels import QuantEarlyExitViT

    out = {}
    ours = QuantEarlyExitViT.from_open_clip(vit_b_32, backend="triton").to(DEVICE)
    out["lra-kernels int8 (triton)"] = lambda x: ours(x)
    fp16 = copy.deepcopy(vit_b_32).half().to(DEVICE)
    out["open_clip fp16"] = lambda x: fp16(x.half())
    try:
        import torchao.quantization as tq

        config = getattr(tq, "Int8DynamicActivationInt8WeightConfig", None)
        tao = copy.deepcopy(vit_b_32).to(torch.bfloat16).to(DEVICE)
        tq.quantize_(tao, config() if config is not None else tq.int8_dynamic_activation_int8_weight())
        tao = torch.compile(tao)
        out[TORCHAO] = lambda x: tao(x.to(torch.bfloat16))
    except Exception as err:  # not installed, or an API it does not have
        out[TORCHAO] = f"unavailable: {type(err).__name__}: {err}"
    return out


# batch 256 first: it carries the target, and a run cut short by its time budget keeps it
@pytest.mark.parametrize("batch", sorted(BATCHES, reverse=True))
def test_vit_b_32_end_to_end(benchmark, batch, vit_b_32, providers):
    fp32 = copy.deepcopy(vit_b_32).to(DEVICE)
    size = vit_b_32.image_size
    g = torch.Generator(device=DEVICE).manual_seed(batch)
    images = torch.randn(batch, 3, *size, device=DEVICE, generator=g)
    with torch.no_grad():
        reference = fp32(images).float()
    del fp32
    timings, cosines, notes = {}, {}, {}
    with torch.no_grad():
        for name, fn in providers.items():
            if isinstance(fn, str):
                notes[name] = fn
                continue
            if name == TORCHAO and batch != max(BATCHES):
                notes[name] = "timed at the largest batch only (each new shape recompiles)"
                continue
            cos = F.cosine_similarity(fn(images).float(), reference, dim=-1).mean().item()
            assert cos > 0.9, f"{name}: cosine {cos:.4f} to FP32; not timing a broken provider"
            cosines[name] = cos
            timings[name] = time_ms(lambda fn=fn: fn(images))
    ours_name = "lra-kernels int8 (triton)"
    t = timings[ours_name]
    info = dict(
        kind="e2e",
        label=f"ViT-B-32 batch {batch}",
        ms=t,
        img_per_s=batch / t * 1e3,
        providers={n: {"ms": v, "img_per_s": batch / v * 1e3, "cosine_fp32": cosines[n], "ours_speedup": v / t} for n, v in timings.items()},
        unavailable=notes,
        vs_fp16=timings["open_clip fp16"] / t,
    )
    if batch == 256:
        info["target"] = f">= {TARGET_E2E_VS_FP16}x open_clip fp16"
        info["meets_target"] = info["vs_fp16"] >= TARGET_E2E_VS_FP16
    with torch.no_grad():
        record(benchmark, lambda: providers[ours_name](images), **info)
