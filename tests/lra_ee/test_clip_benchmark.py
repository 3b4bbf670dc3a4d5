"""clip_benchmark (the ``dev`` extra): its zero-shot classification runs unchanged on a ``QuantCLIP``, and its
``build`` merges our result files with its own. Random weights: top-1 *agreement* with the FP32 open_clip model
on images the test makes, not accuracy."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tower
from lra_ee.clip_benchmark_format import TASK, clip_benchmark_results, write_clip_benchmark
from lra_ee.synthetic import builtin_task
from lra_kernels import ExitPolicy, QuantCLIP
from serve_support import tiny_clip

zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification",
                          reason="clip_benchmark is not installed (pip install -e '.[dev]')")

CLASSES = ["cat", "dog", "car", "tree", "boat", "lamp", "cup", "kite", "violin", "soup"]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}", "{c}"]  # clip_benchmark's placeholder is {c}


def _accuracy(output, target, topk=(1,)):
    """clip_benchmark's ``accuracy`` (top-k accuracy of logits ``[N, C]``) with the scalar taken by ``.item()``."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


@pytest.fixture(autouse=True)
def _numpy_compatible_accuracy(monkeypatch):
    """clip_benchmark 1.6.2's ``accuracy`` calls ``float()`` on a one-element 1-D array, which numpy >= 2.4 refuses
    (TypeError, whatever the model); only then is that one metric helper replaced by the same formula. Everything
    that touches the model (``zero_shot_classifier``, ``run_classification``, ``evaluate``'s flow) runs unchanged."""
    try:
        zsc.accuracy(torch.eye(3), torch.tensor([0, 1, 2]))
    except TypeError:
        monkeypatch.setattr(zsc, "accuracy", _accuracy)


class Images(torch.utils.data.Dataset):
    """Preprocessed images and their targets, with the ``classes`` attribute clip_benchmark reads."""

    def __init__(self, images, targets, classes):
        self.images, self.targets, self.classes = images, targets, classes

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i])


@pytest.fixture(scope="module")
def task():
    """A zero-shot task a random CLIP can do: the synthetic task's images (prototype classes blended with
    distractors), and the text projection solved (least squares) so that each class name's prompts embed to its
    prototype's image embedding; a random text tower alone scores every image alike."""
    import open_clip

    clip = tiny_clip()
    task = builtin_task(clip.visual, n_classes=len(CLASSES), n_images=120, seed=4)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with torch.no_grad():
        clip.text_projection.data = torch.eye(clip.text_projection.shape[0])
        pooled = clip.encode_text(tokenizer([t.format(c=c) for c in CLASSES for t in TEMPLATES]))
        target = task.text_features.repeat_interleave(len(TEMPLATES), 0)
        clip.text_projection.data = torch.linalg.lstsq(pooled, target).solution
    return clip, task, tokenizer


@pytest.fixture(scope="module")
def models(task):
    clip, _, _ = task
    return clip, QuantCLIP.from_open_clip(clip, tokenizer_name="ViT-B-32")


@pytest.fixture(scope="module")
def data(task):
    """Targets: the FP32 model's own predictions under clip_benchmark's classifier (so FP32 scores 100% and the
    INT8 model's acc1 is its top-1 agreement with FP32)."""
    clip, t, tokenizer = task
    classifier = zsc.zero_shot_classifier(clip, tokenizer, CLASSES, TEMPLATES, "cpu", amp=False)
    with torch.no_grad():
        fp32_pred = (F.normalize(clip.encode_image(t.images), dim=-1) @ classifier).argmax(-1)
    assert len(set(fp32_pred.tolist())) >= 6, "the FP32 predictions should spread over the classes"
    assert float((fp32_pred == t.labels).float().mean()) > 0.3, "the FP32 model should do the task"
    loader = torch.utils.data.DataLoader(Images(t.images, fp32_pred, CLASSES), batch_size=32)
    return t.images, fp32_pred, loader, tokenizer


def test_zero_shot_evaluate_runs_unchanged_on_quant_clip(models, data):
    clip, qclip = models
    images, fp32_pred, loader, tokenizer = data
    fp32 = zsc.evaluate(clip, loader, tokenizer, CLASSES, TEMPLATES, "cpu", amp=False)
    assert fp32["acc1"] == 1.0, "the targets are the FP32 model's predictions"
    int8 = zsc.evaluate(qclip, loader, tokenizer, CLASSES, TEMPLATES, "cpu", amp=False)
    assert set(int8) == {"acc1", "acc5", "mean_per_class_recall"}
    # the same evaluation written out with QuantCLIP's own calls
    own = qclip.zero_shot_classifier(CLASSES, [t.replace("{c}", "{}") for t in TEMPLATES], tokenizer=tokenizer)
    pred = (qclip.encode_image(images, normalize=True) @ own.t()).argmax(-1)
    assert int8["acc1"] == pytest.approx(float((pred == fp32_pred).float().mean()), abs=1 / len(images) + 1e-9)
    assert int8["acc1"] >= 0.9, f"INT8 top-1 agrees with FP32 on only {100 * int8['acc1']:.1f}% (random weights)"
    assert int8["acc5"] >= int8["acc1"]
    # clip_benchmark's default amp=True: the INT8 towers keep their own dtypes inside autocast, but clip_benchmark's
    # own logits matmul runs in bf16 on CPU, for the FP32 model as well: compare the two under the same setting
    amp32 = zsc.evaluate(clip, loader, tokenizer, CLASSES, TEMPLATES, "cpu", amp=True)
    amp8 = zsc.evaluate(qclip, loader, tokenizer, CLASSES, TEMPLATES, "cpu", amp=True)
    print(f"amp=False: INT8 agrees with FP32 on {100 * int8['acc1']:.1f}%; amp=True: FP32 {100 * amp32['acc1']:.1f}%, "
          f"INT8 {100 * amp8['acc1']:.1f}% (random weights, synthetic task)")
    assert amp8["acc1"] >= amp32["acc1"] - 0.1


