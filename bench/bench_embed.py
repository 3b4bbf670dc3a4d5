"""``lra-ee embed`` on Ray Data against a plain loop over the same model: images/s, and where the time goes.

ViT-B-32 with **seeded random weights** (``lra_ee.synthetic.random_tower``), converted with
``QuantEarlyExitViT.from_open_clip`` (INT8, full depth) and saved; ``N_IMAGES`` JPEGs of 256-400
px a side that the benchmark writes (smooth colour fields plus noise). Three figures:

- **model**: the model's own throughput at batch ``BATCH`` on images already preprocessed in memory;
- **plain loop**: one process, batch by batch: read + decode + preprocess every image of the batch
  (``lra_ee.serve.preprocess_body``, the saved model's open_clip transform), then the model; its
  decode and model times give the share of each;
- **lra-ee embed**: ``run_embed`` (what the command runs) on a local Ray started beforehand (Ray's
  start is not timed), full depth, batch ``BATCH``, one model actor. Each run starts its own actor
  (model load, block compilation), a fixed cost, so the steady rate is the marginal one:
  ``(N_IMAGES - N_SMALL) / (t(N_IMAGES) - t(N_SMALL))``, after one untimed warm-up run (which fills
  the compilation cache, so that both timed runs start alike). The whole run's rate (fixed costs
  included) is reported beside it.

The embed output is checked against the model run here before the figures count.

    python -m pytest bench/bench_embed.py --benchmark-only -s     # 3-5 minutes on 2 cores; needs ray[data]

Each phase starts once other processes leave the CPU nearly idle (``--quiet-wait``, bench/conftest.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

MODEL = "ViT-B-32"
BATCH = 256
N_IMAGES = 1024
N_SMALL = 256
MODEL_REPEATS = 3


def _picture(rng, h, w) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    a = rng.uniform(-3, 3, size=(3, 3))
    base = np.stack([np.sin(a[c, 0] * xx * 6 + a[c, 1] * yy * 6 + a[c, 2]) for c in range(3)], -1)
    return (127.5 + 100 * base + rng.normal(0, 12, size=(h, w, 3))).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    from PIL import Image

    from lra_ee.synthetic import random_tower
    from lra_kernels import QuantEarlyExitViT

    root = tmp_path_factory.mktemp("bench-embed")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    paths = []
    for i in range(N_IMAGES):
        h, w = (int(v) for v in rng.integers(256, 401, size=2))
        p = root / "images" / f"{i:05d}.jpg"
        Image.fromarray(_picture(rng, h, w)).save(p, "JPEG", quality=90)
        paths.append(str(p))
    (root / "small.txt").write_text("\n".join(paths[:N_SMALL]) + "\n")
    (root / "all.txt").write_text("\n".join(paths) + "\n")
    qvit = QuantEarlyExitViT.from_open_clip(random_tower(MODEL, seed=0))
    model_dir = qvit.save(root / "model")
    return {"root": root, "paths": paths, "model_dir": model_dir, "model": QuantEarlyExitViT.load(model_dir)}


def _preprocess(model, paths):
    from lra_ee.data import preprocess_from_cfg
    from lra_ee.serve import preprocess_body

    transform = preprocess_from_cfg(model.preprocess_cfg, tuple(model.image_size))
    return torch.stack([preprocess_body(Path(p).read_bytes(), transform) for p in paths])


def _model_only(model, x) -> float:
    model(x)  # warm-up: block compilation, caches
    best = float("inf")
    for _ in range(MODEL_REPEATS):
        t = time.perf_counter()
        model(x)
        best = min(best, time.perf_counter() - t)
    return x.shape[0] / best


def _plain_loop(model, paths) -> dict:
    decode_s = model_s = 0.0
    rows = []
    for s in range(0, len(paths), BATCH):
        t0 = time.perf_counter()
        x = _preprocess(model, paths[s : s + BATCH])
        t1 = time.perf_counter()
        rows.append(model(x))
        t2 = time.perf_counter()
        decode_s += t1 - t0
        model_s += t2 - t1
    total = decode_s + model_s
    return {"img_s": len(paths) / total, "decode_s": decode_s, "model_s": model_s, "decode_share": decode_s / total,
            "decode_ms_per_image": 1e3 * decode_s / len(paths), "model_ms_per_image": 1e3 * model_s / len(paths),
            "embeddings": torch.cat(rows)}


def _embed(workload, listing: str, out: Path) -> float:
    from lra_ee.embed import EmbedConfig, run_embed

    cfg = EmbedConfig(model_dir=str(workload["model_dir"]), data=str(workload["root"] / listing), out=str(out),
                      batch_size=BATCH)
    t = time.perf_counter()
    rep = run_embed(cfg, log=lambda m: None)
    seconds = time.perf_counter() - t
    assert rep.error_rows == 0 and rep.rows == rep.inputs
    return seconds


def test_embed_vs_plain_loop(benchmark, workload, quiet_gate):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    import pyarrow.parquet as pq

    from lra_ee.embed import _cpus
    from lra_kernels.hardware import cpu_caps

    model, paths, root = workload["model"], workload["paths"], workload["root"]
    threads = torch.get_num_threads()
    x = _preprocess(model, paths[:BATCH])
    quiet_gate.setup()  # each phase starts once other processes leave the CPU idle (shared machines)
    model_img_s = _model_only(model, x)
    quiet_gate.teardown()
    quiet_gate.setup()
    plain = _plain_loop(model, paths)
    quiet_gate.teardown()
    others = list(quiet_gate.loads)  # other processes' share of the CPU in those two phases

    cpus = _cpus()
    ray.init(address="local", num_cpus=max(cpus, 2), include_dashboard=False, log_to_driver=False)  # as run_embed
    try:
        _embed(workload, "small.txt", root / "out-warmup")
        quiet_gate.setup()  # (Ray's workers are other processes: no load share is recorded for these)
        t_small = _embed(workload, "small.txt", root / "out-small")
        t_all: dict = {}
        benchmark.pedantic(lambda: t_all.setdefault("s", _embed(workload, "all.txt", root / "out-all")),
                           setup=quiet_gate.setup, rounds=1, iterations=1, warmup_rounds=0)
    finally:
        ray.shutdown()

    table = pq.read_table(root / "out-all")
    got = dict(zip(table.column("path").to_pylist(), table.column("embedding").to_pylist()))
    assert len(got) == N_IMAGES
    ref = plain["embeddings"]
    emb = torch.tensor([got[p] for p in paths])
    cos = torch.nn.functional.cosine_similarity(emb, ref, dim=-1)
    assert float(cos.min()) > 0.9999, f"embed output differs from the model run here: min cosine {float(cos.min())}"

    steady = (N_IMAGES - N_SMALL) / (t_all["s"] - t_small)
    info = {
        "model": MODEL, "weights": "seeded random", "cpu": cpu_caps().summary(), "cpus": cpus, "torch_threads": threads,
        "batch": BATCH, "images": N_IMAGES,
        "model_img_s": model_img_s,
        "plain_loop_img_s": plain["img_s"],
        "plain_decode_share": plain["decode_share"],
        "decode_ms_per_image": plain["decode_ms_per_image"],
        "model_ms_per_image": plain["model_ms_per_image"],
        "embed_steady_img_s": steady,
        "embed_run_img_s": N_IMAGES / t_all["s"],
        "embed_run_s": t_all["s"], "embed_small_run_s": t_small,
        "embed_vs_model": steady / model_img_s,
        "embed_vs_plain_loop": steady / plain["img_s"],
        "other_load_model_plain": others,
        "quiet_wait_s": quiet_gate.waited,
        "load_average_1min_after": os.getloadavg()[0],
    }
    benchmark.extra_info.update(info)
    print(f"\n{info['cpu']}, {cpus} CPUs, torch threads {threads}; {MODEL} seeded random weights, batch {BATCH}")
    print(f"  model alone (preprocessed in memory)  {model_img_s:7.1f} img/s")
    print(f"  plain loop (decode, then model)        {plain['img_s']:7.1f} img/s   decode "
          f"{info['decode_ms_per_image']:.2f} ms/img ({100 * plain['decode_share']:.0f}% of the time), model "
          f"{info['model_ms_per_image']:.2f} ms/img")
    print(f"  lra-ee embed, steady ({N_IMAGES}-{N_SMALL} images)  {steady:7.1f} img/s   "
          f"{100 * info['embed_vs_model']:.0f}% of the model alone, {info['embed_vs_plain_loop']:.2f}x the plain loop")
    print(f"  lra-ee embed, whole run of {N_IMAGES}      {info['embed_run_img_s']:7.1f} img/s   ({t_all['s']:.1f} s, "
          f"{N_SMALL} images: {t_small:.1f} s)")
    print(f"  other processes' CPU share during model / plain loop: {', '.join(f'{100 * v:.0f}%' for v in others)}; "
          f"waited {quiet_gate.waited:.0f} s for quiet; load average after {info['load_average_1min_after']:.1f}")
