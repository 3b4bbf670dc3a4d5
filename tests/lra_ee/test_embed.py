"""``lra-ee embed`` (``lra_ee.embed``): listing, decoding, the model actor, the output rules, and runs
on a local Ray (skipped without ``ray[data]``).

Invariants: one row per input, ``path`` unique; a row's embedding equals what the model gives for
that image alone after open_clip's preprocessing; a corrupt or unreadable input is a row with
``error`` set; a killed worker changes nothing in the output; an existing output is refused or
resumed, never appended to twice.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lra_ee import cli
from lra_ee.embed import EmbedConfig, Embedder, EmbedError, build_dataset, decode_batch, run_embed
from lra_ee.embed_inputs import MEMBER_SEP, _expand_braces, list_inputs
from lra_ee.embed_output import MANIFEST, prepare_output, shard_files
from lra_kernels import ExitPolicy, QuantEarlyExitViT
from serve_support import CLASS_NAMES, _single, as_tensor, corrupt_bodies, spread_policy, valid_images
from serve_support import tower as _tower

RAY_TIMEOUT_S = 240


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging) if the block runs longer than ``seconds`` (main thread only)."""
    def expired(signum, frame):
        raise TimeoutError(f"did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------- data the tests write
def _named_corrupt() -> list[tuple[str, bytes, str]]:
    """Corrupt bodies under image file names (so the listing takes them), with their expected error."""
    return [(name if "." in name else f"{name}.jpg", body, message) for name, body, message in corrupt_bodies()]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A folder tree with nested image folders, corrupt files, other files and tar shards.

    Returns ``{"root", "bodies": {path: bytes}, "errors": {path: message part}, "shards": dir}``."""
    root = tmp_path_factory.mktemp("collection") / "images"
    bodies, errors = {}, {}
    for i, (name, body) in enumerate(valid_images()):
        d = root / ("a" if i % 2 else "b/deeper")
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(body)
        bodies[str(d / name)] = body
    (root / "bad").mkdir()
    for name, body, message in _named_corrupt():
        (root / "bad" / name).write_bytes(body)
        errors[str(root / "bad" / name)] = message
    (root / "notes.txt").write_text("not an input")
    (root / ".hidden.jpg").write_bytes(valid_images()[0][1])
    shards = root / "shards"
    shards.mkdir()
    good = valid_images()
    for s in range(2):
        members = []
        for k in range(3):
            name, body = good[(3 * s + k) % len(good)]
            ext = name.rsplit(".", 1)[1]
            members += [(f"{s:03d}{k:03d}.{ext}", body), (f"{s:03d}{k:03d}.txt", b"a caption")]
            bodies[f"{shards / f's-{s:03d}.tar'}{MEMBER_SEP}{s:03d}{k:03d}.{ext}"] = body
        _tar(shards / f"s-{s:03d}.tar", members)
    # a shard cut inside its second member: the first is fine, the second truncated, the shard's end missing
    cut = shards / "s-002.tar"
    _tar(cut, [("c0.png", good[1][1]), ("c1.jpg", good[4][1])])
    data = cut.read_bytes()
    cut.write_bytes(data[: 512 + len(good[1][1]) + (512 - len(good[1][1]) % 512) % 512 + 512 + 100])
    bodies[f"{cut}{MEMBER_SEP}c0.png"] = good[1][1]
    errors[f"{cut}{MEMBER_SEP}c1.jpg"] = "truncated tar member"
    errors[str(cut)] = "cannot list the tar shard after 2 image member(s)"  # the header after c1 is missing
    (shards / "s-003.tar").write_bytes(b"this is not a tar file" * 40)
    errors[str(shards / "s-003.tar")] = "cannot list the tar shard"
    return {"root": root, "bodies": bodies, "errors": errors, "shards": shards}


@pytest.fixture(scope="module")
def qvit():
    torch.manual_seed(0)
    q = QuantEarlyExitViT.from_open_clip(_tower(), compile_blocks=False)
    q.set_classifier(F.normalize(torch.randn(len(CLASS_NAMES), 32), dim=-1), class_names=CLASS_NAMES)
    q.exit_policy = spread_policy(q, torch.stack([as_tensor(b) for _, b in valid_images()]))
    return q


@pytest.fixture(scope="module")
def model_dir(qvit, tmp_path_factory):
    return qvit.save(tmp_path_factory.mktemp("embed-model") / "model")


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory):
    return QuantEarlyExitViT.from_open_clip(_tower(), compile_blocks=False).save(tmp_path_factory.mktemp("plain") / "m")


def expected_rows(model_dir, bodies: dict[str, bytes], early_exit: bool) -> dict[str, tuple[torch.Tensor, int]]:
    """path -> (embedding, exit_layer) of the saved model for each image alone, one thread."""
    model = QuantEarlyExitViT.load(model_dir)
    model.compile_blocks = False
    if not early_exit:
        model.exit_policy = ExitPolicy.disabled()
    out = {}
    for path, body in bodies.items():
        if early_exit:
            res = _single(model.classify, as_tensor(body))  # one image alone, one thread
            out[path] = (res.embeddings[0], int(res.exit_layer[0]))
        else:
            out[path] = (_single(model, as_tensor(body))[0], model.depth)
    return out


def read_rows(out: Path) -> list[dict]:
    import pyarrow.dataset as pads

    table = pads.dataset(str(out), format="parquet").to_table()
    assert table.column_names == ["path", "embedding", "exit_layer", "error"]
    assert str(table.schema.field("embedding").type) == "list<element: float>"
    return table.to_pylist()


def check_rows(rows: list[dict], expected: dict, errors: dict) -> None:
    """Exactly one row per input; embeddings as the model alone; error rows carry their reason."""
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "a path occurs twice"
    assert set(paths) == set(expected) | set(errors)
    for r in rows:
        if r["path"] in errors:
            assert r["embedding"] is None and r["exit_layer"] is None
            assert errors[r["path"]] in r["error"], (r["path"], r["error"])
            continue
        assert r["error"] is None, (r["path"], r["error"])
        emb, layer = expected[r["path"]]
        torch.testing.assert_close(torch.tensor(r["embedding"]), emb, atol=1e-6, rtol=0)
        assert r["exit_layer"] == layer, r["path"]


def config(model_dir, data, out, **kw) -> EmbedConfig:
    base = dict(batch_size=4, threads_per_worker=1, rows_per_shard=8, compile_blocks=False, decode_block_rows=4)
    return EmbedConfig(model_dir=str(model_dir), data=str(data), out=str(out), **{**base, **kw})


# ---------------------------------------------------------------------- listing (no Ray)
def test_listing_a_folder_tree_takes_images_and_shards(collection):
    listing = list_inputs(str(collection["root"]))
    assert listing.kind == "folder" and listing.n_shards == 4
    assert set(listing.path) == set(collection["bodies"]) | set(collection["errors"])
    assert not any(p.endswith(("notes.txt", ".hidden.jpg")) or p.endswith(".txt") for p in listing.path)
    assert list_inputs(str(collection["root"])).path == listing.path  # the same order every time
    preset = {p: e for p, e in zip(listing.path, listing.error) if e is not None}
    assert sorted(preset) == [str(collection["shards"] / "s-002.tar"), str(collection["shards"] / "s-003.tar")]


def test_listing_a_file_list_keeps_missing_and_drops_duplicates(collection, tmp_path):
    a = sorted(collection["root"].glob("a/*"))
    lst = tmp_path / "list.txt"
    lst.write_text("# images\n" + "\n".join([str(a[0]), os.path.relpath(a[1], tmp_path), "", str(a[0]),
                                                  "gone/missing.jpg"]) + "\n")
    listing = list_inputs(str(lst))
    assert listing.kind == "list" and listing.n_duplicates == 1
    assert listing.path == [str(a[0]), str(a[1]), str(tmp_path / "gone" / "missing.jpg")]


def test_listing_shard_patterns(collection):
    shards = collection["shards"]
    assert _expand_braces("x-{000..002}.tar") == ["x-000.tar", "x-001.tar", "x-002.tar"]
    assert _expand_braces("{1..2}-{8..9}") == ["1-8", "1-9", "2-8", "2-9"]
    braces = list_inputs(str(shards / "s-{000..001}.tar"))
    globbed = list_inputs(str(shards / "s-00[01].tar"))
    assert braces.path == globbed.path and len(braces) == 6 and braces.n_shards == 2
    assert all(MEMBER_SEP in p and not p.endswith(".txt") for p in braces.path)


@pytest.mark.parametrize("data, message", [
    ("missing-dir", "does not exist"),
    ("empty-dir", "no images under"),
    ("one.jpg", "single image"),
    ("nomatch-*.tar", "matches no file"),
    ("empty-list.txt", "names no images"),
])
def test_listing_errors(tmp_path, data, message):
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "one.jpg").write_bytes(valid_images()[0][1])
    (tmp_path / "empty-list.txt").write_text("# nothing\n\n")
    with pytest.raises(EmbedError, match=message):
        list_inputs(str(tmp_path / data))


# ---------------------------------------------------------------------- decode and model (no Ray)
def _decoded(qvit, collection, paths):
    listing = list_inputs(str(collection["root"])).take(lambda p: p in paths)
    (table,) = listing.tables(len(listing))
    return decode_batch(table, qvit.preprocess_cfg, tuple(qvit.image_size))


@pytest.mark.parametrize("split", [True, False], ids=["uint8-pixels", "float-pixels"])
def test_decode_batch_is_open_clip_preprocessing_and_errors_are_rows(qvit, collection, monkeypatch, split):
    """Every PIL mode of the corpus: the pixels, normalised as the actor does, equal open_clip's whole
    transform of that image exactly; a transform that does not split ships float32 pixels instead."""
    import lra_ee.embed as embed

    if not split:
        monkeypatch.setattr(embed, "split_transform", lambda transform: None)
    mean, std = qvit.preprocess_cfg["mean"], qvit.preprocess_cfg["std"]
    everything = set(collection["bodies"]) | set(collection["errors"])
    out = _decoded(qvit, collection, everything)
    if split:
        assert out["pixels"].dtype == np.uint8 and out["pixels"].shape[1:] == (32, 32, 3)
        images = embed.normalize_pixels(out["pixels"], mean, std)
    else:
        assert out["pixels"].dtype == np.float32 and out["pixels"].shape[1:] == (3, 32, 32)
        images = torch.from_numpy(out["pixels"])
    for path, x, px, err in zip(out["path"], images, out["pixels"], out["error"]):
        if path in collection["errors"]:
            assert err is not None and collection["errors"][path] in err, (path, err)
            assert not px.any()
        else:
            assert err is None, (path, err)
            torch.testing.assert_close(x, as_tensor(collection["bodies"][path]), atol=0, rtol=0)


def test_split_transform_needs_to_tensor_and_normalize_at_the_end():
    import torchvision.transforms as T

    from lra_ee.embed import split_transform

    assert split_transform(T.Compose([T.Resize(8), T.ToTensor()])) is None
    assert split_transform(lambda image: image) is None
    pil, mean, std = split_transform(T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor(), T.Normalize((0.5,) * 3,
                                                                                                       (0.25,) * 3)]))
    assert len(pil.transforms) == 2 and mean == (0.5,) * 3 and std == (0.25,) * 3


def test_embedder_rows_equal_the_model_alone(model_dir, qvit, collection):
    paths = sorted(collection["bodies"])[:6] + sorted(collection["errors"])[:2]
    batch = _decoded(qvit, collection, set(paths))
    for early_exit in (False, True):
        embedder = Embedder(str(model_dir), early_exit, threads=1, compile_blocks=False)
        rows = embedder(batch).to_pylist()
        assert [r["path"] for r in rows] == list(batch["path"])
        expected = expected_rows(model_dir, {p: collection["bodies"][p] for p in batch["path"]
                                             if p in collection["bodies"]}, early_exit)
        check_rows(rows, expected, {p: collection["errors"][p] for p in batch["path"] if p in collection["errors"]})
        layers = {r["exit_layer"] for r in rows if r["exit_layer"] is not None}
        assert layers == {qvit.depth} if not early_exit else len(layers) > 1


# ---------------------------------------------------------------------- the output folder (no Ray)
JOB = {"model_fingerprint": "f1", "early_exit": False, "normalized": False, "embedding_dim": 32}


def test_output_refuses_foreign_and_existing_folders_and_mismatched_resume(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.csv").write_text("1")
    with pytest.raises(EmbedError, match="not an lra-ee embed output"):
        prepare_output(foreign, JOB, resume=True)
    out = tmp_path / "out"
    manifest, done, _ = prepare_output(out, JOB, resume=False)
    assert done == set() and json.loads((out / MANIFEST).read_text())["runs"][0]["kept_rows"] == 0
    with pytest.raises(EmbedError, match="pass --resume"):
        prepare_output(out, JOB, resume=False)
    with pytest.raises(EmbedError, match="early_exit"):
        prepare_output(out, {**JOB, "early_exit": True, "normalized": True}, resume=True)
    with pytest.raises(EmbedError, match="model_fingerprint"):
        prepare_output(out, {**JOB, "model_fingerprint": "other"}, resume=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(EmbedError, match="is a file"):
        prepare_output(tmp_path / "file", JOB, resume=False)


# ---------------------------------------------------------------------- the command line (errors: no Ray)
def _main(capsys, *argv) -> tuple[int, str]:
    code = cli.main(["embed", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("case, message", [
    ("no-model", "is not a directory"),
    ("broken-model", "config.json"),
    ("truncated-weights", "truncated"),
    ("no-data", "does not exist"),
    ("early-exit-without-policy", "--early-exit"),
    ("bad-batch", "--batch-size must be at least 1"),
    ("existing-out", "pass --resume"),
])
def test_cli_errors_are_one_line_exit_2(capsys, tmp_path, collection, model_dir, plain_model_dir, case, message):
    model, data, out, extra = str(model_dir), str(collection["root"] / "a"), tmp_path / "out", []
    if case == "no-model":
        model = str(tmp_path / "nowhere")
    elif case == "broken-model":
        (tmp_path / "broken").mkdir()
        model = str(tmp_path / "broken")
    elif case == "truncated-weights":
        shutil.copytree(model_dir, tmp_path / "cut")
        blob = (tmp_path / "cut" / "model.safetensors").read_bytes()
        (tmp_path / "cut" / "model.safetensors").write_bytes(blob[: len(blob) // 2])
        model = str(tmp_path / "cut")
    elif case == "no-data":
        data = str(tmp_path / "nothing")
    elif case == "early-exit-without-policy":
        model, extra = str(plain_model_dir), ["--early-exit"]
    elif case == "bad-batch":
        extra = ["--batch-size", "0"]
    elif case == "existing-out":
        prepare_output(out, JOB, resume=False)
    code, err = _main(capsys, "--model-dir", model, "--data", data, "--out", str(out), *extra)
    assert code == 2 and len(err) == 1 and err[0].startswith("lra-ee: error: ") and message in err[0], err


def test_cli_without_ray_is_one_line_exit_2(capsys, monkeypatch, tmp_path, collection, model_dir):
    for name in ("ray", "ray.data"):
        monkeypatch.setitem(sys.modules, name, None)  # import ray -> ImportError
    code, err = _main(capsys, "--model-dir", str(model_dir), "--data", str(collection["root"] / "a"),
                      "--out", str(tmp_path / "out"))
    assert code == 2 and len(err) == 1 and "Ray Data is not installed" in err[0] and "[embed]" in err[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- on Ray
def _files_only(collection) -> tuple[dict, dict]:
    bodies = {p: b for p, b in collection["bodies"].items() if MEMBER_SEP not in p}
    errors = {p: e for p, e in collection["errors"].items() if MEMBER_SEP not in p and not p.endswith(".tar")}
    return bodies, errors


def test_lra_ee_embed_command_end_to_end(model_dir, collection, tmp_path):
    """The real command in a subprocess (its own local Ray), on the whole folder tree at full depth;
    then the same command again is refused, and ``--resume`` of a complete output has nothing to do.
    Runs before the module's Ray fixture starts, so the two Ray instances never overlap."""
    pytest.importorskip("ray.data")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "lra_ee.cli", "embed", "--model-dir", str(model_dir), "--data",
           str(collection["root"]), "--out", str(out), "--batch-size", "8", "--rows-per-shard", "16",
           "--threads-per-worker", "1", "--compile-blocks", "false"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=RAY_TIMEOUT_S, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    n = len(collection["bodies"]) + len(collection["errors"])
    assert f"{n} rows ({len(collection['errors'])} with an error) for {n} inputs" in res.stdout, res.stdout
    check_rows(read_rows(out), expected_rows(model_dir, collection["bodies"], False), collection["errors"])
    assert len(shard_files(out)) >= 2
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["rows"] == n and manifest["job"]["early_exit"] is False

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=RAY_TIMEOUT_S, env=env)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("lra-ee: error: --out")
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=RAY_TIMEOUT_S, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "this run embedded 0" in resumed.stdout and "Started a local Ray" not in resumed.stderr
    assert len(read_rows(out)) == n


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2,
             log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_decode_tasks_and_model_actors_are_separate_operators(local_ray, model_dir, collection, tmp_path, capsys):
    """Decoding must not be fused into the model actor (it would then run serially with the model)."""
    cfg = config(model_dir, collection["root"], tmp_path / "out")
    info = {"preprocess_cfg": {"size": 32}, "image_size": (32, 32)}
    build_dataset(list_inputs(str(collection["root"] / "a")), cfg, info).explain()
    physical = capsys.readouterr().out.split("Physical Plan")[-1]
    for op in ("TaskPoolMapOperator[MapBatches(decode_batch)]", "ActorPoolMapOperator[MapBatches(Embedder)]"):
        assert op in physical, physical


