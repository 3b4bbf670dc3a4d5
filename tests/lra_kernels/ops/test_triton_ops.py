"""The ``"triton"`` backend as a whole: its namespace, and a tiny ViT end to end against ``"torch"``.

Without a GPU everything runs in Triton's interpreter on CPU tensors (slow: tiny towers only).
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import cosine, images_for, make_tower
from kernel_checks import DEVICE, gpu, ignore_fp_warnings
from lra_kernels import QuantEarlyExitViT
from lra_kernels.backend import TORCH_OPS, get_ops
from lra_kernels.ops.triton_ops import triton_ops


def test_namespace_has_the_torch_backends_fields():
    ops = triton_ops()
    assert ops is triton_ops() is get_ops("triton")  # cached
    assert set(vars(ops)) == set(vars(TORCH_OPS))
    assert ops.name == "triton"
    for name, fn in vars(ops).items():
        if callable(fn) and name not in ("attention", "matmul_rows", "quantize_paper"):  # shared with torch
            assert fn.__module__.startswith("lra_kernels.kernels."), name
            assert fn is not getattr(TORCH_OPS, name), name


# Both backends run the model's activation dtype (fp32 on CPU, fp16 on CUDA by default): on CUDA
# end-to-end agreement is then bounded by fp16 activations, not by the kernels.
COSINE_FLOOR = 0.9999 if DEVICE.type == "cpu" else 0.9995


def _recording(ops):
    """A copy of ``ops`` whose ``int8_gemm`` records the codes and scales it is handed."""
    seen = []

    def int8_gemm(q, w, x_scale, *args, **kwargs):
        seen.append((q.clone(), x_scale.clone()))
        return ops.int8_gemm(q, w, x_scale, *args, **kwargs)

    return SimpleNamespace(**{**vars(ops), "int8_gemm": int8_gemm}), seen


def _pair(act_quant="per_token", act="gelu", **kwargs):
    v = make_tower(act=act)
    if act_quant == "per_tensor_static" or kwargs.get("smooth_alpha") is not None:
        kwargs["calibration_images"] = images_for(v, 8, seed=5)
    ref = QuantEarlyExitViT.from_open_clip(v, act_quant=act_quant, backend="torch", compile_blocks=False, **kwargs)
    tri = QuantEarlyExitViT.from_open_clip(v, act_quant=act_quant, backend="triton", **kwargs)
    return v, ref.to(DEVICE), tri.to(DEVICE)


SCHEMES = {
    "per_token": ("per_token", "gelu", {}),
    "per_token-quick_gelu-smooth": ("per_token", "quick_gelu", {"smooth_alpha": 0.5}),
    "per_token-int8_patch_embed": ("per_token", "gelu", {"int8_patch_embed": True}),
    "per_tensor_static": ("per_tensor_static", "gelu", {}),
    "paper": ("paper", "gelu", {}),
}


@ignore_fp_warnings
@pytest.mark.parametrize("act_quant,act,kwargs", SCHEMES.values(), ids=SCHEMES.keys())
def test_tiny_vit_end_to_end_matches_torch_backend(act_quant, act, kwargs):
    v, ref, tri = _pair(act_quant, act, **kwargs)
    assert tri.resolved_backend == "triton" and tri.ops() is triton_ops()
    images = images_for(v, 3).to(DEVICE)
    y_ref, y_tri = ref(images), tri(images)
    assert y_tri.shape == y_ref.shape and y_tri.dtype == y_ref.dtype
    assert cosine(y_ref, y_tri).min().item() > COSINE_FLOOR
    # and against the FP32 open_clip tower, as loosely as the torch backend itself
    with torch.no_grad():
        y_fp = v.to(DEVICE)(images)
    assert cosine(y_fp, y_tri).min().item() > cosine(y_fp, y_ref).min().item() - 1e-3


@ignore_fp_warnings
@pytest.mark.parametrize("act_quant", ("per_token", "per_tensor_static", "paper"))
def test_int8_codes_match_block_by_block(act_quant):
    """Fed the same tokens, each block hands its GEMMs the same INT8 codes on both backends.

    Exceptions allowed: a code may differ by one where the float value it rounds sits within an
    ulp or so of a rounding boundary (LayerNorm and GELU round differently by an ulp); those are
    rare (< 0.1%). The per-tensor scheme's codes of the first GEMM need no LayerNorm: exact.
    """
    v, ref, tri = _pair(act_quant)
    ops_tri, seen_tri = _recording(tri.ops())
    ops_ref, seen_ref = _recording(ref.ops())
    assert ref.act_dtype == tri.act_dtype  # same activation precision on both
    images = images_for(v, 2).to(DEVICE)
    x = ref.embed(images, ops_ref)
    seen_ref.clear()  # the INT8 patch embedding's GEMM; only the blocks' are compared here
    for i in range(ref.depth):
        y_ref = ref.run_block(i, x, ops_ref)
        y_tri = tri.run_block(i, x, ops_tri)
        assert cosine(y_ref.flatten(1), y_tri.flatten(1)).min().item() > 0.99999
        x = y_ref
    int8_gemms = 2 if act_quant == "paper" else 4  # the paper's scheme leaves attention in float
    assert len(seen_ref) == len(seen_tri) == int8_gemms * ref.depth
    n_diff = n_all = 0
    for (q_r, s_r), (q_t, s_t) in zip(seen_ref, seen_tri):
        diff = (q_r.int() - q_t.int()).abs()
        assert diff.max().item() <= 1
        n_diff, n_all = n_diff + (diff > 0).sum().item(), n_all + diff.numel()
        torch.testing.assert_close(s_t, s_r, atol=0, rtol=1e-5)
    assert n_diff <= 1e-3 * n_all, f"{n_diff} of {n_all} codes differ"


@ignore_fp_warnings
def test_exit_heads_and_gate_features_through_the_model():
    from lra_kernels import ExitPolicy

    v, ref, tri = _pair()
    text = F.normalize(torch.randn(7, ref.output_dim), dim=-1)
    for m in (ref, tri):
        m.set_classifier(text.to(DEVICE), logit_scale=50.0)
    images = images_for(v, 4).to(DEVICE)
    a, b = ref.all_exits(images, (1, 2)), tri.all_exits(images, (1, 2))
    assert a.layers == b.layers
    loose = 1 if DEVICE.type == "cpu" else 10  # fp16 attention on CUDA
    torch.testing.assert_close(b.logits, a.logits, atol=2e-3 * loose, rtol=1e-3 * loose)
    torch.testing.assert_close(b.embeddings, a.embeddings, atol=1e-4 * loose, rtol=1e-3 * loose)
    torch.testing.assert_close(b.features, a.features, atol=1e-4 * loose, rtol=1e-3 * loose)
    # early exit with everyone leaving at the first exit: same results, same layer
    policy = ExitPolicy(
        exit_layers=(1,),
        weight=torch.zeros(1, 3),
        bias=torch.full((1,), 5.0),
        feature_mean=torch.zeros(1, 3),
        feature_std=torch.ones(1, 3),
        threshold=torch.full((1,), 0.5),
    )
    ref.exit_policy, tri.exit_policy = policy, policy
    ra, rb = ref.classify(images), tri.classify(images)
    assert torch.equal(ra.exit_layer.cpu(), rb.exit_layer.cpu()) and (rb.exit_layer == 1).all()
    torch.testing.assert_close(rb.logits, ra.logits, atol=2e-3 * loose, rtol=1e-3 * loose)


@gpu
def test_auto_backend_runs_triton_on_cuda():
    v = make_tower()
    q = QuantEarlyExitViT.from_open_clip(v, backend="auto").cuda()
    assert q.resolved_backend == "triton" and q.ops() is triton_ops()
    images = images_for(v, 4).cuda()
    ref = QuantEarlyExitViT.from_open_clip(v, backend="torch").cuda()
    assert cosine(q(images), ref(images)).min().item() > 0.999


@gpu
def test_vit_b_32_on_gpu_matches_torch_backend():
    open_clip = pytest.importorskip("open_clip")
    clip = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    images = torch.randn(8, 3, 224, 224, device="cuda")
    tri = QuantEarlyExitViT.from_open_clip(clip.visual, backend="triton").cuda()
    ref = QuantEarlyExitViT.from_open_clip(clip.visual, backend="torch").cuda()
    assert cosine(tri(images), ref(images)).min().item() > 0.999


def _compile_check(*args):
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia.compiler")
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "compile_check.py"), *args, "--jobs", "2"],
                          capture_output=True, text=True, timeout=600, cwd=root)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas in this Triton install")
    return proc


def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter does not compile: lower one variant of each kernel (both INT8 GEMMs) to sm_90 through
    ptxas and read the cubin (``scripts/compile_check.py``; without ``--quick`` it covers every variant the
    package launches): wgmma, 16-byte cp.async or TMA operand loads, no spills, shared memory within the SM."""
    proc = _compile_check("--quick")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 variants compiled, all fine" in proc.stdout
    gemm = [line for line in proc.stdout.splitlines() if " int8_gemm " in line]
    assert len(gemm) == 2 and all("IGMMA=" in line for line in gemm)
    assert any("tma=" in line and "UTMALDG=" in line for line in gemm)  # the persistent kernel
    assert any("cp.async=" in line and "x[16]B" in line for line in gemm)  # the tiled kernel


def test_compile_check_flags_known_bad_variants():
    """Each check fires on a variant built to fail it: an N-major weight (operand through registers), a
    strided q (byte loads), a 32-row tile (no wgmma), a spilling epilogue, a false CTA claim, too much smem."""
    proc = _compile_check("--self-test")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 known-bad variants, all flagged" in proc.stdout
