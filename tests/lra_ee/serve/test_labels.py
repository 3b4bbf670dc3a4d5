"""``lra_ee.serve.labels`` and the core with per-request label sets: each item is scored against its own labels,
at full depth unless the policy is label-agnostic or the labels are the stored classifier; batches mix freely."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from lra_ee.gate import is_label_agnostic
from lra_ee.serve import core as serve_core
from lra_ee.serve import engines, labels
from lra_kernels import ExitPolicy
from serve_support import (
    CLASS_NAMES,
    DEPTH,
    _single,
    check_classify,
    check_embed,
    early_exit_clip,
    expected_answers,
    reference_text_features,
    tiny_clip,
    valid_images,
)

OTHER = ["a red kite", "an old map", "thunder", "a violin", "soup"]
TEMPLATES = ("a photo of {}.", "a drawing of {}", "{}")


@pytest.fixture(scope="module")
def corpus():
    return valid_images()


@pytest.fixture(scope="module")
def clip(corpus):
    return early_exit_clip(corpus)


@pytest.fixture(scope="module")
def agnostic_clip(corpus):
    return early_exit_clip(corpus, label_agnostic=True)


def _expected_with(clip, x, names, templates, policy=None):
    """The answer for image ``x`` alone against ``names`` (oracle: open_clip's text calls, the model's classify)."""
    q = clip.visual
    res = _single(lambda b: q.classify(b, policy=policy), x)
    text = reference_text_features(clip, names, templates)
    logits = float(clip.logit_scale.exp()) * F.normalize(res.embeddings.float(), dim=-1) @ text.t()
    return {"probs": torch.softmax(logits[0], -1), "exit_layer": int(res.exit_layer[0])}


def test_text_features_match_open_clip_and_are_cached(clip):
    engine = engines.ClipEngine(clip)
    bank = labels.LabelBank(engine, max_entries=6)
    ref = reference_text_features(clip, OTHER, TEMPLATES)
    got = bank.get(OTHER, TEMPLATES)
    torch.testing.assert_close(got.features, ref, atol=1e-5, rtol=0)
    assert got.stored is False and got.names == tuple(OTHER)
    assert bank.stats()["misses"] == len(OTHER) and bank.stats()["hits"] == 0
    engine.text_features = None  # every row is cached: the text tower must not run (calling None raises)
    again = bank.get(OTHER[::-1], TEMPLATES)
    torch.testing.assert_close(again.features, got.features.flip(0), atol=0, rtol=0)
    assert bank.stats()["hits"] == len(OTHER)
    del engine.text_features
    bank.get(["x1", "x2"], TEMPLATES)  # 7 rows for 6 places: the least recently used leaves
    assert len(bank) == 6
    stored = bank.get(CLASS_NAMES)
    assert stored.stored is True, "the stored classifier's labels and templates must be recognised"
    assert bank.get(CLASS_NAMES, TEMPLATES).stored is False


def test_label_agnostic_needs_the_flag_and_zero_classifier_weights(clip, agnostic_clip):
    assert not is_label_agnostic(clip.visual.exit_policy)
    p = agnostic_clip.visual.exit_policy
    assert is_label_agnostic(p)
    import dataclasses

    assert not is_label_agnostic(dataclasses.replace(p, meta={}))
    w = p.weight.clone()
    w[0, 0] = 0.5  # a flag that lies: confidence is read
    assert not is_label_agnostic(dataclasses.replace(p, weight=w))
    assert not is_label_agnostic(ExitPolicy.disabled())


def test_mixed_batch_each_item_against_its_own_labels(clip, corpus):
    """Raw embed / classify items and items with two foreign label sets and with the stored labels, shuffled in
    one batch: each equals the model's answer for that image alone; foreign labels run at full depth."""
    engine = engines.ClipEngine(clip)
    core = serve_core.InferenceCore(engine)
    images = [core.prepare(b) for _, b in corpus]
    plain = expected_answers(clip.visual, corpus)
    sets = {"other": core.labels.get(OTHER, TEMPLATES), "few": core.labels.get(OTHER[:2]),
            "stored": core.labels.get(CLASS_NAMES)}
    jobs = [(kind, i) for i in range(len(images)) for kind in ("embed", "classify", "other", "few", "stored")]
    random.Random(0).shuffle(jobs)
    items = [(k, images[i]) if k in ("embed", "classify") else ("classify", images[i], sets[k]) for k, i in jobs]
    results = core.run_batch(items)
    full = ExitPolicy.disabled()
    for (kind, i), r in zip(jobs, results):
        assert r.status == 200
        if kind == "embed":
            check_embed(r.body, plain[i])
        elif kind in ("classify", "stored"):  # the stored labels: the early-exit answer, exactly
            check_classify(r.body, plain[i])
        else:
            names = OTHER if kind == "other" else OTHER[:2]
            exp = _expected_with(clip, images[i], names, TEMPLATES if kind == "other" else ("{}",), full)
            assert r.body["exit_layer"] == DEPTH
            check_classify(r.body, exp, names=names, prob_atol=1e-5)
    assert len({p["exit_layer"] for p in plain}) >= 3
    assert core.stats()["batches"] == 1


