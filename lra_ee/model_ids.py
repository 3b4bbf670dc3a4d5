"""Model ids as open_clip takes them, resolved in one place, with offline hubs failing fast in one line.

    --model ViT-B-32 --pretrained openai          a built-in architecture and a tag (weights from the hub)
    --model ViT-B-32 --pretrained ckpt.pt         ... and a local checkpoint file
    --model ViT-B-32 --pretrained random          ... and seeded random weights (no download)
    --model hf-hub:org/name                       config and weights from a Hugging Face hub repo
    --model local-dir:/path                       config (open_clip_config.json) and weights from a folder
    --pretrained /path/dir | local-dir:/path      the same folder; or a folder holding one checkpoint file

``resolve(model, pretrained)`` turns the pair into a :class:`ModelId` (what
``open_clip.create_model_and_transforms`` takes); ``load_clip`` builds it. Whatever needs the hub
(a tag, ``hf-hub:``) is looked up in the local Hugging Face cache first: when ``HF_HUB_OFFLINE`` is set or
the hub cannot be reached, huggingface_hub runs in offline mode for the call (cached files are used, no
request is made), so an uncached model is one ``UserError`` line at once instead of a minute of retries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .errors import UserError

HF_HUB, LOCAL_DIR = "hf-hub:", "local-dir:"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
OPEN_CLIP_CONFIG = "open_clip_config.json"
HUB_PROBE_TIMEOUT_S = 3.0
OFFLINE_HINT = ("fetch it once where the Hugging Face hub is reachable (it is cached under HF_HOME), or pass a local "
                "checkpoint (--pretrained FILE) or folder (--model local-dir:DIR)")


@dataclass(frozen=True)
class ModelId:
    """A resolved (model, pretrained) pair.

    model_name / pretrained: the arguments of ``open_clip.create_model_and_transforms``; label: the weights as
    reports name them; kind: ``"random"``, ``"checkpoint"``, ``"local-dir"``, ``"tag"`` or ``"hf-hub"`` (the
    last two need the hub or its cache)."""

    model_name: str
    pretrained: str | None
    label: str
    kind: str

    @property
    def needs_hub(self) -> bool:
        return self.kind in ("tag", "hf-hub")


def _local_dir(path: str, flag: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"{flag} {path}: no such folder (expected a folder with {OPEN_CLIP_CONFIG} and weights)")
    return p.resolve()


def _checkpoint_in(folder: Path) -> Path | None:
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in CHECKPOINT_SUFFIXES)
    preferred = [f for f in files if f.name.startswith("open_clip_")]
    files = preferred or files
    return files[0] if len(files) == 1 else None


def resolve(model: str | None, pretrained: str | None) -> ModelId:
    """The ``ModelId`` of ``--model`` / ``--pretrained``; ``UserError`` naming what is wrong."""
    import open_clip

    model = (model or "ViT-B-32").strip()
    pretrained = None if pretrained is None else pretrained.strip()
    if pretrained and pretrained.startswith(HF_HUB):
        raise UserError(f"--pretrained {pretrained}: hub repos go in --model ({HF_HUB}org/name)")
    if model.startswith(HF_HUB):
        repo = model[len(HF_HUB):].strip("/")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise UserError(f"--model {model}: expected {HF_HUB}org/name")
        return ModelId(HF_HUB + repo, None, HF_HUB + repo, "hf-hub")
    if model.startswith(LOCAL_DIR):
        folder = _local_dir(model[len(LOCAL_DIR):], "--model")
        if not (folder / OPEN_CLIP_CONFIG).is_file():
            raise UserError(f"--model {model}: {folder} has no {OPEN_CLIP_CONFIG}")
        return ModelId(LOCAL_DIR + str(folder), None, LOCAL_DIR + str(folder), "local-dir")
    if model not in open_clip.list_models():
        raise UserError(f"unknown model {model!r}; see open_clip.list_models() (e.g. ViT-B-32, ViT-B-16, ViT-L-14), "
                        f"or {HF_HUB}org/name, {LOCAL_DIR}/path")
    if pretrained in (None, "", "random"):
        return ModelId(model, None, "random-seeded", "random")
    if pretrained.startswith(LOCAL_DIR) or Path(pretrained).expanduser().is_dir():
        folder = _local_dir(pretrained.removeprefix(LOCAL_DIR), "--pretrained")
        if (folder / OPEN_CLIP_CONFIG).is_file():
            return ModelId(LOCAL_DIR + str(folder), None, LOCAL_DIR + str(folder), "local-dir")
        ckpt = _checkpoint_in(folder)
        if ckpt is None:
            raise UserError(f"--pretrained {pretrained}: the folder has no {OPEN_CLIP_CONFIG} and not exactly one "
                            f"checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
        return ModelId(model, str(ckpt), str(ckpt), "checkpoint")
    if any(s in pretrained for s in ("/", "\\")) or pretrained.endswith(CHECKPOINT_SUFFIXES):
        if not Path(pretrained).expanduser().is_file():
            raise UserError(f"checkpoint {pretrained} not found: pass --pretrained with an existing file or folder, "
                            f"or a tag such as 'openai'")
        return ModelId(model, str(Path(pretrained).expanduser()), pretrained, "checkpoint")
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise UserError(f"--pretrained {pretrained!r} is not a tag of {model} (tags: {', '.join(tags) or 'none'}); "
                        f"or pass a checkpoint file, a folder, or 'random'")
    return ModelId(model, pretrained, pretrained, "tag")


# ---------------------------------------------------------------------- the hub
def hub_offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub's endpoint (``HF_ENDPOINT``) opens within ``timeout``."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_access(model_id: ModelId):
    """While open_clip reads ``model_id``: offline mode when the hub is off (asked, or unreachable), yields it."""
    offline = False
    if model_id.needs_hub:
        offline = hub_offline_requested() or not hub_reachable()
    if not offline:
        yield False
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # read at every call: cached files are used, no request is made
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def _quiet():
    """open_clip and huggingface_hub log and warn their own failures; the caller prints one line."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _failure(model_id: ModelId, offline: bool, err: Exception) -> UserError:
    reason = " ".join(str(err).split())[:200] or type(err).__name__
    what = f"{model_id.model_name}" + (f" [{model_id.pretrained}]" if model_id.pretrained else "")
    if offline:
        why = "HF_HUB_OFFLINE is set" if hub_offline_requested() else "the Hugging Face hub cannot be reached"
        return UserError(f"could not load {what}: {why} and it is not in the local cache; {OFFLINE_HINT}")
    return UserError(f"could not load {what} ({reason}); {OFFLINE_HINT}")


