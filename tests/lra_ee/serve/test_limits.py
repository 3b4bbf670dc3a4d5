"""The server under hostile clients (a real Ray Serve server on loopback; skipped without ``ray[serve]``).

Chunked and Content-Length bodies over the limit are answered 413 before the whole body is sent; a stalled
upload gets 408; stalled clients (bodies or headers) do not keep good requests of a one-image-per-batch
replica from being answered in time; a client that disconnects mid-body leaves no traceback in the replica's
log; non-finite model outputs answer 500 JSON naming the cause. Every answer is JSON.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lra_ee.serve import deployment, engines
from serve_support import _free_port, build_qvit, http, saved, tower, valid_images

READ_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def corpus():
    return valid_images()


@pytest.fixture(scope="module")
def server(corpus, tmp_path_factory):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    model_dir = saved(build_qvit(corpus), tmp_path_factory)
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        app = deployment.build_app(str(model_dir), max_batch_size=1, batch_wait_ms=1, num_cpus=1,
                                   compile_blocks=False, read_timeout_s=READ_TIMEOUT_S,
                                   request_timeout_s=REQUEST_TIMEOUT_S)
        deployment.start(app, host="127.0.0.1", port=port, request_timeout_s=REQUEST_TIMEOUT_S)
        broken = tower()
        with torch.no_grad():
            broken.proj.fill_(float("nan"))
        serve.run(deployment.build_app(engines.OpenClipEngine(broken), max_batch_size=2, num_cpus=0.5, name="NaN"),
                  name="nan", route_prefix="/nan")
        yield {"port": port, "url": f"http://127.0.0.1:{port}"}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _read_response(s: socket.socket, timeout: float = 60) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of the one response on ``s``."""
    s.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed without a response: {data!r}"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            chunk = s.recv(65536)
            assert chunk
            rest += chunk
        body = rest[:n]
    else:  # chunked
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        body, buf = b"", rest
        while buf:
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line, 16)
            if size == 0:
                break
            body, buf = body + buf[:size], buf[size + 2:]
    return status, headers, json.loads(body)


def _request_head(path: str, extra: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"{extra}\r\n").encode()


def test_chunked_body_over_the_limit_is_refused(server):
    """A chunked upload of 8x the limit: the replica stops reading at the limit and answers 413 JSON. (Ray's proxy
    reads the client's body ahead of the replica, and on to its end: see docs/serving.md.)"""
    s = _connect(server["port"])
    s.sendall(_request_head("/embed", "Transfer-Encoding: chunked\r\n"))
    limit = deployment.MAX_BODY_BYTES
    sent = {"bytes": 0, "cut": False}

    def send():
        chunk = f"{1 << 20:x}\r\n".encode() + os.urandom(1 << 20) + b"\r\n"
        try:
            while sent["bytes"] < 8 * limit:
                s.sendall(chunk)
                sent["bytes"] += 1 << 20
            s.sendall(b"0\r\n\r\n")
        except OSError:
            sent["cut"] = True

    with ThreadPoolExecutor(1) as pool:
        sender = pool.submit(send)
        status, headers, body = _read_response(s, timeout=120)
        sender.result(timeout=120)
    s.close()
    assert status == 413 and "exceeds" in body["error"] and headers["content-type"] == "application/json"
    stopped = int(re.search(r"stopped reading at (\d+)", body["error"]).group(1))
    assert limit < stopped <= limit + (1 << 20)  # the replica read at most one chunk past the limit


def test_content_length_over_the_limit_is_refused_at_once(server):
    s = _connect(server["port"])
    s.sendall(_request_head("/embed", f"Content-Length: {deployment.MAX_BODY_BYTES + 1}\r\n"))
    status, _, body = _read_response(s, timeout=10)
    s.close()
    assert status == 413 and "exceeds" in body["error"]


def test_stalled_body_gets_408(server):
    s = _connect(server["port"])
    s.sendall(_request_head("/classify", "Content-Length: 1000\r\n") + b"0123456789")
    start = time.monotonic()
    status, headers, body = _read_response(s, timeout=30)
    s.close()
    assert status == 408 and "10 bytes" in body["error"] and headers["content-type"] == "application/json"
    assert READ_TIMEOUT_S * 0.8 < time.monotonic() - start < READ_TIMEOUT_S + 10


def test_stalled_clients_do_not_block_good_requests(server, corpus):
    """10 stalled bodies and 10 never-finished headers against a max_batch_size=1 replica: good requests and
    /healthz are answered well before the stalled ones time out."""
    stalled = []
    for i in range(10):
        s = _connect(server["port"])
        s.sendall(_request_head("/embed", "Content-Length: 5000\r\n") + b"x" * 10)
        stalled.append(s)
        h = _connect(server["port"])
        h.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        stalled.append(h)
    time.sleep(0.3)  # the stalled requests reach the replica (a request here could wait behind them)
    try:
        start = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda b: http("POST", server["url"] + "/classify", b[1]), corpus[:8]))
        status, health = http("GET", server["url"] + "/healthz")
        elapsed = time.monotonic() - start
        assert all(code == 200 for code, _ in answers), answers
        assert status == 200 and health["status"] == "ok"
        assert elapsed < READ_TIMEOUT_S * 0.9, f"good requests took {elapsed:.2f} s behind stalled clients"
    finally:
        for s in stalled:
            s.close()


def test_client_disconnect_leaves_no_traceback(server, corpus):
    for _ in range(5):
        s = _connect(server["port"])
        s.sendall(_request_head("/embed", "Content-Length: 100000\r\n") + b"y" * 1000)
        s.close()
    time.sleep(READ_TIMEOUT_S + 1)
    status, _ = http("POST", server["url"] + "/embed", corpus[0][1])
    assert status == 200
    import ray

    logs = glob.glob(os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve",
                                  "replica_*LraEEServer*.log"))
    assert logs
    text = "".join(open(p, errors="replace").read() for p in logs)
    assert "Traceback" not in text, text[-3000:]


def test_non_finite_outputs_answer_500_json(server, corpus):
    status, body = http("POST", server["url"] + "/nan/embed", corpus[0][1])
    assert status == 500 and "non-finite" in body["error"] and "embedding" in body["error"]
