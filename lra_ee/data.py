"""Image sources, splits and zero-shot text classifiers.

A *source* yields batches ``(images[b, 3, H, W] float, labels[b] int64 (-1 when unlabelled),
index[b] int64)``; ``index`` is the position of each image in the source, so images that could
not be read are dropped without misaligning anything.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
_WNID = re.compile(r"^n\d{8}$")


class DataError(ValueError):
    """Data that cannot be used, with a message saying what was expected."""


@dataclass
class TensorSource:
    """Images already in memory (the built-in task, tests)."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    name: str = "tensor"
    n_skipped: int = 0

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.shape[1] != 3 or not self.images.is_floating_point():
            raise DataError(f"expected float images [N, 3, H, W], got {tuple(self.images.shape)} {self.images.dtype}")
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise DataError(f"expected labels [{self.images.shape[0]}], got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def subset(self, index: Sequence[int] | np.ndarray, name: str | None = None) -> "TensorSource":
        idx = torch.as_tensor(np.asarray(index), dtype=torch.int64)
        return TensorSource(self.images[idx], None if self.labels is None else self.labels[idx], self.class_names,
                            name or self.name)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = len(self)
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size))
            labels = self.labels[idx] if self.labels is not None else torch.full((idx.numel(),), -1, dtype=torch.int64)
            yield self.images[idx], labels.long(), idx


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img.load()
                return self.transform(img), label, i
        except Exception as err:  # unreadable / truncated / not an image: skipped, counted by the caller
            return None, str(path), f"{type(err).__name__}: {err}"


def _collate(items):
    good = [it for it in items if it[0] is not None]
    bad = [(it[1], it[2]) for it in items if it[0] is None]
    if good:
        images = torch.stack([it[0] for it in good])
        labels = torch.tensor([it[1] for it in good], dtype=torch.int64)
        index = torch.tensor([it[2] for it in good], dtype=torch.int64)
    else:
        images, labels, index = None, None, None
    return images, labels, index, bad


@dataclass
class FolderSource:
    """An ImageFolder-style directory (``root/<class>/<image>``; ImageNet val layout), or a flat
    directory of images (unlabelled).

    ``unreadable`` holds the paths found unreadable so far; subsets share it with the source they
    come from, so a file skipped while iterating a split is counted once, by every source that
    holds it (``n_skipped``), however many passes read it.
    """

    root: Path
    samples: list[tuple[str, int]]
    transform: Callable
    class_names: list[str] | None
    name: str = "folder"
    num_workers: int = 2
    unreadable: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def has_labels(self) -> bool:
        return self.class_names is not None

    @property
    def skipped(self) -> list[str]:
        """This source's files found unreadable (so far)."""
        return [p for p, _ in self.samples if p in self.unreadable]

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def subset(self, index, name: str | None = None) -> "FolderSource":
        return FolderSource(self.root, [self.samples[i] for i in np.asarray(index, dtype=np.int64)], self.transform,
                            self.class_names, name or self.name, self.num_workers, self.unreadable)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(
            _FolderDataset(self.samples, self.transform), batch_size=batch_size, shuffle=False,
            num_workers=self.num_workers, collate_fn=_collate,
        )
        for images, labels, index, bad in loader:
            for path, why in bad:
                if path not in self.unreadable:
                    self.unreadable.add(path)
                    warnings.warn(f"skipping unreadable image {path} ({why})", stacklevel=2)
            if images is not None:
                yield images, labels, index


