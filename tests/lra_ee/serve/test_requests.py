"""``lra_ee.serve.requests``: JSON bodies (base64 images, several images, per-request labels, /embed_text) are
bounded with 400s naming the limit, and over real HTTP each answer equals the model's for that image and label
set alone, with requests of different label sets batched together (server tests skipped without ``ray[serve]``)."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from lra_ee.serve import deployment, engines
from lra_ee.serve import requests as rq
from lra_kernels import ExitPolicy
from serve_support import (
    CLASS_NAMES,
    DEPTH,
    _free_port,
    _single,
    as_tensor,
    b64,
    build_qvit,
    check_classify,
    check_embed,
    early_exit_clip,
    expected_answers,
    http,
    http_json,
    reference_text_features,
    valid_images,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 8
LABEL_SETS = [["a red kite", "an old map", "thunder"], ["soup", "a violin"], ["a dog", "a cat", "a car", "rain"]]


def _body(**fields) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize("endpoint,fields,message", [
    ("classify", {}, 'either "image"'),
    ("classify", {"image": b64(PNG), "images": [b64(PNG)]}, 'either "image"'),
    ("classify", {"image": "not base64!"}, "image is not valid base64"),
    ("classify", {"image": 3}, "image must be a base64 string"),
    ("classify", {"image": ""}, "image is empty"),
    ("embed", {"images": [b64(PNG), "%%%"]}, "images[1] is not valid base64"),
    ("embed", {"images": []}, "non-empty list"),
    ("embed", {"images": [b64(PNG)] * (rq.MAX_IMAGES + 1)}, f"limit of {rq.MAX_IMAGES}"),
    ("embed", {"image": b64(PNG), "labels": ["a"]}, "unknown field(s) ['labels']"),
    ("classify", {"image": b64(PNG), "labels": []}, "labels must not be empty"),
    ("classify", {"image": b64(PNG), "labels": "cat"}, "labels must be a list of strings"),
    ("classify", {"image": b64(PNG), "labels": ["cat", 7]}, "labels[1] must be a string"),
    ("classify", {"image": b64(PNG), "labels": ["cat", " "]}, "labels[1] is empty"),
    ("classify", {"image": b64(PNG), "labels": ["cat", "cat"]}, "distinct"),
    ("classify", {"image": b64(PNG), "labels": ["x"] * 0 + [str(i) for i in range(rq.MAX_LABELS + 1)]},
     f"limit of {rq.MAX_LABELS}"),
    ("classify", {"image": b64(PNG), "labels": ["c" * (rq.MAX_TEXT_CHARS + 1)]}, f"limit of {rq.MAX_TEXT_CHARS}"),
    ("classify", {"image": b64(PNG), "templates": ["{}"]}, '"templates" needs "labels"'),
    ("classify", {"image": b64(PNG), "labels": ["a"], "templates": ["a photo"]}, "exactly one '{}'"),
    ("classify", {"image": b64(PNG), "labels": ["a"], "templates": ["{} {}"]}, "exactly one '{}'"),
    ("classify", {"image": b64(PNG), "labels": ["a"], "templates": ["{0} of {}"]}, "no other braces"),
    ("classify", {"image": b64(PNG), "labels": [str(i) for i in range(1000)], "templates": [f"{i} {{}}" for i in
                                                                                               range(21)]},
     f"limit of {rq.MAX_PROMPTS}"),
    ("embed_text", {}, '{"texts"'),
    ("embed_text", {"texts": ["ok"] * (rq.MAX_TEXTS + 1)}, f"limit of {rq.MAX_TEXTS}"),
    ("nowhere", {"texts": ["a"]}, "no JSON endpoint"),
])
def test_bad_json_bodies_name_the_field_and_limit(endpoint, fields, message):
    with pytest.raises(rq.BadRequest) as err:
        rq.parse(endpoint, _body(**fields))
    assert message in str(err.value)


@pytest.mark.parametrize("body,message", [(b"{not json", "not valid JSON"), (b"[1, 2]", "must be an object"),
                                          (b"{\xff}", "not valid JSON")])
def test_non_json_is_rejected(body, message):
    with pytest.raises(rq.BadRequest, match=message):
        rq.parse("classify", body)


def test_parse_accepts_data_urls_and_lists():
    req = rq.parse("classify", _body(images=["data:image/png;base64," + b64(PNG), b64(PNG)], labels=["a", "b"],
                                     templates=["a photo of {}", "{}"]))
    assert req.images == (PNG, PNG) and not req.single
    assert req.labels == ("a", "b") and req.templates == ("a photo of {}", "{}")
    assert rq.parse("embed", _body(image=b64(PNG))).single
    assert rq.parse("embed_text", _body(texts=["a b", "c"])).texts == ("a b", "c")
    assert rq.looks_like_json("application/json; charset=utf-8", b"") and rq.looks_like_json(None, b'  {"a": 1}')
    assert not rq.looks_like_json("application/octet-stream", PNG)


# ---------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def corpus():
    return valid_images()


@pytest.fixture(scope="module")
def clip(corpus):
    return early_exit_clip(corpus)


@pytest.fixture(scope="module")
def server(clip, corpus, tmp_path_factory):
    """The saved QuantCLIP (INT8 early-exit visual, INT8 text tower) at ``/``, an image-only model at ``/image``."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    model_dir = clip.save(tmp_path_factory.mktemp("served") / "clip")
    assert isinstance(engines.load_engine(model_dir), engines.ClipEngine)
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        app = deployment.build_app(str(model_dir), max_batch_size=8, batch_wait_ms=20, num_cpus=1,
                                   compile_blocks=False)
        deployment.start(app, host="127.0.0.1", port=port)
        image_only = deployment.build_app(build_qvit(corpus), max_batch_size=4, num_cpus=1, name="ImageOnly")
        serve.run(image_only, name="image", route_prefix="/image")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _labelled(clip, body, names):
    """The answer for one image against ``names`` alone: full depth (the test policy reads the classifier)."""
    res = _single(lambda b: clip.visual.classify(b, policy=ExitPolicy.disabled()), as_tensor(body))
    text = reference_text_features(clip, names)
    logits = float(clip.logit_scale.exp()) * F.normalize(res.embeddings, dim=-1) @ text.t()
    return {"probs": torch.softmax(logits[0], -1), "exit_layer": DEPTH}


