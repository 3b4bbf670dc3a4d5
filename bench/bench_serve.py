"""Serving on Ray Serve: requests/s and p50/p99 latency under a closed-loop load (``POST /classify``).

The server (``lra_ee.serve``, one replica, ``@serve.batch``) runs in this process's Ray; the load
comes from a second process on loopback: ``CONNECTIONS`` threads, each with one keep-alive HTTP
connection, sending the next JPEG as soon as the previous answer arrived. Three models behind
the same deployment code, ViT-B-32 with seeded random weights and 1000 random classes:

- ours, full depth: the saved ``QuantEarlyExitViT`` (INT8 W8A8), exit policy disabled;
- ours, early exit: the same model with exits at layers 8/10/11, thresholds set on the load's
  images so that the paper's fractions leave (10.1% / 25.3% / 32.1%, 32.5% run the full depth);
- open_clip FP32: the plain open_clip tower behind ``OpenClipEngine``.

Each is checked against the same model run locally before it is timed. Random weights: only the
exit fractions matter, not which images leave; the numbers say nothing about accuracy.

    python -m pytest bench/bench_serve.py --benchmark-only     # skipped without ray[serve]
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lra_ee.synthetic import policy_with_exit_fractions

MODEL = "ViT-B-32"
NUM_CLASSES = 1000
N_IMAGES = 64
MAX_BATCH = 16
BATCH_WAIT_MS = 10.0
CONNECTIONS = 2 * MAX_BATCH  # the next batch is decoded while one runs
WARMUP_S = 6.0
DURATION_S = 20.0
PAPER_EXITS = (8, 10, 11)
PAPER_FRACTIONS = (0.101, 0.253, 0.321)  # of all images; the rest run the full depth
PROVIDERS = ("ours-full-depth", "ours-early-exit", "open_clip-fp32")
REQUEST_TIMEOUT_S = 120.0


# ---------------------------------------------------------------------- the load generator (subprocess)
def _client_main(argv: list[str]) -> int:
    """``python bench_serve.py --client HOST PORT PATH IMAGE_DIR CONNECTIONS WARMUP_S DURATION_S``:
    closed-loop load; prints one JSON line with the measured window's figures."""
    host, port, path, image_dir = argv[0], int(argv[1]), argv[2], Path(argv[3])
    connections, warmup_s, duration_s = int(argv[4]), float(argv[5]), float(argv[6])
    bodies = [p.read_bytes() for p in sorted(image_dir.glob("*.jpg"))]
    start = time.monotonic()
    t_measure, t_end = start + warmup_s, start + warmup_s + duration_s
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
        i = k
        while True:
            t0 = time.monotonic()
            if t0 >= t_end:
                break
            body = bodies[i % len(bodies)]
            i += connections
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "image/jpeg"})
                resp = conn.getresponse()
                data = resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
                ok, data = False, str(err).encode()
            t1 = time.monotonic()
            if t0 >= t_measure and t1 <= t_end:  # requests wholly inside the measured window
                with lock:
                    if ok:
                        latencies.append(t1 - t0)
                    else:
                        errors.append(data[:200].decode(errors="replace"))
        conn.close()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=warmup_s + duration_s + REQUEST_TIMEOUT_S)
    latencies.sort()

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000.0 if latencies else None

    print(json.dumps({
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "req_per_s": len(latencies) / duration_s,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": 1000.0 * sum(latencies) / len(latencies) if latencies else None,
    }))
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--client"]:
    sys.exit(_client_main(sys.argv[2:]))


