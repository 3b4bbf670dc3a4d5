"""Soak: a real server under closed-loop mixed good and bad load for a bounded time, one replica killed midway.

Two replicas of a small tower (seeded random weights, 100 random classes) on the local Ray. Good clients send
``POST /classify`` JPEGs back to back; bad clients cycle through corrupt bodies (400), an unknown path (404),
an over-limit Content-Length (413) and a stalled upload (408). Halfway through one replica's process is
killed (SIGKILL); Serve restarts it. Reported: req/s and p50/p99 of the good requests, errors on good requests
(split into those in flight at the kill and the rest, which must be 0), whether every bad request not in
flight at the kill got its status as JSON, and the replicas' RSS before and after.

    python -m pytest bench/bench_soak.py --benchmark-only -s     # skipped without ray[serve]
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

DURATION_S = 60.0
KILL_AT_S = 30.0
GOOD_CLIENTS = 6
READ_TIMEOUT_S = 2.0
MAX_BATCH = 8
REPLICA_TITLE = "ServeReplica:lra-soak:LraEEServer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jpegs(n: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        h, w = int(rng.integers(48, 200)), int(rng.integers(48, 200))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def _model_dir(tmp_path):
    from open_clip.transformer import VisionTransformer

    from lra_kernels import QuantEarlyExitViT

    torch.manual_seed(0)
    v = VisionTransformer(image_size=64, patch_size=16, width=192, layers=6, heads=3, mlp_ratio=4.0, output_dim=128)
    q = QuantEarlyExitViT.from_open_clip(v.eval(), compile_blocks=False)
    q.set_classifier(F.normalize(torch.randn(100, 128), dim=-1))
    return q.save(tmp_path / "soak-model")


def _replica_pids() -> dict[int, float]:
    """``{pid: RSS MiB}`` of the serving replicas (Ray titles their processes ``ray::ServeReplica:app:name``)."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if REPLICA_TITLE in cmd:
            try:
                out[p.info["pid"]] = p.memory_info().rss / 2**20
            except psutil.Error:
                pass
    return out


class Load:
    """Closed-loop clients; every answer recorded as (t_sent, t_answered, kind, status, is_json)."""

    def __init__(self, port: int, bodies: list[bytes], t_end: float):
        self.port, self.bodies, self.t_end = port, bodies, t_end
        self.records: list[tuple[float, float, str, int, bool]] = []
        self.lock = threading.Lock()

    def _record(self, *rec):
        with self.lock:
            self.records.append(rec)

    def good(self, k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        i = k
        while time.monotonic() < self.t_end:
            t0 = time.monotonic()
            try:
                conn.request("POST", "/classify", body=self.bodies[i % len(self.bodies)])
                resp = conn.getresponse()
                data, status = resp.read(), resp.status
                is_json = resp.getheader("content-type", "").startswith("application/json")
                if status == 200:
                    json.loads(data)
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                status, is_json = -1, False
            self._record(t0, time.monotonic(), "good", status, is_json)
            i += GOOD_CLIENTS

    def _raw(self, payload: bytes, want_close: bool = False) -> tuple[int, bool]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(payload)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    return -1, False
                data += chunk
            head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
            return int(head.split()[1]), "content-type: application/json" in head

    def bad(self) -> None:
        corrupt = [b"", b"not an image", self.bodies[0][: len(self.bodies[0]) // 3]]
        cases = ["corrupt", "path", "too_large", "stalled"]
        i = 0
        while time.monotonic() < self.t_end:
            case = cases[i % len(cases)]
            t0 = time.monotonic()
            try:
                if case == "corrupt":
                    body = corrupt[i % len(corrupt)]
                    status, is_json = self._raw(b"POST /classify HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                                b"Content-Length: %d\r\n\r\n" % len(body) + body)
                elif case == "path":
                    status, is_json = self._raw(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                                b"Content-Length: 1\r\n\r\nx")
                elif case == "too_large":
                    status, is_json = self._raw(b"POST /embed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                                b"Content-Length: 999999999\r\n\r\n")
                else:
                    status, is_json = self._raw(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                                                b"0123456789")
            except OSError:
                status, is_json = -1, False
            self._record(t0, time.monotonic(), case, status, is_json)
            i += 1


EXPECTED = {"corrupt": 400, "path": 404, "too_large": 413, "stalled": 408}


def _soak(tmp_path) -> dict:
    import ray
    from ray import serve

    from lra_ee.serve import deployment

    model_dir = _model_dir(tmp_path)
    bodies = _jpegs(32)
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        app = deployment.build_app(str(model_dir), max_batch_size=MAX_BATCH, batch_wait_ms=5, replicas=2,
                                   num_cpus=1, compile_blocks=False, read_timeout_s=READ_TIMEOUT_S)
        deployment.start(app, host="127.0.0.1", port=port, name="lra-soak")
        start = time.monotonic()
        load = Load(port, bodies, start + DURATION_S)
        threads = [threading.Thread(target=load.good, args=(k,)) for k in range(GOOD_CLIENTS)]
        threads += [threading.Thread(target=load.bad) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(5.0)
        rss_start = _replica_pids()
        time.sleep(KILL_AT_S - 5.0)
        rss_before_kill = _replica_pids()
        victim = min(rss_before_kill)
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        for t in threads:
            t.join()
        rss_end = _replica_pids()
        serve.delete("lra-soak")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    good = [r for r in load.records if r[2] == "good"]
    in_flight = [r for r in good if r[0] <= t_kill <= r[1]]
    failed = [r for r in good if r[3] != 200]
    failed_in_flight = [r for r in failed if r[0] <= t_kill <= r[1]]
    lat = np.array([r[1] - r[0] for r in good if r[3] == 200]) * 1000
    bad = [r for r in load.records if r[2] != "good"]
    bad_wrong = [r for r in bad if (r[3] != EXPECTED[r[2]] or not r[4]) and not r[0] <= t_kill <= r[1]]
    bad_in_flight = [r for r in bad if r[0] <= t_kill <= r[1]]
    return {
        "duration_s": DURATION_S, "good_requests": len(good), "good_req_per_s": len(good) / DURATION_S,
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "good_errors_in_flight_at_kill": len(failed_in_flight), "in_flight_at_kill": len(in_flight),
        "good_errors_other": len(failed) - len(failed_in_flight),
        "good_error_statuses": sorted({r[3] for r in failed}),
        "bad_requests": len(bad), "bad_answered_wrong": len(bad_wrong), "bad_in_flight_at_kill": len(bad_in_flight),
        "bad_in_flight_statuses": sorted({(r[3], r[4]) for r in bad_in_flight}),
        "bad_wrong_examples": [(r[2], r[3], r[4]) for r in bad_wrong[:5]],
        "replica_rss_mib_start": sorted(round(v) for v in rss_start.values()),
        "replica_rss_mib_before_kill": sorted(round(v) for v in rss_before_kill.values()),
        "replica_rss_mib_end": sorted(round(v) for v in rss_end.values()),
        "replica_restarted": victim not in rss_end and len(rss_end) == 2,
    }


def test_soak_with_a_replica_killed(benchmark, tmp_path):
    pytest.importorskip("ray.serve")
    pytest.importorskip("psutil")
    result = benchmark.pedantic(_soak, args=(tmp_path,), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print("\nsoak:", json.dumps(result, indent=1))
    assert result["good_errors_other"] == 0, result
    assert result["bad_answered_wrong"] == 0, result
    assert result["replica_restarted"], result
