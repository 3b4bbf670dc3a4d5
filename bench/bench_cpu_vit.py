"""ViT-B-32 vision tower throughput on CPU at batch 32, every provider in the same run.

    pytest bench/ --benchmark-only

Per provider: build on the random tower, check its embeddings against FP32 open_clip (a broken
provider is never timed), build again on the outlier tower for its fidelity only, then time the
random-tower build. Results land in ``benchmark.extra_info`` and in the summary table.
"""

from __future__ import annotations

import gc

import pytest
import torch

from peers import PROVIDERS, PeerUnavailable, builder, model_info, platform_info

COSINE_FLOOR = 0.9  # loose: only catches a broken provider
ROUNDS = 8


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the batch of the cosine similarity of two embedding batches."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


def _build(name, tower, calibration_images, threads, results):
    try:
        return builder(name)(tower.visual, calibration_images, workdir=tower.workdir, threads=threads)
    except PeerUnavailable as err:
        results[name] = {"skipped": str(err)}
        pytest.skip(f"{name} unavailable: {err}")


def _best_round_load(stats, gate):
    """Other processes' CPU share during the fastest timed round (the one img/s is taken from)."""
    n = len(stats.data) if stats else 0
    loads = gate.loads[-n:] if n else []  # the warm-up round comes first
    if not n or len(loads) != n:
        return None
    return loads[min(range(n), key=stats.data.__getitem__)]


@pytest.mark.parametrize("name", PROVIDERS)
def test_vit_b32_cpu(
    benchmark, name, random_tower, outlier_tower, images, calibration_images, threads, results, quiet_gate
):
    fn = _build(name, random_tower, calibration_images, threads, results)
    # The first call also warms up (torch.compile of ours, ORT/OpenVINO first-run allocations).
    cos = cosine(fn(images), random_tower.reference)
    assert cos > COSINE_FLOOR, f"{name}: cosine {cos:.4f} to FP32 open_clip on the random tower; not timing a broken provider"

    outlier_fn = _build(name, outlier_tower, calibration_images, threads, results)
    cos_outlier = cosine(outlier_fn(images), outlier_tower.reference)
    del outlier_fn
    gc.collect()

    batch = images.shape[0]
    benchmark.group = f"ViT-B-32 visual, CPU, batch {batch}"
    benchmark.pedantic(
        fn,
        args=(images,),
        rounds=ROUNDS,
        iterations=1,
        warmup_rounds=1,
        setup=quiet_gate.setup,
        teardown=quiet_gate.teardown,
    )

    stats = benchmark.stats.stats if benchmark.stats else None  # None under --benchmark-disable
    info = {
        "img_per_s": batch / stats.min if stats else None,
        "img_per_s_median": batch / stats.median if stats else None,
        "cosine_fp32": cos,
        "cosine_fp32_outlier_tower": cos_outlier,
        "batch": batch,
        "threads": threads,
        "other_load_best_round": _best_round_load(stats, quiet_gate),
        "other_load_max": max(quiet_gate.loads[1:], default=None),
        "quiet_wait_s": quiet_gate.waited,
    }
    if hasattr(fn, "precision"):
        info["inference_precision"] = fn.precision
    info.update(model_info(fn))
    info.update(platform_info())
    benchmark.extra_info.update(info)
    results[name] = info
