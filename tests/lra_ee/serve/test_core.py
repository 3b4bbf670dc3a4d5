"""``lra_ee.serve.core``: the Ray-free batch core answers every item as the model does for that image alone."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from lra_ee.serve import core as serve_core
from lra_ee.serve import engines
from lra_kernels import QuantEarlyExitViT
from serve_support import (
    CLASS_NAMES,
    DEPTH,
    _single,
    build_qvit,
    check_classify,
    check_embed,
    expected_answers,
    tower,
    valid_images,
)


@pytest.fixture(scope="module")
def corpus():
    return valid_images()


@pytest.fixture(scope="module")
def qvit(corpus):
    return build_qvit(corpus)


def _mixed_items(core, corpus):
    items = [("classify" if i % 3 else "embed", core.prepare(body)) for i, (_, body) in enumerate(corpus)]
    random.Random(0).shuffle(items)
    return items


def test_core_early_exit_batch_equals_single_images(qvit, corpus):
    core = serve_core.InferenceCore(engines.QuantEngine(qvit))
    expected = expected_answers(qvit, corpus)
    images = [core.prepare(b) for _, b in corpus]
    order = list(range(len(corpus))) * 2
    random.Random(1).shuffle(order)
    kinds = ["embed" if k % 2 else "classify" for k in range(len(order))]
    results = core.run_batch([(kind, images[i]) for kind, i in zip(kinds, order)])
    assert len(results) == len(order)
    for r, kind, i in zip(results, kinds, order):
        assert r.status == 200
        (check_embed if kind == "embed" else check_classify)(r.body, expected[i])
    layers = {e["exit_layer"] for e in expected}
    assert len(layers) >= 3, f"the test policy should spread exits, got {layers}"
    st = core.stats()
    assert st["batches"] == 1 and st["images"] == len(order) and sum(st["exit_layers"].values()) == len(order)


def test_core_full_depth_embed_is_the_unnormalised_forward(qvit, corpus, tmp_path):
    """Classifier set but policy disabled: /embed = model(x) (full depth, unnormalised), a mixed
    batch takes two passes, /classify = classify(x)."""
    model = QuantEarlyExitViT.load(qvit.save(tmp_path / "m"))
    model.exit_policy = None
    model.compile_blocks = False
    core = serve_core.InferenceCore(engines.QuantEngine(model))
    expected = expected_answers(model, corpus)
    assert all(e["exit_layer"] == DEPTH for e in expected)
    assert any(abs(float(e["embedding"].norm()) - 1) > 1e-3 for e in expected)
    items = [("embed" if i % 2 else "classify", core.prepare(b)) for i, (_, b) in enumerate(corpus)]
    for i, r in enumerate(core.run_batch(items)):
        (check_embed if i % 2 else check_classify)(r.body, expected[i])
    model.clear_classifier()
    core = serve_core.InferenceCore(engines.QuantEngine(model))
    assert not core.has_classifier
    for i, r in enumerate(core.run_batch([("embed", x) for _, x in items])):
        check_embed(r.body, expected[i])
    with pytest.raises(RuntimeError, match="classifier"):
        core.run_batch(items)


def test_core_serves_plain_open_clip(corpus):
    visual = tower()
    text = F.normalize(torch.randn(len(CLASS_NAMES), 32), dim=-1)
    core = serve_core.InferenceCore(engines.OpenClipEngine(visual, text, logit_scale=100.0))
    items = _mixed_items(core, corpus)
    for (kind, x), r in zip(items, core.run_batch(items)):
        with torch.no_grad():
            emb = _single(visual, x)[0]
        probs = torch.softmax(100.0 * F.normalize(emb, dim=-1) @ text.t(), -1)
        expected = {"embedding": emb, "exit_layer": DEPTH, "probs": probs}
        if kind == "embed":
            got = torch.tensor(r.body["embedding"])
            torch.testing.assert_close(got, emb, atol=1e-5, rtol=1e-5)
            assert r.body["exit_layer"] == DEPTH
        else:
            # Plain open_clip is a float tower whose GEMMs block by batch size (MKL on Intel CPUs picks
            # other kernels for other M): an embedding moves by fp32 GEMM rounding, ~sqrt(K) * 6e-8
            # = 2e-6 relative at K = 768; x logit_scale 100 that is 2e-4 on a logit, and a softmax
            # probability moves by at most p(1 - p) * 2 * 2e-4 < 1e-4. (Our INT8 towers are
            # batch-independent by construction and keep 1e-6.)
            check_classify(r.body, expected, names=None, prob_atol=1e-4)
