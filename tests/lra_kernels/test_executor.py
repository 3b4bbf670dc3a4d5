"""The batched early-exit executor: ExitPolicy, set_classifier, classify, invariants, FLOPs."""

import pytest
import torch
import torch.nn.functional as F

from conftest import images_for, make_tower
from lra_kernels import ExitPolicy, QuantEarlyExitViT
from lra_kernels.flops import flops_model

DEPTH = 4
EXITS = (1, 2, 3)


@pytest.fixture(scope="module")
def qvit():
    torch.manual_seed(0)
    v = make_tower(layers=DEPTH)
    q = QuantEarlyExitViT.from_open_clip(v, compile_blocks=False)
    text = F.normalize(torch.randn(10, 32), dim=-1)
    q.set_classifier(text, logit_scale=50.0)
    return q


def policy(exits=EXITS, bias=0.0, weight=(4.0, 0.0, 0.0), threshold=0.5, head="patch_mean", mean=None, std=None):
    L = len(exits)
    return ExitPolicy(
        exit_layers=exits,
        weight=torch.tensor([weight] * L),
        bias=torch.full((L,), float(bias)),
        feature_mean=torch.zeros(L, 3) if mean is None else mean,
        feature_std=torch.ones(L, 3) if std is None else std,
        threshold=torch.full((L,), float(threshold)) if not isinstance(threshold, torch.Tensor) else threshold,
        head=head,
    )


def mixed_policy(qvit, images, fractions=(0.25, 0.3, 0.5), head="patch_mean"):
    """Thresholds on confidence chosen so that about ``fractions[j]`` of the rows still running leave at exit j."""
    res = qvit.all_exits(images, EXITS, head)
    mean, std = res.features.mean(1), res.features.std(1).clamp_min(1e-6)
    p = policy(threshold=torch.ones(3), mean=mean, std=std, head=head)
    remaining = torch.ones(images.shape[0], dtype=torch.bool)
    taus = []
    for j, frac in enumerate(fractions):
        s = p.gate_scores(j, res.features[j])[remaining]
        tau = torch.quantile(s, 1 - frac).item() if s.numel() else 1.0
        taus.append(tau)
        remaining &= p.gate_scores(j, res.features[j]) < tau
    return p.with_thresholds(taus)


