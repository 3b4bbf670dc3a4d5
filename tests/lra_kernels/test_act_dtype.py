"""Activation dtype (``act_dtype``): every backend x dtype runs end to end, keeps its dtype through the
residual stream, stays close to FP32 open_clip, and is saved with the model.

The Triton backend runs in Triton's interpreter on CPU tensors here (tiny towers only).
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import cosine, images_for, make_tower
from kernel_checks import DEVICE, ignore_fp_warnings
from lra_kernels import ExitPolicy, QuantEarlyExitViT
from lra_kernels.hardware import cpu_caps, parse_act_dtype, resolve_act_dtype

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Mean cosine to the FP32 open_clip tower on the tiny random tower: INT8 alone gives 0.99998 there,
# with bf16 or fp16 activations 0.99997-0.99998 (measured); the floor leaves a 5x margin on the loss.
FLOOR = {torch.float32: 0.9999, torch.bfloat16: 0.9999, torch.float16: 0.9999}


def backends():
    from lra_kernels import cpu

    return ["torch", "triton"] + (["cpu"] if cpu.available() else [])


@pytest.fixture(scope="module")
def tower():
    return make_tower(layers=3)


def _policy():
    return ExitPolicy(exit_layers=(1, 2), weight=torch.tensor([[2.0, 1.0, 0.0]] * 2), bias=torch.zeros(2),
                      feature_mean=torch.zeros(2, 3), feature_std=torch.ones(2, 3), threshold=torch.tensor([0.7, 0.6]))


@ignore_fp_warnings
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", backends())
def test_every_backend_and_act_dtype_end_to_end(tower, backend, dtype):
    q = QuantEarlyExitViT.from_open_clip(tower, backend=backend, act_dtype=dtype, compile_blocks=False).to(DEVICE)
    assert q.act_dtype == dtype and f"act_dtype={str(dtype).replace('torch.', '')}" in repr(q)
    x = images_for(tower, 5).to(DEVICE)
    states = q.hidden_states(x)
    assert all(s.dtype == dtype for s in states), "the residual stream must stay in act_dtype"
    out = q(x)
    assert out.dtype == x.dtype and torch.isfinite(out).all()
    with torch.no_grad():
        ref = tower.to(DEVICE)(x)
    assert cosine(out, ref).mean() >= FLOOR[dtype]
    # the early-exit executor on the same plan: outputs fp32, rows independent of the batch
    text = F.normalize(torch.randn(6, q.output_dim, generator=torch.Generator().manual_seed(3)), dim=-1)
    q.set_classifier(text.to(DEVICE))
    q.exit_policy = _policy()
    res = q.classify(x, return_gate=True)
    assert res.logits.dtype == torch.float32 and res.embeddings.dtype == torch.float32
    assert torch.isfinite(res.logits).all() and ((res.exit_layer >= 1) & (res.exit_layer <= q.depth)).all()
    for i in (0, 3):
        alone = q.classify(x[i : i + 1])
        assert torch.equal(alone.exit_layer, res.exit_layer[i : i + 1])
        assert torch.equal(alone.logits, res.logits[i : i + 1])
    # what classify returns for a row that ran the full depth is the model's own head on it
    full = res.exit_layer == q.depth
    if full.any():
        torch.testing.assert_close(res.embeddings[full], F.normalize(out[full].float(), dim=-1), atol=1e-5, rtol=1e-5)


def test_act_dtype_is_saved_and_can_be_overridden(tmp_path, tower):
    q = QuantEarlyExitViT.from_open_clip(tower, act_dtype=torch.bfloat16, compile_blocks=False)
    q.save(tmp_path / "m")
    assert QuantEarlyExitViT.load(tmp_path / "m").act_dtype == torch.bfloat16
    assert QuantEarlyExitViT.load(tmp_path / "m", act_dtype=torch.float32).act_dtype == torch.float32
    auto = QuantEarlyExitViT.from_open_clip(tower, compile_blocks=False)
    auto.save(tmp_path / "a")
    loaded = QuantEarlyExitViT.load(tmp_path / "a")
    assert loaded.act_dtype_request == "auto" and loaded.act_dtype == auto.act_dtype


def test_default_act_dtype_per_device_and_backend():
    assert resolve_act_dtype(None, "cuda", "triton") == torch.float16
    assert resolve_act_dtype(None, "cpu", "torch") == torch.float32  # the reference backend
    assert resolve_act_dtype(None, "cpu", "cpu") == (torch.bfloat16 if cpu_caps().native_bf16 else torch.float32)
    assert resolve_act_dtype("bf16", "cuda", "triton") == torch.bfloat16
    assert resolve_act_dtype(torch.float32, "cuda", "triton") == torch.float32


@pytest.mark.parametrize("bad", [torch.int8, torch.float64, "float8", 3])
def test_bad_act_dtype_is_rejected(tower, bad):
    with pytest.raises(ValueError, match="act_dtype must be torch.float32, torch.bfloat16, torch.float16 or None"):
        parse_act_dtype(bad)
    with pytest.raises(ValueError, match="act_dtype must be"):
        QuantEarlyExitViT.from_open_clip(tower, act_dtype=bad)