def load_image_folder(root: str | Path, transform: Callable, class_names: Sequence[str] | None = None,
                      name: str | None = None, num_workers: int = 2) -> FolderSource:
    """Index an image directory.

    ``root/<class>/*.jpg`` -> labelled, classes in sorted folder order. With 1000 WordNet-id
    folders (ImageNet val layout) the names are open_clip's ``IMAGENET_CLASSNAMES`` (same
    order); otherwise folder names (``_`` -> space) unless ``class_names`` is given. Images
    directly in ``root`` with no class folders -> unlabelled.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"no data directory at {root}: expected an ImageFolder layout (root/<class>/<image>) "
                        f"or a folder of images")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if class_dirs:
        samples = [
            (str(f), label)
            for label, d in enumerate(class_dirs)
            for f in sorted(d.rglob("*"))
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        folder_names = [d.name for d in class_dirs]
        if class_names is not None:
            if len(class_names) != len(class_dirs):
                raise DataError(f"{len(class_names)} class names for {len(class_dirs)} class folders in {root}")
            names = list(class_names)
        elif len(class_dirs) == 1000 and all(_WNID.match(n) for n in folder_names):
            from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

            names = list(IMAGENET_CLASSNAMES)
        else:
            names = [n.replace("_", " ") for n in folder_names]
    else:
        samples = [(str(f), -1) for f in sorted(root.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        names = None
    if not samples:
        raise DataError(f"no images found under {root} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return FolderSource(root, samples, transform, names, name or root.name, num_workers)


def split_indices(n: int, calib_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic disjoint (calibration, evaluation) index sets covering ``range(n)``."""
    if not 0.0 < calib_fraction < 1.0:
        raise DataError(f"calib_fraction must lie in (0, 1), got {calib_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * calib_fraction))
    if k == 0 or k == n:
        raise DataError(f"a calibration fraction of {calib_fraction} leaves an empty split of {n} images")
    return np.sort(perm[:k]), np.sort(perm[k:])


HOLD_OUT_SEED = 12345  # the seed of an experiment's quantizer / QIRC sample, the same for every split seed


def held_out(n_total: int, n_quant: int, n_qirc: int, seed: int = HOLD_OUT_SEED):
    """``(quantizer, QIRC, rest)`` positions: disjoint seeded random samples (not the first images
    of a class-sorted folder), each sorted."""
    perm = np.random.default_rng(seed).permutation(n_total)
    return np.sort(perm[:n_quant]), np.sort(perm[n_quant : n_quant + n_qirc]), np.sort(perm[n_quant + n_qirc :])


def images_of(source, index, batch_size: int = 64) -> torch.Tensor:
    """The images at positions ``index`` of ``source``, as one tensor (unreadable ones left out)."""
    sub = source.subset(index)
    parts = [im for im, _, _ in sub.batches(batch_size)]
    if not parts:
        where = getattr(source, "root", getattr(source, "name", "the source"))
        raise DataError(f"none of the {len(sub)} images asked for from {where} could be read "
                        f"({getattr(sub, 'n_skipped', 0)} unreadable): expected JPEG/PNG/WebP/... image files")
    return torch.cat(parts)


def preprocess_from_cfg(preprocess_cfg: dict, image_size: tuple[int, int] | None = None) -> Callable:
    """open_clip's eval transform for a model's saved ``preprocess_cfg`` (PIL image -> ``[3, H, W]`` fp32).

    As ``open_clip.create_model_and_transforms`` does: ``image_transform_v2(PreprocessCfg(**cfg),
    is_train=False)``; keys open_clip does not know are ignored, missing ones take its defaults.
    """
    from dataclasses import fields

    from open_clip.transform import PreprocessCfg, image_transform_v2

    known = {f.name for f in fields(PreprocessCfg)}
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (preprocess_cfg or {}).items() if k in known}
    if "size" not in cfg and image_size is not None:
        cfg["size"] = tuple(image_size)
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


# ---------------------------------------------------------------------- text side
def load_classnames(path: str | Path) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    names = [ln for ln in lines if ln]
    if not names:
        raise DataError(f"{path} holds no class names (one per line expected)")
    return names


def load_templates(spec: str) -> list:
    """``"openai"`` / ``"simple"`` (open_clip's ImageNet templates) or a file of lines with ``{}``."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    if spec == "openai":
        return list(OPENAI_IMAGENET_TEMPLATES)
    if spec == "simple":
        return list(SIMPLE_IMAGENET_TEMPLATES)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"templates must be 'openai', 'simple' or a file of templates with '{{}}', got {spec!r}")
    templates = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    bad = [t for t in templates if "{}" not in t and "{c}" not in t]
    if bad or not templates:
        raise DataError(f"every template in {path} needs a '{{}}' placeholder for the class name; bad: {bad[:3]}")
    return [t.replace("{c}", "{}") for t in templates]


def _template_text(t) -> str:
    return t if isinstance(t, str) else t("{}")


def text_classifier(clip_model, tokenizer, class_names: Sequence[str], templates: Sequence, model_id: str,
                    cache_dir: str | Path | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """Zero-shot classifier ``[C, E]`` (L2-normalised rows) from open_clip's template ensembling, cached on disk."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    from safetensors.torch import load_file, save_file

    ident = json.dumps([model_id, list(class_names), [_template_text(t) for t in templates]])
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"text-classifier-{key}.safetensors" if cache_dir else None
    if cache is not None and cache.is_file():
        return load_file(str(cache))["text_features"]
    with torch.no_grad():
        w = build_zero_shot_classifier(clip_model, tokenizer, list(class_names), list(templates),
                                       num_classes_per_batch=10, device=device)
    text = torch.nn.functional.normalize(w.t().float().cpu(), dim=-1).contiguous()  # open_clip returns [E, C]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"text_features": text}, str(cache), metadata={"model": model_id})
    return text
