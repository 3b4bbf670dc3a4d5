"""CUDA graphs per batch bucket (``lra_kernels.cuda_graphs``) and the host synchronisations of classify.

On CPU the graphs run eagerly (``capture=False``) over the same static buffers, zero padding and
segments, so these tests check everything but the replay itself: padded batches give the eager
executor's results bit for bit, compaction between segments, recapture on a new classifier, at most
one host synchronisation per exit point. The replay is checked on CUDA (``gpu``-marked tests).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import images_for, make_tower
from kernel_checks import DEVICE, gpu, ignore_fp_warnings
from lra_kernels import ExitPolicy, QuantEarlyExitViT
from lra_kernels.cuda_graphs import GraphedViT
from lra_kernels.executor import run_early_exit

EXITS = (1, 2, 3)
# ops that make the host wait for the device (an .item()/int(), data-dependent shapes)
SYNC_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "item", "equal", "masked_select")


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _model(backend="torch", layers=4, act_quant="per_token", **kw):
    v = make_tower(layers=layers)
    if act_quant == "per_tensor_static":
        kw["calibration_images"] = images_for(v, 8, seed=5)
    q = QuantEarlyExitViT.from_open_clip(v, backend=backend, act_quant=act_quant, compile_blocks=False, **kw)
    q = q.to(DEVICE)
    text = F.normalize(torch.randn(7, q.output_dim, generator=torch.Generator().manual_seed(3)), dim=-1)
    q.set_classifier(text.to(DEVICE), logit_scale=50.0)
    return v, q


def _mixed_policy(q, images, exits=EXITS):
    """Thresholds at the confidence quantiles: some rows leave at every exit, some run the full depth."""
    res = q.all_exits(images, exits)
    L = len(exits)
    mean, std = res.features.mean(1).cpu(), res.features.std(1).clamp_min(1e-6).cpu()
    p = ExitPolicy(exits, torch.tensor([[4.0, 0.0, 0.0]] * L), torch.zeros(L), mean, std, torch.ones(L))
    taus = [torch.quantile(p.gate_scores(j, res.features[j].cpu()), 0.75).item() for j in range(L)]
    return p.with_thresholds(taus)


def _assert_same(a, b):
    for name in ("logits", "embeddings", "exit_layer", "gate_features", "gate_scores"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num()), name


@ignore_fp_warnings
@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_padded_segments_give_the_executors_results(backend):
    v, q = _model(backend, layers=4 if backend == "torch" else 3)
    exits = EXITS if backend == "torch" else (1, 2)
    images = images_for(v, 11).to(DEVICE)
    q.exit_policy = _mixed_policy(q, images, exits)
    eager = run_early_exit(q, images, q.exit_policy, q.classifier, q.logit_scale, return_gate=True)
    assert len(set(eager.exit_layer.tolist())) >= 3  # rows leave at several exits and run the full depth
    graphs = q.enable_cuda_graphs(buckets=(1, 4, 8, 16), capture=False)
    res = q.classify(images, return_gate=True)
    _assert_same(res, eager)
    # each compacted batch ran in its own bucket: segments (kind, start, end, exit, bucket)
    assert all(key[-1] in (1, 4, 8, 16) for key in graphs._segments) and any(key[-1] < 16 for key in graphs._segments)
    # forward: full depth, padded
    y = q(images)
    q.cuda_graphs = None
    torch.testing.assert_close(y, q(images), atol=0, rtol=0)


@ignore_fp_warnings
def test_batches_beyond_the_largest_bucket_run_in_chunks():
    v, q = _model()
    images = images_for(v, 10).to(DEVICE)
    q.exit_policy = _mixed_policy(q, images)
    eager = q.classify(images)
    plain = q(images)
    q.enable_cuda_graphs(buckets=(2, 4), capture=False)
    _assert_same(q.classify(images), eager)
    assert torch.equal(q(images), plain)
    assert q(images[:0]).shape == (0, q.output_dim)


@ignore_fp_warnings
def test_disabled_policy_and_no_one_leaving():
    v, q = _model()
    images = images_for(v, 5).to(DEVICE)
    ref = q.classify(images)  # policy disabled: the final segment from the images
    graphs = q.enable_cuda_graphs(buckets=(8,), capture=False)
    _assert_same(q.classify(images), ref)
    never = ExitPolicy(EXITS, torch.zeros(3, 3), torch.zeros(3), torch.zeros(3, 3), torch.ones(3, 3),
                       torch.full((3,), 2.0))  # thresholds > 1: nobody leaves, no compaction
    q.exit_policy = never
    res = q.classify(images)
    assert (res.exit_layer == q.depth).all()
    q.cuda_graphs = None
    _assert_same(res, q.classify(images))
    assert graphs.captures >= 2


@ignore_fp_warnings
def test_new_classifier_or_policy_drops_the_graphs():
    v, q = _model()
    images = images_for(v, 6).to(DEVICE)
    graphs = q.enable_cuda_graphs(buckets=(8,), capture=False)
    first = q.classify(images)
    n = graphs.captures
    q.classify(images)
    assert graphs.captures == n  # reused
    text = F.normalize(torch.randn(5, q.output_dim, generator=torch.Generator().manual_seed(9)), dim=-1)
    q.set_classifier(text.to(DEVICE), logit_scale=20.0)
    second = q.classify(images)
    assert graphs.captures > n and second.logits.shape == (6, 5) and not torch.equal(second.embeddings, first.logits)
    q.cuda_graphs = None
    _assert_same(second, q.classify(images))


def test_paper_scheme_never_runs_in_graphs():
    v, q = _model(act_quant="paper")
    graphs = q.enable_cuda_graphs(capture=False)
    images = images_for(v, 3).to(DEVICE)
    assert not graphs.usable(images)
    q(images)
    assert graphs.captures == 0
    with pytest.raises(ValueError, match="positive batch sizes"):
        GraphedViT(q, buckets=(0, 4))


@ignore_fp_warnings
def test_warmup_builds_every_segment_of_the_buckets():
    v, q = _model()
    images = images_for(v, 8).to(DEVICE)
    q.exit_policy = _mixed_policy(q, images)
    graphs = q.enable_cuda_graphs(buckets=(1, 2, 4, 8), capture=False)
    built = graphs.warmup((3, 8))  # buckets 4 and 8: pool + 3 exits + final each
    assert built == 2 * (1 + len(EXITS) + 1)
    assert graphs.warmup((8,)) == 0


@ignore_fp_warnings
@pytest.mark.parametrize("graphed", (False, True))
def test_at_most_one_host_sync_per_exit_point(graphed):
    v, q = _model()
    images = images_for(v, 9).to(DEVICE)
    q.exit_policy = _mixed_policy(q, images)
    if graphed:
        q.enable_cuda_graphs(buckets=(16,), capture=False)
    q.classify(images)  # first call: policy tensors made resident, graphs built
    with CountSyncs() as syncs:
        res = q.classify(images, return_gate=True)
    reached = len([layer for layer in EXITS if (res.exit_layer >= layer).any()])
    assert 1 <= syncs.count <= reached, syncs.count


@ignore_fp_warnings
def test_policy_tensors_stay_resident():
    # after the first call the executor reads the policy's device copies, never its host tensors again:
    # poisoning the host tensors changes nothing (a per-exit-point .to(device) would read them)
    v, q = _model()
    images = images_for(v, 9).to(DEVICE)
    policy = _mixed_policy(q, images)
    q.exit_policy = policy
    ref = q.classify(images, return_gate=True)
    resident = policy.resident(DEVICE)
    assert policy.resident(DEVICE) is resident and all(t.device.type == DEVICE.type for t in resident.values())
    for name in ("weight", "bias", "feature_mean", "feature_std", "threshold"):
        object.__setattr__(policy, name, torch.full_like(getattr(policy, name), float("nan")))
    _assert_same(q.classify(images, return_gate=True), ref)


@gpu
def test_captured_graphs_replay_the_executor_on_gpu():
    v, q = _model(backend="triton")
    images = images_for(v, 11).cuda()
    q.exit_policy = _mixed_policy(q, images)
    eager, plain = q.classify(images, return_gate=True), q(images)
    graphs = q.enable_cuda_graphs(buckets=(1, 4, 16))
    assert graphs._capturing()
    for _ in range(2):  # capture, then replay
        res = q.classify(images, return_gate=True)
        assert torch.equal(res.exit_layer, eager.exit_layer)
        torch.testing.assert_close(res.logits, eager.logits, atol=1e-4, rtol=1e-4, equal_nan=True)
        torch.testing.assert_close(q(images), plain, atol=1e-4, rtol=1e-4)
    assert all(s.graph is not None for s in graphs._segments.values())