# ---------------------------------------------------------------------- fixtures
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url_host: str, port: int, path: str, body: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(url_host, port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def cluster(request):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from lra_ee import serve as srv

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    summary: dict[str, dict] = {}
    try:
        yield {"port": port, "srv": srv, "serve": serve, "summary": summary}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        _print_summary(request, summary)


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """``N_IMAGES`` JPEGs of assorted sizes (files for the client) and their preprocessed tensors."""
    import numpy as np
    import torch
    from PIL import Image

    from lra_ee import serve as srv
    from lra_ee.synthetic import random_tower

    rng = np.random.default_rng(0)
    image_dir = tmp_path_factory.mktemp("serve-images")
    tower = random_tower(MODEL, seed=0)
    transform = srv.build_transform(tower.preprocess_cfg, tower.image_size)
    tensors = []
    for i in range(N_IMAGES):
        h, w = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        yy, xx = np.mgrid[0:h, 0:w] / 300.0
        a = rng.uniform(-4, 4, size=(3, 3))
        pic = np.stack([np.sin(a[c, 0] * xx * 5 + a[c, 1] * yy * 5 + a[c, 2]) for c in range(3)], -1)
        pic = (127.5 + 90 * pic + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
        path = image_dir / f"{i:03d}.jpg"
        Image.fromarray(pic).save(path, "JPEG", quality=90)
        tensors.append(srv.preprocess_body(path.read_bytes(), transform))
    return {"dir": image_dir, "images": torch.stack(tensors), "tower": tower}


@pytest.fixture(scope="module")
def models(workload, tmp_path_factory):
    """Model sources for the deployment and the local references that check them."""
    import torch
    import torch.nn.functional as F

    from lra_ee import serve as srv
    from lra_ee.synthetic import random_tower
    from lra_kernels import QuantEarlyExitViT

    gen = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(NUM_CLASSES, 512, generator=gen), dim=-1)
    qvit = QuantEarlyExitViT.from_open_clip(workload["tower"])
    qvit.set_classifier(text)
    root = tmp_path_factory.mktemp("serve-models")
    full_dir = qvit.save(root / "full")
    policy = policy_with_exit_fractions(qvit, workload["images"], PAPER_EXITS, PAPER_FRACTIONS)
    qvit.exit_policy = policy
    ee_dir = qvit.save(root / "early-exit")
    qvit.exit_policy = None
    # built inside the replica from the seed: no 350 MB of pickled weights through the object store
    fp32_source = functools.partial(srv.OpenClipEngine, functools.partial(random_tower, MODEL, 0), text, 100.0)
    fp32_local = srv.OpenClipEngine(workload["tower"], text, 100.0)
    return {
        "ours-full-depth": (str(full_dir), lambda x: _quant(qvit, None, x)),
        "ours-early-exit": (str(ee_dir), lambda x: _quant(qvit, policy, x)),
        "open_clip-fp32": (fp32_source, lambda x: fp32_local.classify(x)),
    }


def _quant(qvit, policy, x):
    qvit.exit_policy = policy
    try:
        return qvit.classify(x)
    finally:
        qvit.exit_policy = None


# ---------------------------------------------------------------------- the benchmark
@pytest.mark.parametrize("provider", PROVIDERS)
def test_serve_throughput(benchmark, cluster, workload, models, provider):
    import torch

    srv, serve, port = cluster["srv"], cluster["serve"], cluster["port"]
    source, local = models[provider]
    app = srv.build_app(source, max_batch_size=MAX_BATCH, batch_wait_ms=BATCH_WAIT_MS, num_cpus=2)
    serve.run(app, name="bench", route_prefix="/")
    try:
        # checked against the same model run locally before it is timed
        paths = sorted(workload["dir"].glob("*.jpg"))
        for k in (0, 1, 2, 3):
            status, answer = _http("POST", "127.0.0.1", port, "/classify", paths[k].read_bytes())
            assert status == 200, answer
            ref = local(workload["images"][k : k + 1])
            probs = torch.softmax(ref.logits[0].float(), -1)
            assert answer["label"] == int(probs.argmax()), provider
            assert answer["score"] == pytest.approx(float(probs.max()), abs=1e-4)
            assert answer["exit_layer"] == int(ref.exit_layer[0])
        _, before = _http("GET", "127.0.0.1", port, "/healthz")

        out: dict = {}

        def load():
            cmd = [sys.executable, os.path.abspath(__file__), "--client", "127.0.0.1", str(port), "/classify",
                   str(workload["dir"]), str(CONNECTIONS), str(WARMUP_S), str(DURATION_S)]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=WARMUP_S + DURATION_S + REQUEST_TIMEOUT_S + 30)
            assert proc.returncode == 0, proc.stderr[-2000:]
            out.update(json.loads(proc.stdout.strip().splitlines()[-1]))

        benchmark.pedantic(load, rounds=1, iterations=1, warmup_rounds=0)
        _, after = _http("GET", "127.0.0.1", port, "/healthz")
    finally:
        serve.delete("bench")

    assert out["errors"] == 0, out["first_error"]
    assert out["requests"] > 0
    b0, b1 = before["replica"], after["replica"]
    images = b1["images"] - b0["images"]
    batches = b1["batches"] - b0["batches"]
    layers = {k: v - b0["exit_layers"].get(k, 0) for k, v in b1["exit_layers"].items()}
    total = sum(layers.values()) or 1
    info = {
        "model": MODEL,
        "weights": "seeded random",
        "connections": CONNECTIONS,
        "max_batch_size": MAX_BATCH,
        "batch_wait_ms": BATCH_WAIT_MS,
        "duration_s": DURATION_S,
        "replica_threads": after["threads"],
        "req_per_s": out["req_per_s"],
        "p50_ms": out["p50_ms"],
        "p99_ms": out["p99_ms"],
        "mean_ms": out["mean_ms"],
        "requests": out["requests"],
        "mean_batch_size": images / batches if batches else None,
        "exit_fractions": {k: v / total for k, v in sorted(layers.items(), key=lambda kv: int(kv[0]))},
        "load_average_1min_after": os.getloadavg()[0],  # shared machine: how busy the CPUs were
    }
    benchmark.extra_info.update(info)
    cluster["summary"][provider] = info
    print(f"\n{provider}: {out['req_per_s']:.2f} req/s, p50 {out['p50_ms']:.0f} ms, p99 {out['p99_ms']:.0f} ms, "
          f"mean batch {info['mean_batch_size']}, exits {info['exit_fractions']}")


def _print_summary(request, summary: dict) -> None:
    if not summary:
        return
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None or capture is None:
        _write_summary(print, summary)
        return
    with capture.global_and_fixture_disabled():  # module teardown runs under output capture
        _write_summary(tr.write_line, summary)


def _write_summary(write, summary: dict) -> None:
    base = summary.get("open_clip-fp32", {}).get("req_per_s")
    full = summary.get("ours-full-depth", {}).get("req_per_s")
    write("")
    write(f"Ray Serve, {MODEL} (random weights) on CPU, POST /classify, {CONNECTIONS} connections, "
          f"max batch {MAX_BATCH}, {DURATION_S:.0f} s closed loop")
    head = f"{'provider':<18} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'x fp32':>7} {'x full':>7}"
    write(head)
    write("-" * len(head))
    for name in PROVIDERS:
        r = summary.get(name)
        if r is None:
            continue
        rps = r["req_per_s"]
        write(f"{name:<18} {rps:7.2f} {r['p50_ms']:8.0f} {r['p99_ms']:8.0f} {r['mean_batch_size'] or 0:6.1f} "
              f"{rps / base if base else float('nan'):7.2f} {rps / full if full else float('nan'):7.2f}")