def load_clip(model: str | None, pretrained: str | None, device: str, seed: int = 0):
    """``(clip, preprocess, tokenizer, weights_label)`` for ``--model`` / ``--pretrained``; ``UserError`` (one
    line, no hub retries) when they cannot be had."""
    import open_clip
    import torch

    model_id = resolve(model, pretrained)
    torch.manual_seed(seed)
    with hub_access(model_id) as offline, _quiet():
        try:
            clip, _, preprocess = open_clip.create_model_and_transforms(
                model_id.model_name, pretrained=model_id.pretrained, device=device)
            tokenizer = open_clip.get_tokenizer(model_id.model_name)
        except Exception as err:  # offline hub, unknown tag, corrupt checkpoint, bad config
            raise _failure(model_id, offline, err) from None
    clip.eval()
    return clip, preprocess, tokenizer, model_id.label


def random_visual(model: str | None, seed: int = 0):
    """The vision tower of ``model`` (a built-in name, ``hf-hub:`` or ``local-dir:``) with seeded random weights."""
    import open_clip
    import torch

    model_id = resolve(model, "random")
    model_id = ModelId(model_id.model_name, None, "random-seeded", "hf-hub" if model_id.kind == "hf-hub" else "random")
    torch.manual_seed(seed)
    with hub_access(model_id) as offline, _quiet():
        try:
            return open_clip.create_model(model_id.model_name, pretrained=None, load_weights=False).visual.eval()
        except Exception as err:
            raise _failure(model_id, offline, err) from None
