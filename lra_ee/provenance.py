"""What a calibrated model was made from, saved with it, and the checks that use it.

Two records go into ``ExitPolicy.meta`` (saved in the model directory's ``config.json``):

- ``calibration_data``: every image that calibrated the model (quantizer, QIRC, gates and
  thresholds), by content: a SHA-256 digest (16 hex digits) of each file's bytes (image folders)
  or of each image tensor (in-memory sources), their relative paths when they are files, and one
  digest of the whole set. ``exclude_calibration_images`` drops those images from an evaluation
  source — by content, so a renamed copy is caught too.
- ``source_model``: the open_clip model name and pretrained tag (and seed for random weights) the
  INT8 tower was quantized from, so the FP32 reference of an evaluation is the same tower.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

CALIBRATION_KEY = "calibration_data"
MODEL_KEY = "source_model"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprints(source) -> list[str]:
    """One content digest per position of ``source`` (files: their bytes; tensors: their values)."""
    if hasattr(source, "samples"):
        out = []
        for path, _ in source.samples:
            try:
                out.append(_digest(Path(path).read_bytes()))
            except OSError:
                out.append("unreadable:" + _digest(str(path).encode()))
        return out
    images = source.images
    return [_digest(images[i].detach().cpu().float().contiguous().numpy().tobytes()) for i in range(images.shape[0])]


def calibration_record(source, positions=None, split: dict | None = None) -> dict:
    """The record of the images at ``positions`` of ``source`` (default: all of them)."""
    positions = np.arange(len(source)) if positions is None else np.asarray(positions, dtype=np.int64)
    sub = source.subset(positions)
    digests = fingerprints(sub)
    rec = {"n_images": len(digests), "sha256_16": digests,
           "digest": _digest("\n".join(sorted(digests)).encode()), "split": split or {}}
    if hasattr(sub, "samples"):
        root = Path(source.root)
        rec["root"] = str(root)
        rec["files"] = [str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else str(p)
                        for p, _ in sub.samples]
    return rec


def with_meta(policy, **entries):
    """``policy`` with ``entries`` added to its ``meta`` (a new, equal policy otherwise)."""
    return dataclasses.replace(policy, meta={**policy.meta, **entries})


def exclude_images(source, digests: set[str]) -> tuple[object, dict, np.ndarray | None]:
    """``(source without the images whose content digest is in digests, check, kept positions or None
    when nothing was left out)``; ValueError when nothing is left."""
    keep = np.array([i for i, d in enumerate(fingerprints(source)) if d not in digests], dtype=np.int64)
    check = {"checked": True,
             "method": "content hash (SHA-256) of every evaluation image against the calibration images",
             "n_excluded": len(source) - len(keep), "n_remaining": int(len(keep))}
    if not len(keep):
        raise ValueError(f"all {len(source)} evaluation images were used to calibrate this model: "
                         f"evaluate it on other images")
    if len(keep) == len(source):
        return source, check, None
    return source.subset(keep), check, keep


def exclude_calibration_images(qvit, source) -> tuple[object, dict, np.ndarray | None]:
    """``exclude_images`` with the model's recorded calibration images; ``check["checked"]`` is False
    when the model records none (then nothing is excluded and nothing is claimed)."""
    rec = qvit.exit_policy.meta.get(CALIBRATION_KEY)
    if not rec or not rec.get("sha256_16"):
        return source, {"checked": False, "reason": "the model records no calibration images", "n_excluded": 0}, None
    out, check, keep = exclude_images(source, set(rec["sha256_16"]))
    check.update(n_calibration_recorded=int(rec["n_images"]), calibration_digest=rec.get("digest"))
    return out, check, keep


def source_model_record(model: str, pretrained: str, seed: int | None = None) -> dict:
    rec = {"open_clip_model": model, "pretrained": pretrained}
    if pretrained == "random":
        rec["seed"] = seed
    return rec


def check_reference_tower(qvit, visual, model: str | None, pretrained: str | None, seed: int | None = None) -> None:
    """Raise ``ValueError`` (one line) unless ``visual`` can be the FP32 tower ``qvit`` was quantized
    from: the recorded model name / pretrained tag (when recorded) and the architecture and
    embeddings (always) must match."""
    rec = qvit.exit_policy.meta.get(MODEL_KEY) or {}
    if rec and model is not None and rec.get("open_clip_model") != model:
        raise ValueError(f"this model was quantized from {rec.get('open_clip_model')}, not {model}: "
                         f"pass --model {rec.get('open_clip_model')} for the FP32 reference")
    if rec and pretrained is not None and rec.get("pretrained") not in (None, pretrained):
        raise ValueError(f"this model was quantized from weights {rec.get('pretrained')!r}, not {pretrained!r}: "
                         f"the FP32 reference must be the same tower")
    if rec.get("pretrained") == "random" and seed is not None and rec.get("seed") not in (None, seed):
        raise ValueError(f"this model was quantized from random weights with seed {rec['seed']}, not {seed}")
    a = qvit.arch
    got = (tuple(visual.image_size) if not isinstance(visual.image_size, int) else (visual.image_size,) * 2,
           len(visual.transformer.resblocks), int(visual.transformer.width), int(visual.output_dim))
    want = (tuple(a.image_size), a.layers, a.width, a.output_dim)
    if got != want:
        raise ValueError(f"the FP32 reference tower (image size, blocks, width, output dim = {got}) is not the "
                         f"architecture of the saved model ({want})")
    ref = visual.positional_embedding.detach().float().cpu()
    mine = qvit.positional_embedding.detach().float().cpu()
    if ref.shape != mine.shape or float((ref - mine).norm() / ref.norm().clamp_min(1e-12)) > 1e-2:
        raise ValueError("the FP32 reference tower's weights differ from the saved model's (positional embedding): "
                         "pass the --pretrained weights the model was calibrated from")