# ---------------------------------------------------------------------- ExitPolicy
def test_policy_validation():
    with pytest.raises(ValueError, match="ascending"):
        policy(exits=(2, 1, 3))
    with pytest.raises(ValueError, match=">= 1"):
        policy(exits=(0, 1, 2))
    with pytest.raises(ValueError, match=r"weight must have shape \[3, 3\]"):
        ExitPolicy(EXITS, torch.zeros(3, 2), torch.zeros(3), torch.zeros(3, 3), torch.ones(3, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="feature_std"):
        policy(std=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="NaN"):
        policy(threshold=torch.tensor([0.5, float("nan"), 0.5]))
    with pytest.raises(ValueError, match="head"):
        policy(head="mean")
    d = ExitPolicy.disabled()
    assert not d.enabled and d.exit_layers == ()


def test_policy_must_fit_the_model(qvit):
    with pytest.raises(ValueError, match=r"1\.\.3"):
        qvit.exit_policy = policy(exits=(1, 4))
    with pytest.raises(TypeError, match="ExitPolicy"):
        qvit.exit_policy = {"exit_layers": (1,)}


def test_set_classifier_validation(qvit):
    with pytest.raises(ValueError, match=r"\[C, 32\]"):
        qvit.set_classifier(F.normalize(torch.randn(5, 16), dim=-1))
    with pytest.raises(ValueError, match="L2-normalised"):
        qvit.set_classifier(torch.randn(5, 32) * 3)
    with pytest.raises(TypeError, match="float tensor"):
        qvit.set_classifier(torch.ones(5, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="class names"):
        qvit.set_classifier(F.normalize(torch.randn(5, 32), dim=-1), class_names=["a"])
    fresh = QuantEarlyExitViT.from_open_clip(make_tower(), compile_blocks=False)
    with pytest.raises(RuntimeError, match="set_classifier"):
        fresh.classify(images_for(fresh, 2))


def test_exit_policy_keeps_its_own_tensors():
    """``ExitPolicy`` is immutable: changing the caller's tensors afterwards, in place, does not change it."""
    tau = torch.full((len(EXITS),), 0.5)
    mean = torch.zeros(len(EXITS), 3)
    p = policy(threshold=tau, mean=mean)
    tau.fill_(2.0)
    mean.fill_(7.0)
    assert torch.equal(p.threshold, torch.full((len(EXITS),), 0.5))
    assert torch.equal(p.feature_mean, torch.zeros(len(EXITS), 3))


def test_set_classifier_keeps_its_own_copy():
    """A later in-place change to the caller's tensor (a reused buffer) does not change the model's answers."""
    q = QuantEarlyExitViT.from_open_clip(make_tower(), compile_blocks=False)
    x = images_for(q, 3)
    text = F.normalize(torch.randn(6, 32), dim=-1)
    q.set_classifier(text)
    before = q.classify(x).logits
    text.copy_(F.normalize(torch.randn(6, 32), dim=-1))
    assert q.classifier.data_ptr() != text.data_ptr()
    assert torch.equal(q.classify(x).logits, before)


# ---------------------------------------------------------------------- invariants
def _classify(qvit, p, x, **kw):
    qvit.exit_policy = p
    try:
        return qvit.classify(x, **kw)
    finally:
        qvit.exit_policy = None


def test_disabled_policy_equals_full_depth_int8(qvit):
    x = images_for(qvit, 7)
    res = _classify(qvit, ExitPolicy.disabled(), x)
    full = qvit(x)
    z = full / full.norm(dim=-1, keepdim=True)
    assert torch.equal(res.embeddings, z)
    assert torch.equal(res.logits, 50.0 * qvit.ops().matmul_rows(z, qvit.classifier.t()))
    assert (res.exit_layer == DEPTH).all() and res.exit_layer.dtype == torch.int64


@pytest.mark.parametrize("case", ["none_leave", "all_leave_first", "mixed", "mixed_cls"])
def test_every_row_written_once_in_order_and_matches_all_exits(qvit, case):
    x = images_for(qvit, 23)
    head = "cls" if case == "mixed_cls" else "patch_mean"
    p = {
        "none_leave": policy(bias=-50.0),
        "all_leave_first": policy(bias=50.0),
    }.get(case) or mixed_policy(qvit, x, head=head)
    trace = []
    from lra_kernels.executor import run_early_exit

    qvit.exit_policy = p
    res = run_early_exit(qvit, x, p, qvit.classifier, qvit.logit_scale, trace=trace)
    qvit.exit_policy = None
    written = torch.cat([rows for _, rows in trace])
    assert torch.equal(written.sort().values, torch.arange(23)), "each row must be written exactly once"
    for layer, rows in trace:
        assert (res.exit_layer[rows] == layer).all()
    assert torch.isfinite(res.logits).all() and torch.isfinite(res.embeddings).all()
    expected_layers = {"none_leave": {DEPTH}, "all_leave_first": {1}}.get(case)
    if expected_layers is not None:
        assert set(res.exit_layer.tolist()) == expected_layers
    else:
        assert len(set(res.exit_layer.tolist())) >= 3, \
            f"mixed policy should spread exits, got {res.exit_layer.tolist()}"
    # Row i's result is the all-exits result at its exit layer, exactly.
    ref = qvit.all_exits(x, EXITS, head)
    slot = {layer: k for k, layer in enumerate(ref.layers)}
    for i in range(23):
        k = slot[int(res.exit_layer[i])]
        assert torch.equal(res.logits[i], ref.logits[k, i]) and torch.equal(res.embeddings[i], ref.embeddings[k, i])


def test_policy_argument_runs_that_policy_and_leaves_the_model_alone(qvit):
    x = images_for(qvit, 11)
    p = mixed_policy(qvit, x)
    assert not qvit.exit_policy.enabled
    res = qvit.classify(x, policy=p)
    assert not qvit.exit_policy.enabled, "classify(policy=...) must not change the model's policy"
    ref = _classify(qvit, p, x)
    assert torch.equal(res.exit_layer, ref.exit_layer) and torch.equal(res.logits, ref.logits)
    qvit.exit_policy = p
    try:
        full = qvit.classify(x, policy=ExitPolicy.disabled())
        assert (full.exit_layer == DEPTH).all() and qvit.exit_policy is p
    finally:
        qvit.exit_policy = None
    with pytest.raises(TypeError, match="policy must be an ExitPolicy"):
        qvit.classify(x, policy="fast")


def test_rows_do_not_depend_on_their_batch(qvit):
    x = images_for(qvit, 12, seed=4)
    p = mixed_policy(qvit, x)
    full = _classify(qvit, p, x)
    assert len(set(full.exit_layer.tolist())) >= 3
    perm = torch.randperm(12)
    shuffled = _classify(qvit, p, x[perm])
    assert torch.equal(shuffled.exit_layer, full.exit_layer[perm]) and torch.equal(shuffled.logits, full.logits[perm])
    for i in (0, 5, 11):
        alone = _classify(qvit, p, x[i : i + 1])
        assert alone.exit_layer.item() == full.exit_layer[i].item()
        assert torch.equal(alone.logits[0], full.logits[i]) and torch.equal(alone.embeddings[0], full.embeddings[i])
    mixed = _classify(qvit, p, torch.cat([x[3:8], images_for(qvit, 6, seed=9)]))
    assert torch.equal(mixed.logits[:5], full.logits[3:8]) and torch.equal(mixed.exit_layer[:5], full.exit_layer[3:8])


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nonfinite_image_never_exits_and_stays_local(qvit, poison):
    x = images_for(qvit, 6)
    p = policy(bias=50.0)  # everybody with finite features leaves at the first exit
    clean = _classify(qvit, p, x)
    x[3, 0, 1, 1] = poison
    res = _classify(qvit, p, x)
    assert res.exit_layer[3] == DEPTH
    keep = [0, 1, 2, 4, 5]
    assert torch.equal(res.logits[keep], clean.logits[keep])
    assert torch.equal(res.exit_layer[keep], clean.exit_layer[keep])


def test_empty_and_single(qvit):
    p = mixed_policy(qvit, images_for(qvit, 8))
    res = _classify(qvit, p, torch.zeros(0, 3, 32, 32))
    assert res.logits.shape == (0, 10) and res.embeddings.shape == (0, 32) and res.exit_layer.shape == (0,)
    one = _classify(qvit, p, images_for(qvit, 1))
    assert one.logits.shape == (1, 10) and 1 <= one.exit_layer.item() <= DEPTH


def test_return_gate(qvit):
    x = images_for(qvit, 9)
    p = mixed_policy(qvit, x)
    res = _classify(qvit, p, x, return_gate=True)
    assert res.gate_features.shape == (9, 3, 3) and res.gate_scores.shape == (9, 3)
    ref = qvit.all_exits(x, EXITS)
    for i in range(9):
        for j, layer in enumerate(EXITS):
            if layer <= res.exit_layer[i]:
                assert torch.equal(res.gate_features[i, j], ref.features[j, i])
                assert (res.gate_scores[i, j] >= p.threshold[j]) == (layer == res.exit_layer[i])
            else:
                assert torch.isnan(res.gate_scores[i, j])


def test_forward_with_early_exit_returns_normalised_exit_embeddings(qvit):
    x = images_for(qvit, 5)
    p = mixed_policy(qvit, images_for(qvit, 16))
    res = _classify(qvit, p, x)
    qvit.exit_policy = p
    try:
        emb = qvit(x)
    finally:
        qvit.exit_policy = None
    assert torch.equal(emb, res.embeddings)


def test_save_load_keeps_policy_and_classifier(qvit, tmp_path):
    x = images_for(qvit, 10)
    p = mixed_policy(qvit, x)
    qvit.exit_policy = p
    qvit.class_names = [f"class {i}" for i in range(10)]
    try:
        ref = qvit.classify(x)
        qvit.save(tmp_path / "m")
    finally:
        qvit.exit_policy, qvit.class_names = None, None
    r = QuantEarlyExitViT.load(tmp_path / "m")
    r.compile_blocks = False
    assert r.exit_policy.exit_layers == EXITS and torch.equal(r.exit_policy.threshold, p.threshold)
    assert r.class_names[3] == "class 3" and r.logit_scale == 50.0
    res = r.classify(x)
    assert torch.equal(res.logits, ref.logits) and torch.equal(res.exit_layer, ref.exit_layer)


def test_vit_b32_compiled_executor_invariants():
    from lra_ee.synthetic import random_tower

    q = QuantEarlyExitViT.from_open_clip(random_tower("ViT-B-32"), compile_blocks=True)
    q.set_classifier(F.normalize(torch.randn(20, 512, generator=torch.Generator().manual_seed(3)), dim=-1))
    x = torch.randn(10, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    res_all = q.all_exits(x, (8, 10, 11))
    mean, std = res_all.features.mean(1), res_all.features.std(1).clamp_min(1e-6)
    s = torch.sigmoid((res_all.features[:, :, 0] - mean[:, None, 0]) / std[:, None, 0] * 4)
    taus = [torch.quantile(s[0], 0.8).item(), torch.quantile(s[1], 0.6).item(), torch.quantile(s[2], 0.5).item()]
    p = ExitPolicy((8, 10, 11), torch.tensor([[4.0, 0, 0]] * 3), torch.zeros(3), mean, std, torch.tensor(taus))
    q.exit_policy = p
    res = q.classify(x)
    assert len(set(res.exit_layer.tolist())) >= 2
    for i in (0, 7):
        alone = q.classify(x[i : i + 1])
        assert torch.equal(alone.logits[0], res.logits[i]) and alone.exit_layer.item() == res.exit_layer[i].item()
    q.exit_policy = None
    assert torch.equal(q.classify(x).embeddings, F.normalize(q(x), dim=-1))


# ---------------------------------------------------------------------- FLOPs
def test_flops_counts_by_hand():
    arch = QuantEarlyExitViT.from_open_clip(make_tower(layers=DEPTH), compile_blocks=False).arch
    fm = flops_model(arch, num_classes=10)
    T, D, H, C, E = 17, 64, 256, 10, 32
    gemm = 2 * T * D * 3 * D + 2 * T * D * D + 2 * T * D * H + 2 * T * H * D
    attn = 2 * 2 * T * T * D + 5 * 4 * T * T
    assert fm.block == gemm + attn + 2 * T * D * 5 + T * H * 8 + 2 * T * D
    assert fm.embed == 2 * 16 * 3 * 8 * 8 * D + T * D + T * D * 5
    assert fm.classifier == 2 * E * C
    layers = torch.tensor([1, 2, 3, DEPTH, DEPTH])
    per = fm.per_sample(layers, EXITS)
    head_gate = fm.exit_head + fm.gate
    expect = [fm.embed + 1 * fm.block + 1 * head_gate, fm.embed + 2 * fm.block + 2 * head_gate,
              fm.embed + 3 * fm.block + 3 * head_gate, fm.full() + 3 * head_gate, fm.full() + 3 * head_gate]
    assert per.tolist() == expect
    assert fm.per_sample(torch.tensor([DEPTH]), ()).item() == fm.full()
    assert fm.exit_head > fm.classifier and fm.gate > 0


def test_chunked_batches_equal_one_pass(qvit):
    """Large CPU batches run in cache-sized chunks; rows are batch-independent, so nothing changes."""
    x = images_for(qvit, 11)
    p = mixed_policy(qvit, x)
    qvit.exit_policy = p
    try:
        qvit.cpu_chunk_tokens = None
        one = (qvit(x), qvit.classify(x, return_gate=True), qvit.all_exits(x), qvit.hidden_states(x))
        qvit.cpu_chunk_tokens = 3 * qvit.arch.num_tokens
        assert qvit.chunk_size() == 3
        chunked = (qvit(x), qvit.classify(x, return_gate=True), qvit.all_exits(x), qvit.hidden_states(x))
    finally:
        qvit.exit_policy, qvit.cpu_chunk_tokens = None, 1600
    assert torch.equal(one[0], chunked[0])
    for name in ("logits", "embeddings", "exit_layer", "gate_scores"):
        assert torch.equal(getattr(one[1], name).nan_to_num(-1), getattr(chunked[1], name).nan_to_num(-1)), name
    assert torch.equal(one[2].logits, chunked[2].logits) and torch.equal(one[2].features, chunked[2].features)
    assert all(torch.equal(a, b) for a, b in zip(one[3], chunked[3]))
