"""``lra-ee demo``: the main job on a built-in default, no download.

This first version quantizes a ViT-B-32 with seeded random weights, with and without planted
outlier channels, under each scheme, and reports fidelity to FP32 and CPU throughput.
All figures come from random-weight towers: they say how faithful and how fast the INT8
tower is, not how accurate CLIP is.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lra_kernels import QuantEarlyExitViT

from .synthetic import plant_outlier_channels, random_tower

SCHEMES = {
    "paper (quantize_dynamic emulation)": dict(act_quant="paper"),
    "per_token": dict(),
    "per_token + SmoothQuant 0.5": dict(smooth_alpha=0.5, calibrate=True),
    "per_tensor_static + SmoothQuant 0.5": dict(act_quant="per_tensor_static", smooth_alpha=0.5, calibrate=True),
}


def _fidelity(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    cos = F.cosine_similarity(out.float(), ref.float(), dim=-1)
    err = (ref.double() - out.double()).pow(2).sum()
    sqnr = float(10 * torch.log10(ref.double().pow(2).sum() / err)) if err > 0 else float("inf")
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "sqnr_db": sqnr}


def _throughput(fn, images: torch.Tensor, seconds: float) -> float:
    fn(images)  # warm-up (compiles on first call)
    n, start = 0, time.perf_counter()
    while True:
        fn(images)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= 2:
            return n * images.shape[0] / elapsed


def run_demo(out_dir: str | Path, model: str = "ViT-B-32", seed: int = 0, n_images: int = 32,
             batch_size: int = 32, bench_seconds: float = 4.0, quiet: bool = False) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed + 1)
    towers = {"random": random_tower(model, seed)}
    towers["outlier"] = copy.deepcopy(towers["random"])
    plan = plant_outlier_channels(towers["outlier"], seed=seed)
    h, w = towers["random"].image_size
    images = torch.randn(n_images, 3, h, w, generator=gen)
    calib = torch.randn(32, 3, h, w, generator=gen)

    with torch.no_grad():
        refs = {name: tower(images) for name, tower in towers.items()}
    fidelity: dict[str, dict[str, dict[str, float]]] = {}
    steps = [(t, s) for t in towers for s in SCHEMES]
    for tower_name, scheme in tqdm(steps, desc="quantize + compare", disable=quiet):
        kwargs = dict(SCHEMES[scheme])
        if kwargs.pop("calibrate", False):
            kwargs["calibration_images"] = calib
        q = QuantEarlyExitViT.from_open_clip(towers[tower_name], compile_blocks=False, **kwargs)
        fidelity.setdefault(tower_name, {})[scheme] = _fidelity(refs[tower_name], q(images))

    bench_images = torch.randn(batch_size, 3, h, w, generator=gen)
    fp32 = towers["random"]
    ours = QuantEarlyExitViT.from_open_clip(fp32)
    throughput = {}
    for name, fn in tqdm([("open_clip fp32", fp32), ("ours int8 per_token", ours)], desc="throughput", disable=quiet):
        with torch.inference_mode():
            throughput[name] = _throughput(fn, bench_images, bench_seconds)

    report = {
        "model": model,
        "weights": "random-seeded",
        "seed": seed,
        "note": "Seeded random weights and random inputs: fidelity and speed only, not accuracy on real data.",
        "outlier_tower": {"residual_channels": plan.residual_channels, "ln_channels": plan.ln_channels,
                          "outlier_ratio": plan.ratio},
        "n_images": n_images,
        "fidelity_vs_fp32": fidelity,
        "throughput": {"img_per_s": throughput, "device": "cpu", "batch_size": batch_size,
                       "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
        "speedup_vs_fp32": throughput["ours int8 per_token"] / throughput["open_clip fp32"],
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['model']} ({report['weights']} weights; fidelity and speed, not accuracy)", ""]
    lines.append(f"{'scheme':<38} {'tower':<8} {'cosine':>9} {'min':>9} {'SQNR dB':>8}")
    for tower, schemes in report["fidelity_vs_fp32"].items():
        for scheme, f in schemes.items():
            lines.append(f"{scheme:<38} {tower:<8} {f['cosine_mean']:>9.5f} {f['cosine_min']:>9.5f} {f['sqnr_db']:>8.1f}")
    t = report["throughput"]
    lines += ["", f"throughput, {t['device']}, batch {t['batch_size']}, {t['threads']} threads:"]
    for name, v in t["img_per_s"].items():
        lines.append(f"  {name:<24} {v:8.1f} img/s")
    lines.append(f"  speed-up vs FP32: {report['speedup_vs_fp32']:.2f}x")
    return "\n".join(lines)
