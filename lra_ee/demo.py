"""``lra-ee demo``: the main job on a built-in default, no download.

ViT-B-32 with seeded random weights and planted activation outlier channels like trained
CLIP's; the built-in synthetic task (``lra_ee.synthetic.builtin_task``); the paper's INT8
scheme and a better quantizer (per-token + SmoothQuant), each with and without LRA-EE;
QIRC curves of every scheme; the controls (FP32 early exit, static exit, oracle, random gate,
head confound, batch sensitivity of the paper's scheme); CPU throughput of FP32, INT8 full depth
and INT8 early exit. Everything is labelled synthetic: these numbers show the machinery, not
CLIP's accuracy.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lra_kernels import ExitPolicy

from .controls import merge_controls
from .data import TensorSource
from .experiment import ExperimentConfig, run_experiment
from .qirc import diagnose
from .report import write_report
from .results import DemoReport
from .schemes import SCHEME_HELP, SCHEME_LABEL, SCHEMES, quantize
from .synthetic import builtin_task, plant_outlier_channels, random_tower

NOTE = ("Seeded random weights with planted outlier channels and a synthetic task: these figures show how the "
        "method and the kernels behave, not CLIP's accuracy on real images.")


def _throughput(fn, images: torch.Tensor, seconds: float) -> float:
    fn(images)  # warm-up (compiles on first call)
    fn(images)
    n, start = 0, time.perf_counter()
    while True:
        fn(images)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= 2:
            return n * images.shape[0] / elapsed


def run_demo(out_dir: str | Path, model: str = "ViT-B-32", seed: int = 0, n_images: int = 600, n_classes: int = 20,
             batch_size: int = 32, bench_seconds: float = 3.0, schemes: tuple[str, ...] = ("paper", "smoothquant"),
             main_scheme: str = "smoothquant", exit_layers="auto", quiet: bool = False,
             sensitivity_limit: int = 64) -> DemoReport:
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    say(f"building {model} (seeded random weights, planted outlier channels) and the synthetic task ...")
    tower = random_tower(model, seed)
    plan = plant_outlier_channels(tower, seed=seed)
    task = builtin_task(tower, n_classes=n_classes, n_images=n_images, seed=seed)
    source = TensorSource(task.images, task.labels, task.class_names, name="builtin")

    results, fp32 = {}, None
    for scheme in schemes:
        cfg = ExperimentConfig(scheme=scheme, exit_layers=exit_layers, seeds=(seed, seed + 1, seed + 2),
                               batch_size=batch_size, n_boot=1000, ablate=True, sensitivity_limit=sensitivity_limit)
        res = run_experiment(tower, source, task.text_features, cfg, task.class_names, fp32=fp32, progress=not quiet)
        fp32 = res.fp32
        results[scheme] = res
        r = res.report
        say(f"  {scheme:<12} full {100 * r.acc_full:.1f}%  EE {100 * r.acc_ee:.1f}%  "
            f"FLOPs saved {100 * r.flops_saving:.1f}%  ({r.seconds:.0f}s)")

    main = results[main_scheme]
    curves = {s: results[s].report.nsr_per_layer for s in schemes}
    for scheme in tqdm([s for s in SCHEMES if s not in curves], desc="QIRC of the other schemes", disable=quiet):
        q = quantize(tower, scheme, main.quant_calibration_images)
        curves[scheme] = diagnose(tower, q, main.qirc_images, scheme, reference=main.fp32.qirc_reference).nsr_per_layer

    bench = task.images[:batch_size]
    qvit = main.model
    policy = qvit.exit_policy
    runs = {
        "open_clip fp32": lambda x: tower(x),
        f"int8 {main_scheme} full depth": lambda x: qvit.classify(x, policy=ExitPolicy.disabled()),
        f"int8 {main_scheme} + LRA-EE": lambda x: qvit.classify(x, policy=policy),
    }
    img_s = {}
    for name, fn in tqdm(runs.items(), desc="throughput", disable=quiet):
        with torch.inference_mode():
            img_s[name] = _throughput(fn, bench, bench_seconds)

    report = DemoReport.of(
        main.report.with_header(model=model, weights="random-seeded", note=NOTE, data=task.description),
        controls=merge_controls([results[s].report.controls for s in schemes]),
        flags=[f"{s}: {f}" for s in schemes for f in results[s].report.flags],
        outlier_channels={"residual": list(plan.residual_channels), "layernorm": list(plan.ln_channels),
                          "ratio": plan.ratio},
        schemes={s: results[s].report.scheme_summary() | {"description": SCHEME_HELP[s]} for s in schemes},
        nsr_per_scheme=curves,
        throughput={"img_per_s": img_s, "device": "cpu", "batch_size": batch_size, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine()},
    )
    report.seconds_total = time.perf_counter() - t0
    sweeps = {s: {**results[s].report.tau0_sweep, "acc_full": results[s].report.acc_full,
                  "operating": {"relative_flops": 1 - results[s].report.flops_saving,
                                "acc_ee": results[s].report.acc_ee}}
              for s in schemes}
    write_report(out_dir, report, qirc_curves={SCHEME_LABEL[s]: c for s, c in curves.items()},
                 quadrants={SCHEME_LABEL[s]: results[s].report.quadrants for s in schemes},
                 sweeps={SCHEME_LABEL[s]: v for s, v in sweeps.items()})
    qvit.save(out_dir / "model")
    return report


def format_summary(report: DemoReport) -> str:
    lines = [f"{report.model} ({report.weights} weights, synthetic task) — {report.note}", ""]
    lines.append(f"{'scheme':<14}{'FP32':>8}{'INT8':>8}{'INT8+EE':>9}{'delta (95% CI)':>24}{'rescued':>9}{'hurt':>7}"
                 f"{'FLOPs saved':>13}{'final NSR':>11}")
    for name, s in report.schemes.items():
        ci = s["delta_ci95"]
        lines.append(f"{name:<14}{100 * s['acc_fp32']:>7.1f}%{100 * s['acc_full']:>7.1f}%{100 * s['acc_ee']:>8.1f}%"
                     f"{100 * s['delta']:>+9.2f} [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"
                     f"{100 * s['quadrants']['rescued']:>8.1f}%{100 * s['quadrants']['hurt']:>6.1f}%"
                     f"{100 * s['flops_saving']:>12.1f}%{100 * s['nsr_per_layer'][-1]:>10.1f}%")
    lines += ["", "(accuracy, quadrants and FLOPs measured through the executor on recorded batches)"]
    lines += [f"flag: {f}" for f in report.flags]
    c = report.controls or {}
    if c.get("rescued_minus_hurt_by_nsr"):
        lines += ["", "controls (random weights, synthetic task):",
                  "  rescued - hurt by final NSR: " + "; ".join(
                      f"{e['scheme']} (NSR {100 * e['final_nsr']:.1f}%) {100 * e['rescued_minus_hurt']:+.2f} pp "
                      f"[{100 * e['ci95'][0]:+.2f}, {100 * e['ci95'][1]:+.2f}]"
                      for e in c["rescued_minus_hurt_by_nsr"])]
    for scheme, g in (c.get("random_gate") or {}).items():
        lines.append(f"  random gate ({scheme}): rescued - hurt {100 * g['random_mean']:+.2f} pp "
                     f"[{100 * g['random_ci95'][0]:+.2f}, {100 * g['random_ci95'][1]:+.2f}] "
                     f"vs the gate's on the same tables "
                     f"{100 * g['gate_rescued_minus_hurt']:+.2f} pp (p = {g['p_value']:.3g})")
    for scheme, o in (c.get("oracle") or {}).items():
        e = o["exit_set"]
        lines.append(f"  oracle ({scheme}, exits {e['layers']}): at most {100 * e['rescued']:.1f}% rescued")
    for scheme, h in (c.get("head_confound") or {}).items():
        lines.append(f"  head confound ({scheme}): patch mean at full depth {100 * h['acc_patch_mean_at_depth']:.1f}% "
                     f"vs own head {100 * h['acc_own_head']:.1f}%")
    for scheme, b in (c.get("batch_sensitivity") or {}).items():
        lines.append(f"  batch sensitivity ({scheme}, {b['n']} images, batch 1/32/256, sorted/shuffled): INT8 full "
                     f"{100 * b['acc_full_range'][0]:.1f}..{100 * b['acc_full_range'][1]:.1f}%, early exit "
                     f"{100 * b['acc_ee_range'][0]:.1f}..{100 * b['acc_ee_range'][1]:.1f}%")
    t = report.throughput
    lines += ["", f"throughput ({t['device']}, batch {t['batch_size']}, {t['threads']} threads): " +
              ", ".join(f"{k} {v:.1f} img/s" for k, v in t["img_per_s"].items())]
    lines.append(f"total {report.seconds_total:.0f}s")
    return "\n".join(lines)
