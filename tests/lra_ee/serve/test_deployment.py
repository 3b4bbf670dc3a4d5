"""``lra_ee.serve.deployment``: the real Ray Serve server under concurrent load (skipped without ``ray[serve]``).

Invariants: every response belongs to its own request and equals what the model gives for that
image alone (same open_clip preprocessing); corrupt bodies get 400 and leave the rest alone.
"""

from __future__ import annotations

import io
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from lra_ee.serve import decode, deployment, engines
from serve_support import (
    CLASS_NAMES,
    DEPTH,
    EXITS,
    _free_port,
    _single,
    build_qvit,
    check_classify,
    check_embed,
    corrupt_bodies,
    expected_answers,
    http,
    saved,
    tower,
    valid_images,
)


@pytest.fixture(scope="module")
def corpus():
    return valid_images()


@pytest.fixture(scope="module")
def qvit(corpus):
    return build_qvit(corpus)


@pytest.fixture(scope="module")
def model_dir(qvit, tmp_path_factory):
    return saved(qvit, tmp_path_factory)


def test_app_builder_for_serve_deploy_configs(model_dir):
    pytest.importorskip("ray.serve")
    from ray.serve.deployment import Application

    args = {"model_dir": str(model_dir), "max_batch_size": "32", "batch_wait_ms": "2.5", "compile_blocks": "false"}
    assert isinstance(deployment.app_builder(args), Application)
    with pytest.raises(ValueError, match="model_dir"):
        deployment.app_builder({})



@pytest.fixture(scope="module")
def server(model_dir):
    """``{"url", "plain_url", "plain_visual"}``: the saved early-exit model at ``/`` and a plain FP32
    open_clip tower without classifier at ``/plain``, on one Ray Serve HTTP proxy."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        app = deployment.build_app(str(model_dir), max_batch_size=8, batch_wait_ms=20, num_cpus=1, compile_blocks=False)
        deployment.start(app, host="127.0.0.1", port=port)
        plain_visual = tower()
        plain = deployment.build_app(engines.OpenClipEngine(plain_visual), max_batch_size=4, batch_wait_ms=5,
                                     num_cpus=1, name="Plain")
        serve.run(plain, name="plain", route_prefix="/plain")
        yield {"url": f"http://127.0.0.1:{port}", "plain_url": f"http://127.0.0.1:{port}/plain",
               "plain_visual": plain_visual}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_healthz(server):
    status, body = http("GET", server["url"] + "/healthz")
    assert status == 200 and body["status"] == "ok"
    assert body["depth"] == DEPTH and body["num_classes"] == len(CLASS_NAMES)
    assert body["early_exit"] is True and body["exit_layers"] == list(EXITS)
    assert body["max_batch_size"] == 8 and body["image_size"] == [32, 32]


def test_concurrent_mixed_requests_each_get_their_own_answer(server, qvit, corpus):
    """Valid images of every mode and corrupt bodies, both endpoints, from 8 threads: every answer
    equals the model's answer for that image alone; corrupt bodies get 400; batches form."""
    expected = expected_answers(qvit, corpus)
    bad = corrupt_bodies()
    jobs = [(ep, "ok", i) for i in range(len(corpus)) for ep in ("embed", "classify")] * 2
    jobs += [(ep, "bad", j) for j in range(len(bad)) for ep in ("embed", "classify")] * 2
    random.Random(0).shuffle(jobs)

    def send(job):
        ep, kind, i = job
        body = corpus[i][1] if kind == "ok" else bad[i][1]
        return http("POST", f"{server['url']}/{ep}", body)

    _, before = http("GET", server["url"] + "/healthz")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, jobs, timeout=120))
    for (ep, kind, i), (status, body) in zip(jobs, answers):
        if kind == "bad":
            assert status == 400 and set(body) == {"error"}, (bad[i][0], status, body)
            assert bad[i][2] in body["error"]
            continue
        assert status == 200, (corpus[i][0], ep, body)
        (check_embed if ep == "embed" else check_classify)(body, expected[i])
    _, after = http("GET", server["url"] + "/healthz")
    served = after["replica"]["images"] - before["replica"]["images"]
    assert served == sum(kind == "ok" for _, kind, _ in jobs), "corrupt bodies must never reach a batch"
    assert after["replica"]["max_batch_size_seen"] > 1, f"no batching under load: {after['replica']}"
    assert after["replica"]["max_batch_size_seen"] <= 8


def test_errors_are_json(server):
    status, body = http("GET", server["url"] + "/embed")
    assert status == 405 and "POST" in body["error"]
    status, body = http("POST", server["url"] + "/nowhere", b"x")
    assert status == 404 and "/embed" in body["error"]
    status, body = http("POST", server["url"] + "/classify", b"")
    assert status == 400 and "empty" in body["error"]


def test_plain_open_clip_app_under_a_route_prefix(server, corpus):
    """The same deployment code serving a plain FP32 open_clip tower without a classifier."""
    visual = server["plain_visual"]
    transform = decode.build_transform(visual.preprocess_cfg, visual.image_size)
    for _, body in corpus[:4]:
        status, answer = http("POST", server["plain_url"] + "/embed", body)
        assert status == 200 and answer["exit_layer"] == DEPTH
        with torch.no_grad():
            ref = _single(visual, transform(Image.open(io.BytesIO(body))))[0]
        torch.testing.assert_close(torch.tensor(answer["embedding"]), ref, atol=1e-5, rtol=1e-5)
    status, answer = http("POST", server["plain_url"] + "/classify", corpus[0][1])
    assert status == 400 and "no classifier" in answer["error"]
    status, answer = http("GET", server["plain_url"] + "/healthz")
    assert status == 200 and answer["num_classes"] == 0 and answer["early_exit"] is False
