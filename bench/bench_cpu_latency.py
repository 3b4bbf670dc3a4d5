"""Latency of ViT-B-32 visual at batch 1 and 8 on CPU (what a server sees), every provider in the same run.

    pytest bench/bench_cpu_latency.py --benchmark-only

Each provider is checked against FP32 open_clip before it is timed; ``extra_info`` holds the median
and best latency, images/s and the machine (CPU, kernel ISA). Target: ours never slower than
open_clip bf16 at either batch size.
"""

from __future__ import annotations

import pytest
import torch

from peers import PeerUnavailable, builder, model_info, platform_info

PROVIDERS = ("open_clip_bf16", "ort_int8", "openvino_int8", "lra_int8", "lra_int8_static")
BATCHES = (1, 8)
ROUNDS = {1: 30, 8: 12}
_built: dict = {}


def _fn(name, tower, calibration_images, threads):
    if name not in _built:
        try:
            _built[name] = builder(name)(tower.visual, calibration_images, workdir=tower.workdir, threads=threads)
        except PeerUnavailable as err:
            _built[name] = err
    fn = _built[name]
    if isinstance(fn, PeerUnavailable):
        pytest.skip(f"{name} unavailable: {fn}")
    return fn


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", PROVIDERS)
def test_vit_b32_cpu_latency(benchmark, name, batch, random_tower, images, calibration_images, threads, quiet_gate):
    fn = _fn(name, random_tower, calibration_images, threads)
    x = images[:batch].contiguous()
    out = fn(x)  # warm-up (compiles ours on the first call of a new batch size)
    cos = torch.nn.functional.cosine_similarity(out.float(), random_tower.reference[:batch], dim=-1).mean().item()
    assert cos > 0.9, f"{name}: cosine {cos:.4f} to FP32; not timing a broken provider"
    benchmark.group = f"ViT-B-32 visual, CPU latency, batch {batch}"
    benchmark.pedantic(fn, args=(x,), rounds=ROUNDS[batch], iterations=1, warmup_rounds=2,
                       setup=quiet_gate.setup, teardown=quiet_gate.teardown)
    stats = benchmark.stats.stats if benchmark.stats else None
    benchmark.extra_info.update({
        "batch": batch,
        "latency_ms_median": 1e3 * stats.median if stats else None,
        "latency_ms_min": 1e3 * stats.min if stats else None,
        "img_per_s_median": batch / stats.median if stats else None,
        "cosine_fp32": cos,
        "other_load_max": max(quiet_gate.loads, default=None),
        **model_info(fn),
        **platform_info(),
    })