def test_label_agnostic_policy_exits_with_foreign_labels(agnostic_clip, corpus):
    engine = engines.ClipEngine(agnostic_clip)
    core = serve_core.InferenceCore(engine)
    assert labels.per_request_labels(engine) == "early_exit"
    images = [core.prepare(b) for _, b in corpus]
    ls = core.labels.get(OTHER, TEMPLATES)
    results = core.run_batch([("classify", x, ls) for x in images])
    layers = []
    for x, r in zip(images, results):
        exp = _expected_with(agnostic_clip, x, OTHER, TEMPLATES)
        check_classify(r.body, exp, names=OTHER, prob_atol=1e-5)
        layers.append(r.body["exit_layer"])
    assert len(set(layers)) >= 3, f"a label-agnostic policy should still exit early: {layers}"


def test_fp32_open_clip_serves_labels_at_full_depth(corpus):
    clip = tiny_clip()
    engine = engines.as_engine(clip)
    assert isinstance(engine, engines.ClipEngine) and labels.per_request_labels(engine) == "full_depth"
    core = serve_core.InferenceCore(engine)
    x = core.prepare(corpus[0][1])
    res = core.run_batch([("classify", x, core.labels.get(OTHER)), ("embed", x)])
    with torch.no_grad():
        emb = _single(clip.visual, x)
    text = reference_text_features(clip, OTHER)
    probs = torch.softmax(float(clip.logit_scale.exp()) * F.normalize(emb, dim=-1)[0] @ text.t(), -1)
    check_classify(res[0].body, {"probs": probs, "exit_layer": DEPTH}, names=OTHER, prob_atol=1e-5)
    torch.testing.assert_close(torch.tensor(res[1].body["embedding"]), emb[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="without a classifier"):
        core.run_batch([("classify", x)])


def test_engine_rejects_a_model_without_a_text_tower():
    with pytest.raises(TypeError, match="encode_text"):
        engines.ClipEngine(torch.nn.Linear(2, 2))


def test_a_saved_quant_clip_directory_serves_as_a_clip_engine(clip, corpus, tmp_path):
    path = clip.save(tmp_path / "clip")
    engine = engines.load_engine(path, compile_blocks=False)
    assert isinstance(engine, engines.ClipEngine) and isinstance(engine.image, engines.QuantEngine)
    assert engine.image.model.compile_blocks is False
    assert engine.describe()["text_tower"] is True and engine.describe()["early_exit"] is True
    core, ref = serve_core.InferenceCore(engine), serve_core.InferenceCore(engines.ClipEngine(clip))
    x = core.prepare(corpus[1][1])
    for c in (core, ref):
        c.answers = c.run_batch([("classify", x, c.labels.get(OTHER, TEMPLATES)), ("classify", x), ("embed", x)])
    assert [r.body for r in core.answers] == [r.body for r in ref.answers]
    assert engines.load_engine(path).describe()["model"].startswith("QuantCLIP")