def test_file_list_with_early_exit(local_ray, model_dir, collection, tmp_path):
    bodies, errors = _files_only(collection)
    listed = sorted(bodies) + sorted(errors) + [sorted(bodies)[0]]
    missing = str(tmp_path / "gone.jpg")
    (tmp_path / "list.txt").write_text("\n".join(listed + [missing]) + "\n")
    out = tmp_path / "out"
    with deadline(RAY_TIMEOUT_S):
        rep = run_embed(config(model_dir, tmp_path / "list.txt", out, early_exit=True), log=lambda m: None)
    assert rep.inputs == rep.embedded == rep.rows == len(bodies) + len(errors) + 1
    assert rep.error_rows == len(errors) + 1 and rep.shards >= 2
    rows = read_rows(out)
    check_rows(rows, expected_rows(model_dir, bodies, True), {**errors, missing: "cannot read"})
    assert len({r["exit_layer"] for r in rows if r["exit_layer"] is not None}) > 1, "the exits were not used"


def kill_once_embedder(marker: str):
    """An Embedder whose process is SIGKILLed in its second batch, once (``marker`` records it)."""
    class KillOnceEmbedder(Embedder):
        calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == 2:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    pass
                else:
                    os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(batch)

    return KillOnceEmbedder


def kill_once_decoder(marker: str, victim: str):
    """decode_batch, except that the task decoding ``victim`` kills its process once."""
    def decode(batch, **kwargs):
        if victim in batch.column("path").to_pylist():
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return decode_batch(batch, **kwargs)

    return decode


