"""``lra-ee serve`` (``lra_ee.serve.cli``): one error line and exit code 2 for bad arguments; the real
command end to end in a subprocess (skipped without ``ray[serve]``)."""

from __future__ import annotations

import shutil
import socket

import pytest

from lra_ee.serve import deployment
from serve_support import CLASS_NAMES, EXITS, _free_port, build_qvit, early_exit_clip, http, saved, valid_images


@pytest.fixture(scope="module")
def corpus():
    return valid_images()


@pytest.fixture(scope="module")
def qvit(corpus):
    return build_qvit(corpus)


@pytest.fixture(scope="module")
def model_dir(qvit, tmp_path_factory):
    return saved(qvit, tmp_path_factory)


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
        (["--model-dir", "{truncated}"], "truncated"),
        (["--model-dir", "{nan}"], "NaN"),
        (["--model-dir", "{model}", "--replicas", "0"], "--replicas"),
        (["--model-dir", "{model}", "--max-batch-size", "0"], "--max-batch-size"),
        (["--model-dir", "{model}", "--batch-wait-ms", "-1"], "--batch-wait-ms"),
        (["--model-dir", "{model}", "--port", "70000"], "--port"),
    ],
)
def test_serve_main_bad_arguments_exit_2_with_one_line(capsys, tmp_path, model_dir, argv, message):
    truncated, nan = tmp_path / "truncated", tmp_path / "nan"
    if "{truncated}" in argv or "{nan}" in argv:
        from safetensors.torch import load_file, save_file

        for d in (truncated, nan):
            shutil.copytree(model_dir, d)
        blob = (truncated / "model.safetensors").read_bytes()
        (truncated / "model.safetensors").write_bytes(blob[: len(blob) - 100])
        tensors = load_file(str(nan / "model.safetensors"))
        tensors["ln_post.weight"][0] = float("nan")
        save_file(tensors, str(nan / "model.safetensors"))
    argv = [a.format(tmp=tmp_path, model=model_dir, truncated=truncated, nan=nan) for a in argv]
    code, err = _serve_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lra-ee serve: error:"), err
    assert "Traceback" not in err
    if deployment._ray_serve is not None:
        assert message in lines[0]


def test_serve_main_port_in_use(capsys, model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        code, err = _serve_cli(capsys, "--model-dir", str(model_dir), "--port", str(s.getsockname()[1]))
    assert code == 2 and err.count("\n") == 1
    if deployment._ray_serve is not None:
        assert "cannot listen" in err


def test_serve_checks_a_quant_clip_directory_whole(capsys, corpus, tmp_path):
    """A ``QuantCLIP`` directory is loaded with both towers before Ray starts: its engine answers labels, and a
    corrupt text tower (which the image tower's loader never reads) is one line and exit 2."""
    import argparse

    from lra_ee.serve.cli import _check_args
    from lra_ee.serve.engines import as_engine
    from lra_ee.serve.labels import text_capable

    path = early_exit_clip(corpus).save(tmp_path / "clip")
    args = argparse.Namespace(model_dir=str(path), replicas=1, max_batch_size=4, batch_wait_ms=1.0, device="cpu",
                              read_timeout_s=10.0, request_timeout_s=60.0, host="127.0.0.1", port=_free_port())
    assert text_capable(as_engine(_check_args(args)["model"]))
    text = path / "text.safetensors"
    blob = text.read_bytes()
    text.write_bytes(blob[: len(blob) // 2])
    code, err = _serve_cli(capsys, "--model-dir", str(path), "--port", str(_free_port()))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    if deployment._ray_serve is not None:
        assert "text.safetensors" in err and "truncated" in err, err


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
