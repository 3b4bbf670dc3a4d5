"""The ``lra-ee`` command line.

    lra-ee demo      [--out DIR]                                  the main job, built-in, no download
    lra-ee calibrate --model M --pretrained P --data DIR ...       quantize + calibrate, save a model directory
    lra-ee evaluate  (--model-dir DIR | --model M --pretrained P) --data DIR ...
    lra-ee diagnose  --model M --pretrained P [--data DIR]         QIRC curves of every scheme
    lra-ee serve     --model-dir DIR                               HTTP serving on Ray Serve
    lra-ee embed     --model-dir DIR --data PATH --out OUT         embed an image collection on Ray Data (Parquet)

Bad or missing weights / data give one error line and exit code 2 (``lra_ee.errors.UserError``).

Each command is a ``_add_<command>(sub)`` that declares its arguments and ``set_defaults(func=...)``
its handler, listed once in ``COMMANDS``; a new command is one more of those (``serve`` lives in
``lra_ee.serve.cli``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .errors import EXIT_USAGE, UserError

CLIError = UserError  # the name the commands raise


# ---------------------------------------------------------------------- loading
def load_clip(model: str, pretrained: str, device: str, seed: int = 0):
    """``(clip, preprocess, tokenizer, weights_label)``; ``pretrained="random"`` gives seeded random weights.
    Model ids as open_clip's (``hf-hub:org/name``, ``local-dir:/path``, a checkpoint file or folder): see
    ``lra_ee.model_ids``."""
    from .model_ids import load_clip as _load

    return _load(model, pretrained, device, seed)


def _source(path: str, preprocess, classnames, name, workers):
    from .data import DataError, load_image_folder

    try:
        return load_image_folder(path, preprocess, class_names=classnames, name=name, num_workers=workers)
    except DataError as err:
        raise UserError(str(err)) from None


def _classifier(args, clip, tokenizer, class_names, weights_label):
    from .data import DataError, load_templates, text_classifier

    if class_names is None:
        raise UserError("the images have no class folders and no --classnames file was given: "
                       "zero-shot classes are unknown")
    try:
        templates = load_templates(args.templates)
    except DataError as err:
        raise UserError(str(err)) from None
    return text_classifier(clip, tokenizer, class_names, templates, f"{args.model}:{weights_label}",
                           cache_dir=args.cache_dir, device=args.device)


def _classnames(args):
    from .data import DataError, load_classnames

    if not args.classnames:
        return None
    try:
        return load_classnames(args.classnames)
    except (DataError, OSError) as err:
        raise UserError(f"--classnames: {err}") from None


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise UserError("--seeds needs at least one seed")
    return seeds


def _exit_layers(text: str):
    return text if text in ("auto", "paper") else tuple(int(x) for x in text.split(","))


def _print_summary(r) -> None:
    """The headline numbers of an ``ExperimentReport`` or a ``ModelEvaluationReport``."""
    def pct(v):
        return "–" if v is None else f"{100 * v:.2f}%"

    n_cal = "" if r.n_calibration is None else f"{r.n_calibration} calibration / "
    print(f"\n{r.model} [{r.weights}] on {r.data} — scheme {r.scheme}, {n_cal}{r.n_eval} evaluation images")
    print(f"  top-1  FP32 {pct(r.acc_fp32)}   INT8 full {pct(r.acc_full)}   INT8 + LRA-EE {pct(r.acc_ee)}")
    ci = r.delta_ci95
    print(f"  delta  {100 * r.delta:+.2f} pp  (95% CI {100 * ci[0]:+.2f} .. {100 * ci[1]:+.2f})   "
          f"McNemar p {r.mcnemar_p:.3g}")
    q = r.quadrants
    print(f"  quadrants  both right {pct(q['both_right'])}  rescued {pct(q['rescued'])}  hurt {pct(q['hurt'])}  "
          f"both wrong {pct(q['both_wrong'])}")
    print(f"  FLOPs  {r.flops_ee / 1e9:.3f} vs {r.flops_full / 1e9:.3f} GFLOPs/image "
          f"({pct(r.flops_saving)} saved); "
          f"exits {r.exit_histogram}")


# ---------------------------------------------------------------------- commands
_AT_LEAST = {"batch_size": 1, "images": 1, "classes": 2, "quant_calib_images": 1, "qirc_images": 1, "workers": 0}


def _check_counts(args: argparse.Namespace) -> None:
    """The count options a command has, each at least its minimum (else one UserError line)."""
    for name, low in _AT_LEAST.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    seconds = getattr(args, "bench_seconds", None)
    if seconds is not None and not seconds > 0:
        raise UserError(f"--bench-seconds must be > 0, got {seconds}")


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_summary, run_demo

    _check_counts(args)
    try:
        report = run_demo(args.out, model=args.model, seed=args.seed, batch_size=args.batch_size,
                          bench_seconds=args.bench_seconds, n_images=args.images, n_classes=args.classes)
    except ValueError as err:  # too few images for the splits, more classes than images, ...
        raise UserError(f"demo: {err}") from None
    print(format_summary(report))
    print(f"\nreport: {args.out}/report.md, {args.out}/report.json; model: {args.out}/model")
    return 0


def _experiment_config(args):
    from .experiment import ExperimentConfig

    return ExperimentConfig(scheme=args.scheme, exit_layers=_exit_layers(args.exit_layers), alpha=args.alpha,
                            flops_budget=args.flops_budget, calib_fraction=args.calib_fraction,
                            seeds=_seeds(args.seeds),
                            batch_size=args.batch_size, backend=args.backend, n_quant_calib=args.quant_calib_images,
                            n_qirc=args.qirc_images)


def _calibrate(args: argparse.Namespace) -> int:
    from .api import calibrate
    from .data import split_indices
    from .report import plot_qirc, write_json

    _check_counts(args)
    cfg = _experiment_config(args)
    args.model = args.model or "ViT-B-32"
    clip, preprocess, tokenizer, weights = load_clip(args.model, args.pretrained, args.device, args.seed)
    names = _classnames(args)
    if args.calib_data:
        calib = _source(args.calib_data, preprocess, names, "calibration", args.workers)
        class_names = names or calib.class_names
        if class_names is None and args.data:
            class_names = _source(args.data, preprocess, None, "data", args.workers).class_names
    elif args.data:
        data = _source(args.data, preprocess, names, "data", args.workers)
        c_idx, _ = split_indices(len(data), args.calib_fraction, cfg.seeds[0])
        calib, class_names = data.subset(c_idx, "calibration"), data.class_names
    else:
        raise UserError("calibrate needs --calib-data DIR or --data DIR (with --calib-fraction)")
    text = _classifier(args, clip, tokenizer, class_names, weights)
    try:
        qvit, report = calibrate(clip.visual, calib, text, scheme=cfg.scheme, exit_layers=cfg.exit_layers,
                                 alpha=cfg.alpha, flops_budget=cfg.flops_budget, class_names=list(class_names),
                                 n_quant_calib=cfg.n_quant_calib, n_qirc=cfg.n_qirc, batch_size=args.batch_size,
                                 backend=args.backend, progress=True, seed=cfg.seeds[0], model_name=args.model,
                                 pretrained=args.pretrained, weights_seed=args.seed)
    except ValueError as err:
        raise UserError(str(err)) from None
    out = Path(args.out)
    qvit.save(out / "model")
    rep = {"model": args.model, "weights": weights, "data": str(args.calib_data or args.data), **report.to_dict()}
    write_json(out / "calibration.json", rep)
    plot_qirc({cfg.scheme: report.qirc.nsr_per_layer}, out / "qirc_nsr.png", f"QIRC ({args.model}, {weights})")
    print(f"calibrated {args.model} [{weights}] with {cfg.scheme}: exits {report.exit_layers}, thresholds "
          f"{[round(t, 3) for t in report.thresholds]}; calibration top-1 full {100 * report.calib_acc_full:.2f}% -> "
          f"early exit {100 * report.calib_acc_ee:.2f}%, FLOPs saved {100 * report.calib_flops_saving:.1f}%")
    if report.no_early_exit:
        print("early exit does not help here: on the calibration images no threshold beat full depth, "
              "so the saved policy never exits")
    print(f"{len(calib)} calibration images recorded in the model (by content): lra-ee evaluate --model-dir leaves "
          f"them out of its evaluation")
    print(f"model directory: {out / 'model'}; report: {out / 'calibration.json'}")
    return 0


def _evaluate_model_dir(args: argparse.Namespace, names, out: Path):
    from lra_kernels import QuantEarlyExitViT

    from .api import evaluate_model
    from .data import preprocess_from_cfg
    from .provenance import MODEL_KEY, check_reference_tower, exclude_calibration_images
    from .results import ModelEvaluationReport

    try:
        qvit = QuantEarlyExitViT.load(args.model_dir, device=args.device)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    if qvit.classifier is None or not qvit.exit_policy.enabled:
        raise UserError(f"{args.model_dir} has no classifier or no exit policy: write it with lra-ee calibrate")
    recorded = qvit.exit_policy.meta.get(MODEL_KEY) or {}
    model = args.model or recorded.get("open_clip_model") or "ViT-B-32"
    data = _source(args.data, preprocess_from_cfg(qvit.preprocess_cfg), names or qvit.class_names, "evaluation",
                   args.workers)
    try:
        data, check, _ = exclude_calibration_images(qvit, data)
    except ValueError as err:
        raise UserError(f"{err} (the model directory records its calibration images)") from None
    if check["checked"]:
        print(f"calibration and evaluation images disjoint (checked by content hash): {check['n_excluded']} of the "
              f"model's {check['n_calibration_recorded']} calibration images found in {args.data} and left out, "
              f"{check['n_remaining']} evaluation images")
    else:
        print(f"note: {args.model_dir} records no calibration images, so whether they overlap {args.data} "
              f"is NOT checked")
    visual, weights = None, "saved model"
    if args.pretrained:
        clip, _, _, weights = load_clip(model, args.pretrained, args.device, args.seed)
        visual = clip.visual
        try:
            check_reference_tower(qvit, visual, model, args.pretrained, args.seed)
        except ValueError as err:
            raise UserError(str(err)) from None
    ev = evaluate_model(qvit, data, visual, seed=args.seed, batch_size=args.batch_size, progress=True,
                        exclude_calibration=False)
    ev.split_check = check
    meta = qvit.exit_policy.meta
    flags = [] if ev.executor_check["exact"] else [
        f"the exit-table simulation does not match the executor "
        f"({100 * ev.executor_check['prediction_agreement']:.1f}% of predictions agree): the numbers reported "
        f"are the executor's, the table-based controls simulations"]
    return ModelEvaluationReport(model=model, weights=weights, data=args.data, model_dir=args.model_dir,
                                 source_model=recorded or None,
                                 scheme=meta.get("scheme", qvit.quant_config.act_quant), evaluation=ev,
                                 alpha=meta.get("alpha"), tau0=meta.get("tau0"),
                                 no_early_exit=meta.get("no_early_exit", False), seeds=[args.seed], flags=flags)


def _evaluate(args: argparse.Namespace) -> int:
    from .experiment import run_experiment
    from .provenance import source_model_record, with_meta
    from .report import write_report

    _check_counts(args)
    if not args.data:
        raise UserError("evaluate needs --data DIR (an ImageFolder / ImageNet val directory)")
    out = Path(args.out)
    names = _classnames(args)
    if args.model_dir:
        report = _evaluate_model_dir(args, names, out)
        write_report(out, report)
    else:
        if not args.pretrained and not (args.model or "").startswith(("hf-hub:", "local-dir:")):
            raise UserError("evaluate needs --model-dir DIR, or --pretrained (with --model), or --model "
                           "hf-hub:org/name / local-dir:DIR, to calibrate and evaluate in one run")
        cfg = _experiment_config(args)
        args.model = args.model or "ViT-B-32"
        clip, preprocess, tokenizer, weights = load_clip(args.model, args.pretrained, args.device, args.seed)
        data = _source(args.data, preprocess, names, "evaluation", args.workers)
        calib = None
        if args.calib_data:
            calib = _source(args.calib_data, preprocess, names or data.class_names, "calibration", args.workers)
        if not data.has_labels:
            raise UserError(f"{args.data} has no class folders: evaluation needs labelled images "
                            f"(root/<class>/<image>)")
        text = _classifier(args, clip, tokenizer, data.class_names, weights)
        try:
            res = run_experiment(clip.visual, calib or data, text, cfg, data.class_names,
                                 eval_source=data if calib is not None else None)
        except ValueError as err:
            raise UserError(str(err)) from None
        report = res.report.with_header(model=args.model, weights=weights, data=args.data)
        write_report(out, report)
        res.model.exit_policy = with_meta(res.model.exit_policy,
                                          source_model=source_model_record(args.model, args.pretrained, args.seed))
        res.model.save(out / "model")
    _print_summary(report)
    print(f"\nreport: {out / 'report.md'}, {out / 'report.json'}")
    if getattr(args, "format", "lra-ee") == "clip_benchmark":
        _write_clip_benchmark(args, report, out)
    return 0


def _write_clip_benchmark(args: argparse.Namespace, report, out: Path) -> None:
    from .clip_benchmark_format import write_clip_benchmark

    source = getattr(report, "source_model", None) or {}
    pretrained = args.pretrained or source.get("pretrained") or "unknown"
    dataset = args.dataset_name or Path(args.data).resolve().name
    paths = write_clip_benchmark(out / "clip_benchmark", report, dataset=dataset, model=report.model or "unknown",
                                 pretrained=str(pretrained))
    print(f"clip_benchmark results: {', '.join(str(p) for p in paths)} (merge with: clip_benchmark build FILES)")


def _diagnose(args: argparse.Namespace) -> int:
    import torch

    from .data import held_out, images_of
    from .qirc import diagnose, fp32_reference
    from .report import plot_qirc, write_json
    from .schemes import SCHEMES, quantize

    _check_counts(args)

    args.model = args.model or "ViT-B-32"
    clip, preprocess, _, weights = load_clip(args.model, args.pretrained, args.device, args.seed)
    visual = clip.visual
    n_q = args.quant_calib_images
    if args.data:  # seeded random samples, quantizer calibration and QIRC images disjoint
        data = _source(args.data, preprocess, None, "data", args.workers)
        if len(data) < 2:
            raise UserError(f"{args.data} holds {len(data)} image(s): diagnose needs at least 2")
        n_q = min(n_q, len(data) // 2)
        q_idx, r_idx, _ = held_out(len(data), n_q, min(args.images, len(data) - n_q), args.seed)
        calib, images = images_of(data, q_idx), images_of(data, r_idx)
    else:
        h, w = visual.image_size
        rand = torch.randn(n_q + args.images, 3, h, w, generator=torch.Generator().manual_seed(args.seed))
        calib, images = rand[:n_q], rand[n_q:]
    schemes = list(SCHEMES) if args.scheme == "all" else [args.scheme]
    reference = fp32_reference(visual, images)
    reports = {s: diagnose(visual, quantize(visual, s, calib, args.backend), images, s, reference=reference)
               for s in schemes}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "qirc.json", {"model": args.model, "weights": weights, "data": args.data or "random images",
                                   "n_quant_calibration": int(calib.shape[0]), "n_qirc": int(images.shape[0]),
                                   "schemes": {s: r.as_dict() for s, r in reports.items()}})
    plot_qirc({s: r.nsr_per_layer for s, r in reports.items()}, out / "qirc_nsr.png", f"QIRC ({args.model}, {weights})")
    for s, r in reports.items():
        print(f"{s:<18} NSR " + " ".join(f"{100 * v:5.1f}" for v in r.nsr_per_layer)
              + f"   exit cos {r.exit_cos[-1]:.4f}")
    print(f"report: {out / 'qirc.json'}, plot: {out / 'qirc_nsr.png'}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from .embed import embed_main  # its EmbedError is a UserError

    return embed_main(args)


# ---------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    from .schemes import SCHEMES

    p.add_argument("--model", default=None,
                   help="open_clip architecture (default: the one a --model-dir records, else ViT-B-32)")
    p.add_argument("--pretrained", default=None if not model_required else "openai",
                   help="'openai', another open_clip tag, a checkpoint path, or 'random' (seeded random weights)")
    p.add_argument("--data", help="ImageFolder / ImageNet val directory")
    p.add_argument("--calib-data", help="separate calibration images (class folders, or a flat folder: unlabelled)")
    p.add_argument("--calib-fraction", type=float, default=0.4,
                   help="calibration share of --data (default: %(default)s)")
    p.add_argument("--classnames", help="file with one class name per line (default: folder names / ImageNet names)")
    p.add_argument("--templates", default="openai",
                   help="'openai', 'simple' or a file of templates with {} (default: %(default)s)")
    p.add_argument("--scheme", default="smoothquant", choices=tuple(SCHEMES),
                   help="quantization scheme (default: %(default)s)")
    p.add_argument("--exit-layers", default="auto", help="'auto', 'paper' (8,10,11) or comma-separated layers")
    p.add_argument("--alpha", type=float, default=1.0, help="INR exponent of the thresholds (0: flat)")
    p.add_argument("--flops-budget", type=float, default=None,
                   help="max mean FLOPs as a fraction of full depth, e.g. 0.9")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default="0,1,2", help="calibration/evaluation split seeds (default: %(default)s)")
    p.add_argument("--quant-calib-images", type=int, default=32, help="images held out to calibrate the quantizer")
    p.add_argument("--qirc-images", type=int, default=32,
                   help="images held out to measure QIRC (disjoint from the quantizer's; default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="data loader workers")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "lra-ee"), help="text-classifier cache")
    p.add_argument("--out", default="lra-ee-out", help="output directory (default: %(default)s)")


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="the main job on a built-in ViT-B-32 with seeded random weights (no download)")
    demo.add_argument("--out", default="lra-ee-demo", help="output directory (default: %(default)s)")
    demo.add_argument("--model", default="ViT-B-32", help="open_clip architecture (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--bench-seconds", type=float, default=2.0, help="timing per throughput measurement")
    demo.add_argument("--images", type=int, default=480, help="synthetic images (default: %(default)s)")
    demo.add_argument("--classes", type=int, default=20, help="synthetic classes (default: %(default)s)")
    demo.set_defaults(func=_demo)


def _add_calibrate(sub) -> None:
    cal = sub.add_parser("calibrate", help="quantize and calibrate the exits on real data; save a model directory")
    _common(cal)
    cal.set_defaults(func=_calibrate)


def _add_evaluate(sub) -> None:
    ev = sub.add_parser("evaluate",
                        help="evaluate a saved model (--model-dir) or run calibration + evaluation + ablations")
    _common(ev, model_required=False)
    ev.add_argument("--model-dir", help="a model directory written by lra-ee calibrate")
    ev.add_argument("--format", default="lra-ee", choices=("lra-ee", "clip_benchmark"),
                    help="clip_benchmark: also write clip_benchmark result files (OUT/clip_benchmark/*.json, one per "
                         "variant) that `clip_benchmark build` merges with its own runs")
    ev.add_argument("--dataset-name", default=None, help="dataset name in those files (default: the --data folder's)")
    ev.set_defaults(func=_evaluate)


def _add_diagnose(sub) -> None:
    dg = sub.add_parser("diagnose", help="QIRC: per-layer noise-to-signal ratio of every quantization scheme")
    _common(dg)
    dg.set_defaults(scheme="all")
    dg.add_argument("--images", type=int, default=32)
    for action in dg._actions:
        if action.dest == "scheme":
            action.choices = tuple(action.choices) + ("all",)
    dg.set_defaults(func=_diagnose)


def _add_serve(sub) -> None:
    from .serve.cli import add_parser  # declares the command; Ray is imported only when it runs

    add_parser(sub)


def _add_embed(sub) -> None:
    emb = sub.add_parser("embed", help="embed a folder tree, a file list or tar shards into Parquet on Ray Data "
                         "(extra: embed)")
    emb.add_argument("--model-dir", required=True, help="directory written by QuantEarlyExitViT.save or lra-ee "
                     "calibrate")
    emb.add_argument("--data", required=True, help="a folder of images, a file with one image path per line, a .tar "
                     "shard or a shard pattern (shards/{00000..00099}.tar, shards/*.tar)")
    emb.add_argument("--out", required=True, help="output folder for the Parquet shards (must be new, or --resume)")
    emb.add_argument("--batch-size", type=int, default=256, help="images per model call (default: %(default)s)")
    emb.add_argument("--ray-address", default=None, help="join this Ray cluster (e.g. auto, or HEAD:6379); default: "
                     "start Ray on this machine")
    emb.add_argument("--workers", type=int, default=1, help="model actors, one model each (default: %(default)s)")
    emb.add_argument("--num-gpus-per-worker", type=float, default=0.0, help="GPUs per actor, fractions allowed; "
                     "0 runs on CPU (default: %(default)s)")
    emb.add_argument("--threads-per-worker", type=int, default=None, help="CPU: torch threads per actor (default: "
                     "the node's cores / --workers)")
    emb.add_argument("--early-exit", action="store_true", help="run the saved exit policy and record exit_layer "
                     "(default: full depth)")
    emb.add_argument("--resume", action="store_true", help="continue an interrupted or extended run in --out")
    emb.add_argument("--rows-per-shard", type=int, default=10_000, help="rows per Parquet file, about (default: "
                     "%(default)s)")
    emb.add_argument("--compile-blocks", default="auto", choices=("auto", "true", "false"),
                     help="CPU: compile the blocks with TorchInductor in each actor (default: %(default)s)")
    emb.set_defaults(func=_embed)


# The subcommands, in the order ``lra-ee --help`` lists them: each adds its parser and handler.
COMMANDS = (_add_demo, _add_calibrate, _add_evaluate, _add_diagnose, _add_serve, _add_embed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lra-ee",
                                     description="INT8 OpenCLIP vision towers with layer-wise early exits (LRA-EE).")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings (an unreadable image skipped, ...) as one line each, without the source line."""
    print(f"lra-ee: warning: {' '.join(str(message).split())}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*No pretrained weights loaded.*")
    previous, warnings.showwarning = warnings.showwarning, _one_line_warning
    from .data import DataError

    try:
        return args.func(args)
    except (UserError, DataError) as err:  # DataError: images that cannot be used (all unreadable, too few)
        print(f"lra-ee: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lra-ee: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