def test_healthz_reports_the_text_tower(server):
    status, body = http("GET", server + "/healthz")
    assert status == 200 and body["text_tower"] is True and body["per_request_labels"] == "full_depth"
    status, body = http("GET", server + "/image/healthz")
    assert status == 200 and body["per_request_labels"] is None


def test_concurrent_label_sets_batch_together(server, clip, corpus):
    """Raw bodies, base64 bodies with the stored classifier, and three label sets, from 8 threads: each answer
    equals the model's for that image and label set alone; requests of different label sets share batches."""
    plain = expected_answers(clip.visual, corpus)
    jobs = [(kind, i) for i in range(len(corpus)) for kind in ("raw", "b64", 0, 1, 2)]
    random.Random(0).shuffle(jobs)

    def send(job):
        kind, i = job
        body = corpus[i][1]
        if kind == "raw":
            return http("POST", server + "/classify", body)
        if kind == "b64":
            return http_json("POST", server + "/classify", {"image": b64(body)})
        return http_json("POST", server + "/classify", {"image": b64(body), "labels": LABEL_SETS[kind]})

    _, before = http("GET", server + "/healthz")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, jobs, timeout=180))
    for (kind, i), (status, body) in zip(jobs, answers):
        assert status == 200, (kind, i, body)
        if kind in ("raw", "b64"):
            check_classify(body, plain[i])
        else:
            check_classify(body, _labelled(clip, corpus[i][1], LABEL_SETS[kind]), names=LABEL_SETS[kind],
                           prob_atol=1e-5)
    _, after = http("GET", server + "/healthz")
    assert after["replica"]["images"] - before["replica"]["images"] == len(jobs)
    assert after["replica"]["max_batch_size_seen"] > 1, after["replica"]
    cache = after["replica"]["label_cache"]
    assert cache["entries"] == sum(map(len, LABEL_SETS)) and cache["hits"] > 0


def test_batch_embed_and_embed_text(server, clip, corpus):
    plain = expected_answers(clip.visual, corpus)
    status, body = http_json("POST", server + "/embed", {"images": [b64(b) for _, b in corpus[:5]]})
    assert status == 200 and len(body["results"]) == 5
    for answer, expected in zip(body["results"], plain[:5]):
        check_embed(answer, expected)
    status, body = http_json("POST", server + "/embed", {"image": b64(corpus[3][1])})
    assert status == 200
    check_embed(body, plain[3])
    status, body = http_json("POST", server + "/classify", {"images": [b64(b) for _, b in corpus[:3]],
                                                            "labels": CLASS_NAMES})
    assert status == 200
    for answer, expected in zip(body["results"], plain[:3]):  # the stored labels keep early exit
        check_classify(answer, expected)
    texts = ["a photo of a cat", "Ünïcode text, with punctuation!", "x"]
    status, body = http_json("POST", server + "/embed_text", {"texts": texts})
    assert status == 200
    torch.testing.assert_close(torch.tensor(body["embeddings"]), reference_text_features(clip, texts), atol=1e-5,
                               rtol=0)


def test_json_errors(server, corpus):
    good, bad = b64(corpus[0][1]), b64(b"\x89PNG\r\n\x1a\n broken")
    status, body = http_json("POST", server + "/embed", {"images": [good, bad]})
    assert status == 400 and body["error"].startswith("images[1]: ") and "PNG" in body["error"]
    status, body = http_json("POST", server + "/classify", {"image": "@@@", "labels": ["a"]})
    assert status == 400 and "not valid base64" in body["error"]
    status, body = http_json("POST", server + "/classify", {"image": good, "labels": ["a"] * 2})
    assert status == 400 and "distinct" in body["error"]
    status, body = http_json("POST", server + "/embed_text", b"raw text")
    assert status == 400 and "not valid JSON" in body["error"]
    status, body = http_json("POST", server + "/embed", b'{"images": [')
    assert status == 400 and "not valid JSON" in body["error"]
    status, body = http_json("POST", server + "/image/classify", {"image": good, "labels": ["a", "b"]})
    assert status == 400 and "no text tower" in body["error"]
    status, body = http_json("POST", server + "/image/embed_text", {"texts": ["a"]})
    assert status == 400 and "no text tower" in body["error"]
    status, body = http("GET", server + "/embed_text")
    assert status == 405 and "JSON" in body["error"]