def test_zero_shot_evaluate_with_early_exit(models, data):
    """With a classifier and an exit policy on the image tower, clip_benchmark reads the early-exit embeddings."""
    _, qclip = models
    images, fp32_pred, loader, tokenizer = data
    q = qclip.visual
    own = qclip.zero_shot_classifier(CLASSES, [t.replace("{c}", "{}") for t in TEMPLATES], tokenizer=tokenizer)
    q.set_classifier(own, float(qclip.logit_scale.exp()), CLASSES)
    from lra_kernels.names import N_FEATURES

    feats = q.all_exits(images, (2, 3)).features
    q.exit_policy = ExitPolicy((2, 3), torch.tensor([[4.0, 1.0, 0.0]] * 2), torch.zeros(2), feats.mean(1),
                               feats.std(1).clamp_min(1e-6), torch.tensor([0.6, 0.6]))
    assert N_FEATURES == 3
    try:
        res = q.classify(images)
        assert (res.exit_layer < q.depth).any() and (res.exit_layer == q.depth).any()
        ee = zsc.evaluate(qclip, loader, tokenizer, CLASSES, TEMPLATES, "cpu", amp=False)
        pred = (res.embeddings @ own.t()).argmax(-1)  # clip_benchmark's classifier here equals ``own``
        assert ee["acc1"] == pytest.approx(float((pred == fp32_pred).float().mean()), abs=1 / len(images) + 1e-9)
    finally:
        q.exit_policy = None
        q.clear_classifier()


@pytest.fixture(scope="module")
def our_report():
    """A real evaluation: a small tower calibrated and evaluated through the executor."""
    from lra_ee.api import calibrate, evaluate_model
    from lra_ee.data import TensorSource

    visual = make_tower(layers=4, seed=5)
    task = builtin_task(visual, n_classes=6, n_images=160, seed=0)
    calib = TensorSource(task.images[:80], task.labels[:80], task.class_names)
    evals = TensorSource(task.images[80:], task.labels[80:], task.class_names)
    qvit, _ = calibrate(visual, calib, task.text_features, exit_layers=(1, 2, 3), tau0=0.5)
    return evaluate_model(qvit, evals, visual, n_boot=100, controls=False)


def test_our_results_in_clip_benchmark_format(our_report):
    rows = clip_benchmark_results(our_report, dataset="synthetic", model="tiny", pretrained="random")
    names = ["random lra-ee fp32", "random lra-ee int8", "random lra-ee int8 early-exit"]
    assert [r["pretrained"] for r in rows] == names
    for r in rows:
        assert set(r) == {"dataset", "model", "pretrained", "task", "metrics", "language"} and r["task"] == TASK
    assert rows[0]["metrics"] == {"acc1": our_report.acc_fp32, "acc5": our_report.top5_fp32}
    assert rows[2]["metrics"]["acc1"] == our_report.acc_ee and rows[2]["metrics"]["acc5"] == our_report.top5_ee
    with pytest.raises(ValueError, match="dataset"):
        clip_benchmark_results(our_report, dataset="", model="tiny", pretrained="random")
    with pytest.raises(ValueError, match="no evaluation"):
        clip_benchmark_results({"model": "x"}, dataset="d", model="tiny", pretrained="random")


def test_clip_benchmark_build_merges_our_files_with_its_own(our_report, models, data, tmp_path):
    cli = pytest.importorskip("clip_benchmark.cli", reason="clip_benchmark's CLI needs its full dependencies")
    clip, _ = models
    _, _, loader, tokenizer = data
    # a result file as clip_benchmark's `eval` writes it (cli.run's dump), from its evaluate on the FP32 model
    metrics = zsc.evaluate(clip, loader, tokenizer, CLASSES, TEMPLATES, "cpu", amp=False)
    theirs = tmp_path / "results" / "synthetic_random_tiny_en_zeroshot_classification.json"
    theirs.parent.mkdir()
    theirs.write_text(json.dumps({"dataset": "synthetic", "model": "tiny", "pretrained": "random", "task": TASK,
                                  "metrics": metrics, "language": "en"}))
    ours = write_clip_benchmark(tmp_path / "results", our_report, dataset="synthetic", model="tiny",
                                pretrained="random")
    assert len(ours) == 3 and len({p.name for p in ours}) == 3
    out = tmp_path / "benchmark.csv"
    cli.main_build(argparse.Namespace(files=[str(tmp_path / "results")], output=str(out)))
    with out.open() as f:
        rows = {r["model_fullname"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"tiny random", "tiny random lra-ee fp32", "tiny random lra-ee int8",
                         "tiny random lra-ee int8 early-exit"}
    assert float(rows["tiny random lra-ee int8 early-exit"]["acc1"]) == pytest.approx(our_report.acc_ee)
    assert float(rows["tiny random"]["acc1"]) == pytest.approx(metrics["acc1"])
    assert rows["tiny random lra-ee int8"]["mean_per_class_recall"] == ""  # not in our reports: an empty cell
