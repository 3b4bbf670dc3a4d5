"""Our evaluation results in clip_benchmark's result format, so ``clip_benchmark build`` merges them with its runs.

clip_benchmark's ``eval`` writes one JSON file per (dataset, model, pretrained, task, language):

    {"dataset": ..., "model": ..., "pretrained": ..., "task": "zeroshot_classification",
     "metrics": {"acc1": ..., "acc5": ..., "mean_per_class_recall": ...}, "language": "en"}

and ``clip_benchmark build FILES --output benchmark.csv`` makes one CSV row per file (the metrics and the
other keys as columns, ``model_fullname = model + " " + pretrained``). We write one such file per
variant measured in a ``report.json`` (FP32 where measured, INT8 at full depth, INT8 with early exit),
the variant in ``pretrained`` (``"<pretrained> lra-ee fp32"``, ``"<pretrained> lra-ee <scheme> int8"``,
``"... int8 early-exit"``) so
the rows sit beside clip_benchmark's own row of the same weights. Accuracies are fractions, as
clip_benchmark's. ``mean_per_class_recall`` is not in our reports and is left out (an empty cell);
``flops_saving`` (against the INT8 full depth) is added for the early-exit row.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

TASK = "zeroshot_classification"
FILE_TEMPLATE = "{dataset}_{pretrained}_{model}_{language}_{task}.json"  # clip_benchmark's default --output


def _get(report, key):
    if isinstance(report, dict):
        return report.get(key)
    return getattr(report, key, None)


def clip_benchmark_results(report, *, dataset: str, model: str, pretrained: str, language: str = "en") -> list[dict]:
    """The clip_benchmark result dicts of ``report`` (an ``ExperimentReport``, ``ModelEvaluationReport``,
    ``EvalReport`` or the dict of ``report.json``): one per variant it measured."""
    for name, value in (("dataset", dataset), ("model", model), ("pretrained", pretrained)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if _get(report, "acc_full") is None or _get(report, "acc_ee") is None:
        raise ValueError("the report holds no evaluation (acc_full / acc_ee): write it from lra-ee evaluate or demo")
    scheme = _get(report, "scheme")
    int8 = f"{pretrained} lra-ee {scheme} int8" if scheme else f"{pretrained} lra-ee int8"
    base = {"dataset": dataset, "model": model, "task": TASK, "language": language}
    rows = []
    if _get(report, "acc_fp32") is not None:
        rows.append({**base, "pretrained": f"{pretrained} lra-ee fp32",
                     "metrics": {"acc1": _get(report, "acc_fp32"), "acc5": _get(report, "top5_fp32")}})
    rows.append({**base, "pretrained": int8,
                 "metrics": {"acc1": _get(report, "acc_full"), "acc5": _get(report, "top5_full")}})
    rows.append({**base, "pretrained": f"{int8} early-exit",
                 "metrics": {"acc1": _get(report, "acc_ee"), "acc5": _get(report, "top5_ee"),
                             "flops_saving": _get(report, "flops_saving")}})
    for row in rows:
        row["metrics"] = {k: float(v) for k, v in row["metrics"].items() if v is not None}
    return rows


def _file_name(row: dict) -> str:
    name = FILE_TEMPLATE.format(**row)
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name)


def write_clip_benchmark(out_dir: str | Path, report, *, dataset: str, model: str, pretrained: str,
                         language: str = "en") -> list[Path]:
    """Write ``report``'s variants as clip_benchmark result files under ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in clip_benchmark_results(report, dataset=dataset, model=model, pretrained=pretrained, language=language):
        path = out_dir / _file_name(row)
        path.write_text(json.dumps(row))
        paths.append(path)
    return paths
