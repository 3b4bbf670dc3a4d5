"""Model ids as open_clip's (``lra_ee.model_ids``) and the command line's one-line errors for bad data.

A tiny open_clip model folder (``open_clip_config.json`` + weights, seeded random) is made here; the
Hugging Face hub is never reached: ``hf-hub:`` ids resolve from a local cache laid out as huggingface_hub
lays it out, and an uncached id must fail in one line, fast, with no retries.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lra_ee import cli
from lra_ee.errors import UserError
from lra_ee.model_ids import load_clip, resolve
from test_data import write_image_folder

ROOT = Path(__file__).resolve().parents[2]
MODEL_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
PREPROCESS = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"}


def _write_model(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in open_clip.CLIP(**MODEL_CFG).state_dict().items()}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS}))
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    return folder, _write_model(folder, seed=11)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def _same_weights(clip, state):
    got = clip.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("how", ["model", "pretrained_dir", "pretrained_schema"])
def test_local_dir_loads_its_weights_and_preprocessing(tiny, how):
    folder, state = tiny
    model, pretrained = {"model": (f"local-dir:{folder}", None), "pretrained_dir": ("ViT-B-32", str(folder)),
                         "pretrained_schema": ("ViT-B-32", f"local-dir:{folder}")}[how]
    clip, preprocess, tokenizer, label = load_clip(model, pretrained, "cpu")
    _same_weights(clip, state)
    assert label == f"local-dir:{folder.resolve()}"
    norm = [t for t in preprocess.transforms if type(t).__name__ == "Normalize"][0]
    assert list(norm.mean) == pytest.approx(PREPROCESS["mean"]) and list(norm.std) == pytest.approx(PREPROCESS["std"])
    assert tokenizer(["a cat"]).shape == (1, MODEL_CFG["text_cfg"]["context_length"])


def test_folder_with_one_checkpoint_and_bad_ids(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "weights.pt").write_bytes(b"x")
    mid = resolve("ViT-B-32", str(tmp_path / "ck"))
    assert mid.kind == "checkpoint" and mid.pretrained == str((tmp_path / "ck" / "weights.pt").resolve())
    (tmp_path / "ck" / "other.bin").write_bytes(b"x")
    for model, pretrained, match in [
        ("ViT-B-32", str(tmp_path / "ck"), "not exactly one checkpoint"),
        ("ViT-B-32", "nope-tag", "not a tag of ViT-B-32"),
        ("ViT-B-32", str(tmp_path / "missing.pt"), "not found"),
        ("hf-hub:just-a-name", None, "hf-hub:org/name"),
        (f"local-dir:{tmp_path / 'nowhere'}", None, "no such folder"),
        (f"local-dir:{tmp_path}", None, "open_clip_config.json"),
        ("ViT-B-32", "hf-hub:org/name", "go in --model"),
        ("NoSuchArch", "openai", "unknown model"),
    ]:
        with pytest.raises(UserError, match=match):
            resolve(model, pretrained)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.strip().splitlines() if ln.startswith("lra-ee: error:")]
    others = [ln for ln in err.strip().splitlines() if not ln.startswith(("lra-ee: error:", "lra-ee: warning:"))]
    assert len(errors) == 1 and not others, err
    return errors[0]


@pytest.mark.parametrize("argv", [["--model", "hf-hub:lra-test/uncached"], ["--model", "ViT-B-32",
                                                                            "--pretrained", "openai"]])
@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unreachable"])
def test_uncached_hub_model_fails_fast_in_one_line(monkeypatch, capsys, tmp_path, argv, offline):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    start = time.perf_counter()
    code = cli.main(["diagnose", *argv, "--out", str(tmp_path / "out")])
    elapsed = time.perf_counter() - start
    line = _one_error_line(capsys)
    assert code == 2 and elapsed < 15, (code, elapsed)
    assert ("HF_HUB_OFFLINE is set" if offline == "HF_HUB_OFFLINE" else "cannot be reached") in line
    assert "not in the local cache" in line


def _populate_hub_cache(hub: Path, repo: str, source: Path) -> None:
    """``hub`` laid out as huggingface_hub's cache holds ``repo`` at revision main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = hub / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in source.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())


def test_hf_hub_id_from_a_populated_cache(monkeypatch, tiny, tmp_path):
    folder, state = tiny
    _populate_hub_cache(tmp_path / "hub", "lra-test/tiny", folder)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip, _, _, label = load_clip("hf-hub:lra-test/tiny", None, "cpu")
    _same_weights(clip, state)
    assert label == "hf-hub:lra-test/tiny"


def test_hf_home_cache_used_when_the_hub_is_unreachable(tiny, tmp_path):
    """A fresh process with HF_HOME pointing at the cache and an unreachable hub (no HF_HUB_OFFLINE): the cached
    files are used without a request."""
    folder, state = tiny
    _populate_hub_cache(tmp_path / "hf" / "hub", "lra-test/tiny", folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    code = ("import torch; from lra_ee.model_ids import load_clip; "
            "clip = load_clip('hf-hub:lra-test/tiny', None, 'cpu')[0]; "
            "print(float(clip.visual.conv1.weight.double().sum()))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    want = float(state["visual.conv1.weight"].double().sum())
    assert float(res.stdout.strip().splitlines()[-1]) == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------------- bad data: one line, exit 2
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    bad = root / "corrupt"
    for c in ("cat", "dog"):
        (bad / c).mkdir(parents=True)
        for i in range(3):
            (bad / c / f"{i}.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(i + 5)))
    small = root / "small"
    write_image_folder(small, classes=("cat", "dog"), per_class=2, corrupt=False)
    return {"corrupt": bad, "small": small}


@pytest.mark.parametrize("command, data, extra, match", [
    ("diagnose", "corrupt", [], "could be read"),
    ("evaluate", "corrupt", ["--quant-calib-images", "1", "--qirc-images", "1"], "could be read"),
    ("calibrate", "corrupt", ["--quant-calib-images", "1", "--qirc-images", "1", "--calib-fraction", "0.9"],
     "could be read"),
    ("evaluate", "small", ["--quant-calib-images", "1", "--qirc-images", "1", "--seeds", "0"], "too few"),
    ("evaluate", "small", [], "too few"),
    ("calibrate", "small", [], "too few"),
    ("diagnose", "small", ["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_unusable_data_is_one_line_exit_2(capsys, tiny, folders, tmp_path, command, data, extra, match):
    argv = [command, "--model", f"local-dir:{tiny[0]}", "--data", str(folders[data]), "--templates", "simple",
            "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), *extra]
    code = cli.main(argv)
    line = _one_error_line(capsys)
    assert code == 2 and match in line, line


@pytest.mark.parametrize("extra, match", [(["--batch-size", "0"], "--batch-size"), (["--classes", "1"], "--classes"),
                                          (["--bench-seconds", "0"], "--bench-seconds"),
                                          (["--images", "3", "--model", "ViT-S-32"], "too few")])
def test_demo_options_are_checked(capsys, tmp_path, extra, match):
    code = cli.main(["demo", "--out", str(tmp_path / "demo"), *extra])
    line = _one_error_line(capsys)
    assert code == 2 and match in line, line