def test_killed_workers_are_retried_and_every_input_has_one_row(local_ray, model_dir, collection, tmp_path):
    data = str(collection["shards"] / "s-{000..003}.tar")
    listing = list_inputs(data)
    actor_marker, decode_marker = str(tmp_path / "actor-killed"), str(tmp_path / "decoder-killed")
    out = tmp_path / "out"
    with deadline(RAY_TIMEOUT_S):
        rep = run_embed(config(model_dir, data, out), embedder_cls=kill_once_embedder(actor_marker),
                        decode_fn=kill_once_decoder(decode_marker, listing.path[5]), log=lambda m: None)
    assert os.path.exists(actor_marker) and os.path.exists(decode_marker), "no worker was killed"
    shard_bodies = {p: b for p, b in collection["bodies"].items() if MEMBER_SEP in p}
    shard_errors = {p: e for p, e in collection["errors"].items() if p.startswith(str(collection["shards"]))}
    assert rep.rows == len(listing) == len(shard_bodies) + len(shard_errors)
    check_rows(read_rows(out), expected_rows(model_dir, shard_bodies, False), shard_errors)


def test_resume_after_an_interrupted_run_embeds_only_what_is_missing(local_ray, model_dir, collection, tmp_path):
    bodies, _ = _files_only(collection)
    paths = sorted(bodies)
    first, second = tmp_path / "first.txt", tmp_path / "all.txt"
    first.write_text("\n".join(paths[: len(paths) // 2 + 2]) + "\n")
    second.write_text("\n".join(paths) + "\n")
    out = tmp_path / "out"
    with deadline(RAY_TIMEOUT_S):
        run_embed(config(model_dir, first, out, rows_per_shard=4), log=lambda m: None)
    # an interrupted run: one shard lost, and one written halfway (no Parquet footer)
    shards = shard_files(out)
    assert len(shards) >= 2
    import pyarrow.parquet as pq

    lost = pq.read_table(shards[0], columns=["path"]).column("path").to_pylist()
    shards[0].unlink()
    (out / "part-0123abcd-000099-0.parquet").write_bytes(shards[1].read_bytes()[:200])
    with pytest.raises(EmbedError, match="pass --resume"):
        run_embed(config(model_dir, second, out), log=lambda m: None)
    notes = []
    with deadline(RAY_TIMEOUT_S):
        rep = run_embed(config(model_dir, second, out, resume=True), log=notes.append)
    kept = len(paths) // 2 + 2 - len(lost)
    assert rep.embedded == len(paths) - kept and rep.rows == len(paths)
    assert any("removed 1 incomplete shard" in n for n in notes), notes
    check_rows(read_rows(out), expected_rows(model_dir, bodies, False), {})
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and [r["kept_rows"] for r in manifest["runs"]] == [0, kept]
    with pytest.raises(EmbedError, match="early_exit"):
        run_embed(config(model_dir, second, out, resume=True, early_exit=True), log=lambda m: None)
