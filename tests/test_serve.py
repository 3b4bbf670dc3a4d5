"""Serving (``lra_ee.serve``): preprocessing, the Ray-free batch core, ``lra-ee serve`` errors, and
the real Ray Serve server under concurrent load (skipped without ``ray[serve]``).

Invariants: every response belongs to its own request and equals what the model gives for that
image alone (same open_clip preprocessing); corrupt bodies get 400 and leave the rest alone.
"""

from __future__ import annotations

import io
import json
import random
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import make_tower
from lra_ee import serve as srv
from lra_kernels import ExitPolicy, QuantEarlyExitViT

DEPTH = 4
EXITS = (1, 2, 3)
CLASS_NAMES = ["cat", "dog", "car", "tree", "boat", "lamp", "cup"]
# Not open_clip's defaults, so a server that ignored the saved config would answer differently.
PREPROCESS = {"size": 32, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "interpolation": "bilinear",
              "resize_mode": "shortest"}
HTTP_TIMEOUT = 30.0


# ---------------------------------------------------------------------- images
def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _picture(rng, h, w, channels=3) -> np.ndarray:
    """Smooth colour gradients plus noise: images that differ in structure, not only in noise."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    a = rng.uniform(-3, 3, size=(channels, 3))
    base = np.stack([np.sin(a[c, 0] * xx * 6 + a[c, 1] * yy * 6 + a[c, 2]) for c in range(channels)], -1)
    pic = 127.5 + 100 * base + rng.normal(0, 25, size=(h, w, channels))
    return pic.clip(0, 255).astype(np.uint8)


def valid_images() -> list[tuple[str, bytes]]:
    """JPEG/PNG/WebP files of awkward sizes and every PIL mode open_clip's transform converts."""
    rng = np.random.default_rng(0)
    rgb = lambda h, w: Image.fromarray(_picture(rng, h, w))  # noqa: E731
    i16 = (_picture(rng, 37, 45, 1)[..., 0].astype(np.uint16) * 257 + rng.integers(0, 257, (37, 45))).astype(np.uint16)
    return [
        ("rgb.jpg", _encode(rgb(48, 64), "JPEG", quality=90)),
        ("rgb_tiny.png", _encode(rgb(7, 5), "PNG")),
        ("rgb_wide.jpg", _encode(rgb(20, 200), "JPEG")),
        ("rgb_tall.png", _encode(rgb(150, 21), "PNG")),
        ("rgb_large.jpg", _encode(rgb(480, 640), "JPEG")),
        ("rgba.png", _encode(Image.fromarray(_picture(rng, 40, 33, 4), "RGBA"), "PNG")),
        ("l.png", _encode(Image.fromarray(_picture(rng, 31, 31, 1)[..., 0], "L"), "PNG")),
        ("la.png", _encode(Image.fromarray(_picture(rng, 30, 44, 2), "LA"), "PNG")),
        ("p.png", _encode(rgb(50, 40).convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG")),
        ("one_bit.png", _encode(rgb(33, 35).convert("1"), "PNG")),
        ("cmyk.jpg", _encode(rgb(36, 52).convert("CMYK"), "JPEG")),
        ("i16.png", _encode(Image.fromarray(i16), "PNG")),
        ("rgb.webp", _encode(rgb(60, 45), "WEBP", lossless=True)),
        ("rgba.webp", _encode(Image.fromarray(_picture(rng, 29, 38, 4), "RGBA"), "WEBP", quality=80)),
    ]


def corrupt_bodies() -> list[tuple[str, bytes, str]]:
    """(name, body, part of the expected error message)."""
    rng = np.random.default_rng(1)
    jpeg = _encode(Image.fromarray(_picture(rng, 64, 64)), "JPEG")
    png = _encode(Image.fromarray(_picture(rng, 64, 64)), "PNG")
    return [
        ("empty", b"", "empty"),
        ("text", b"this is not an image", "not a JPEG, PNG or WebP"),
        ("gif", _encode(Image.fromarray(_picture(rng, 16, 16)), "GIF"), "not a JPEG, PNG or WebP"),
        ("truncated.jpg", jpeg[: len(jpeg) // 3], "JPEG"),
        ("truncated.png", png[: len(png) // 2], "PNG"),
        ("png_header_only", png[:40], "corrupt or truncated PNG"),
    ]


def reference_transform():
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**PREPROCESS), is_train=False)


def as_tensor(body: bytes) -> torch.Tensor:
    return reference_transform()(Image.open(io.BytesIO(body)))


# ---------------------------------------------------------------------- models
def _tower():
    v = make_tower(layers=DEPTH, seed=3)
    v.preprocess_cfg = dict(PREPROCESS)
    return v


def spread_policy(qvit, images, fractions=(0.25, 0.3, 0.4)) -> ExitPolicy:
    """Thresholds between two neighbouring gate scores, so that about ``fractions[j]`` of the rows
    still running leave at exit j and no score sits on a threshold (tiny float differences between
    machines or thread counts cannot move a sample to another exit)."""
    res = qvit.all_exits(images, EXITS)
    mean, std = res.features.mean(1), res.features.std(1).clamp_min(1e-6)
    L = len(EXITS)
    p = ExitPolicy(EXITS, torch.tensor([[4.0, 1.0, 0.0]] * L), torch.zeros(L), mean, std, torch.ones(L))
    remaining = torch.ones(images.shape[0], dtype=torch.bool)
    taus = []
    for j, frac in enumerate(fractions):
        scores = p.gate_scores(j, res.features[j])
        cand = scores[remaining].sort(descending=True).values
        k = max(1, round(frac * len(cand)))
        while k < len(cand) and cand[k - 1] - cand[k] < 1e-4:
            k += 1
        tau = float(cand[k - 1] + cand[k]) / 2 if k < len(cand) else float(cand[-1]) - 1e-3
        taus.append(tau)
        remaining &= scores < tau
    return p.with_thresholds(taus)


@pytest.fixture(scope="module")
def corpus():
    return valid_images()


@pytest.fixture(scope="module")
def qvit(corpus):
    torch.manual_seed(0)
    q = QuantEarlyExitViT.from_open_clip(_tower(), compile_blocks=False)
    q.set_classifier(F.normalize(torch.randn(len(CLASS_NAMES), 32), dim=-1), class_names=CLASS_NAMES)
    q.exit_policy = spread_policy(q, torch.stack([as_tensor(b) for _, b in corpus]))
    return q


@pytest.fixture(scope="module")
def model_dir(qvit, tmp_path_factory):
    return qvit.save(tmp_path_factory.mktemp("served") / "model")


def _single(fn, x: torch.Tensor):
    """The model's answer for one image alone, with one torch thread (as the test replicas run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(x.unsqueeze(0))
    finally:
        torch.set_num_threads(threads)


def expected_answers(model, corpus) -> list[dict]:
    """Per image: what /embed and /classify must answer (model: a QuantEarlyExitViT)."""
    out = []
    for _, body in corpus:
        x = as_tensor(body)
        emb = _single(model, x)[0]
        res = _single(model.classify, x)
        probs = torch.softmax(res.logits[0], -1)
        out.append({"embedding": emb, "exit_layer": int(res.exit_layer[0]), "probs": probs})
    return out


def check_embed(answer: dict, expected: dict) -> None:
    assert set(answer) == {"embedding", "exit_layer"}
    assert answer["exit_layer"] == expected["exit_layer"]
    got = torch.tensor(answer["embedding"], dtype=torch.float32)
    torch.testing.assert_close(got, expected["embedding"], atol=1e-6, rtol=0)


def check_classify(answer: dict, expected: dict, names=CLASS_NAMES, prob_atol: float = 1e-6) -> None:
    assert set(answer) == {"label", "name", "score", "top5", "exit_layer"}
    probs = expected["probs"]
    label = int(probs.argmax())
    assert answer["label"] == label
    assert answer["name"] == (names[label] if names else None)
    assert answer["score"] == pytest.approx(float(probs[label]), abs=prob_atol)
    top = probs.topk(min(5, probs.numel()))
    assert [c for c, _ in answer["top5"]] == top.indices.tolist()
    assert [p for _, p in answer["top5"]] == pytest.approx(top.values.tolist(), abs=prob_atol)
    assert answer["exit_layer"] == expected["exit_layer"]


# ---------------------------------------------------------------------- preprocessing (no Ray)
def test_saved_config_carries_preprocess_cfg_and_classes(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["arch"]["preprocess_cfg"]["interpolation"] == "bilinear"
    assert cfg["extra"]["classifier"]["class_names"] == CLASS_NAMES


def test_preprocess_matches_open_clip_for_every_mode(corpus, qvit):
    transform = srv.build_transform(qvit.preprocess_cfg, qvit.image_size)
    modes = set()
    for name, body in corpus:
        modes.add(Image.open(io.BytesIO(body)).mode)
        x = srv.preprocess_body(body, transform)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32, name
        torch.testing.assert_close(x, as_tensor(body), atol=0, rtol=0, msg=name)
    assert {"RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16"} <= modes


def test_transform_defaults_follow_open_clip():
    from open_clip.transform import PreprocessCfg, image_transform_v2

    t = srv.build_transform({}, (48, 48))
    body = valid_images()[0][1]
    ref = image_transform_v2(PreprocessCfg(size=(48, 48)), is_train=False)(Image.open(io.BytesIO(body)))
    torch.testing.assert_close(t(Image.open(io.BytesIO(body))), ref, atol=0, rtol=0)


@pytest.mark.parametrize("name,body,message", corrupt_bodies(), ids=[c[0] for c in corrupt_bodies()])
def test_corrupt_bodies_are_rejected_with_a_message(name, body, message):
    transform = srv.build_transform(PREPROCESS)
    with pytest.raises(srv.BadImage, match=message):
        srv.preprocess_body(body, transform)


def test_oversized_image_is_rejected(monkeypatch):
    monkeypatch.setattr(srv, "MAX_PIXELS", 1000)
    with pytest.raises(srv.BadImage, match="outside"):
        srv.decode_image(_encode(Image.new("RGB", (40, 40)), "PNG"))


# ---------------------------------------------------------------------- the batch core (no Ray)
def _mixed_items(core, corpus):
    items = [("classify" if i % 3 else "embed", core.prepare(body)) for i, (_, body) in enumerate(corpus)]
    random.Random(0).shuffle(items)
    return items


def test_core_early_exit_batch_equals_single_images(qvit, corpus):
    core = srv.InferenceCore(srv.QuantEngine(qvit))
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
    core = srv.InferenceCore(srv.QuantEngine(model))
    expected = expected_answers(model, corpus)
    assert all(e["exit_layer"] == DEPTH for e in expected)
    assert any(abs(float(e["embedding"].norm()) - 1) > 1e-3 for e in expected)
    items = [("embed" if i % 2 else "classify", core.prepare(b)) for i, (_, b) in enumerate(corpus)]
    for i, r in enumerate(core.run_batch(items)):
        (check_embed if i % 2 else check_classify)(r.body, expected[i])
    model.clear_classifier()
    core = srv.InferenceCore(srv.QuantEngine(model))
    assert not core.has_classifier
    for i, r in enumerate(core.run_batch([("embed", x) for _, x in items])):
        check_embed(r.body, expected[i])
    with pytest.raises(RuntimeError, match="classifier"):
        core.run_batch(items)


def test_core_serves_plain_open_clip(corpus):
    visual = _tower()
    text = F.normalize(torch.randn(len(CLASS_NAMES), 32), dim=-1)
    core = srv.InferenceCore(srv.OpenClipEngine(visual, text, logit_scale=100.0))
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


def test_engine_rejects_other_objects():
    with pytest.raises(TypeError, match="cannot serve"):
        srv.as_engine(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------- lra-ee serve: bad input
def _serve_cli(capsys, *argv):
    from lra_ee.cli import main

    code = main(["serve", *argv])
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model-dir", "/nonexistent/model"], "no model directory"),
        (["--model-dir", "{tmp}"], "not a saved model"),
        (["--model-dir", "{model}", "--replicas", "0"], "--replicas"),
        (["--model-dir", "{model}", "--max-batch-size", "0"], "--max-batch-size"),
        (["--model-dir", "{model}", "--batch-wait-ms", "-1"], "--batch-wait-ms"),
        (["--model-dir", "{model}", "--port", "70000"], "--port"),
    ],
)
def test_serve_main_bad_arguments_exit_2_with_one_line(capsys, tmp_path, model_dir, argv, message):
    argv = [a.format(tmp=tmp_path, model=model_dir) for a in argv]
    code, err = _serve_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lra-ee serve: error:"), err
    assert "Traceback" not in err
    if srv._ray_serve is not None:
        assert message in lines[0]


def test_serve_main_port_in_use(capsys, model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        code, err = _serve_cli(capsys, "--model-dir", str(model_dir), "--port", str(s.getsockname()[1]))
    assert code == 2 and err.count("\n") == 1
    if srv._ray_serve is not None:
        assert "cannot listen" in err


def test_app_builder_for_serve_deploy_configs(model_dir):
    pytest.importorskip("ray.serve")
    from ray.serve.deployment import Application

    args = {"model_dir": str(model_dir), "max_batch_size": "32", "batch_wait_ms": "2.5", "compile_blocks": "false"}
    assert isinstance(srv.app_builder(args), Application)
    with pytest.raises(ValueError, match="model_dir"):
        srv.app_builder({})


# ---------------------------------------------------------------------- the real server (Ray)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_lra_ee_serve_command_end_to_end(model_dir, tmp_path):
    """The real command in a subprocess (its own Ray): serves, answers, stops cleanly on Ctrl-C.
    Runs before the module's server fixture starts, so the two Ray instances never overlap."""
    pytest.importorskip("ray.serve")
    import os
    import signal
    import subprocess
    import sys
    import time

    port = _free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "lra_ee.cli", "serve", "--model-dir", str(model_dir), "--port", str(port),
           "--max-batch-size", "4", "--batch-wait-ms", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while b"Ctrl-C stops" not in log.read_bytes():
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "lra-ee serve did not come up in 120 s"
            time.sleep(0.5)
        body = valid_images()[0][1]
        status, answer = http("POST", f"http://127.0.0.1:{port}/classify", body)
        assert status == 200 and answer["name"] in CLASS_NAMES
        status, answer = http("GET", f"http://127.0.0.1:{port}/healthz")
        assert status == 200 and answer["exit_layers"] == list(EXITS)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        text = log.read_text(errors="replace")
        assert "Traceback" not in text and "shutting down" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(model_dir):
    """``{"url", "plain_url", "plain_visual"}``: the saved early-exit model at ``/`` and a plain FP32
    open_clip tower without classifier at ``/plain``, on one Ray Serve HTTP proxy."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        app = srv.build_app(str(model_dir), max_batch_size=8, batch_wait_ms=20, num_cpus=1, compile_blocks=False)
        srv.start(app, host="127.0.0.1", port=port)
        plain_visual = _tower()
        plain = srv.build_app(srv.OpenClipEngine(plain_visual), max_batch_size=4, batch_wait_ms=5, num_cpus=1,
                              name="Plain")
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
    transform = srv.build_transform(visual.preprocess_cfg, visual.image_size)
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
