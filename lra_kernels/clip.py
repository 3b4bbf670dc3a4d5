"""``QuantCLIP``: open_clip's ``CLIP`` with both towers in INT8 (W8A8).

    qclip = QuantCLIP.from_open_clip(clip, smooth_alpha=0.5, calibration_images=imgs, calibration_texts=tokens)
    img, txt, scale = qclip(images, tokenizer(prompts))     # as open_clip's CLIP (output_dict=False)
    text_features = qclip.zero_shot_classifier(class_names, templates)
    qclip.visual.set_classifier(text_features, float(qclip.logit_scale.exp()), class_names)
    qclip.save(path); QuantCLIP.load(path)

The image tower is a ``QuantEarlyExitViT`` (``.visual``), the text tower a ``QuantTextTower``
(``lra_kernels.text_tower``) on the same quantization recipe, backend and activation dtype.

Saved format: a directory holding the image tower exactly as ``QuantEarlyExitViT.save`` writes it
(``model.safetensors`` + ``config.json``, which the vision loader reads alone), plus
``text.safetensors`` (the text tower and ``logit_scale`` / ``logit_bias``) and ``clip.json``
(``kind: "quant_clip"``, the text architecture, the recipe, the tokenizer name). No pickle.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from .backend import get_ops, resolve_backend
from .clip_files import (  # noqa: F401  (is_quant_clip_dir and the names are public here)
    CLIP_CONFIG_FILE,
    CLIP_FORMAT,
    CLIP_FORMAT_VERSION,
    KIND,
    TEXT_WEIGHTS_FILE,
    is_quant_clip_dir,
    read_clip_config,
    read_text_weights,
    write_text_weights,
)
from .config import QuantConfig
from .hardware import resolve_act_dtype
from .heads import normalise
from .model import QuantEarlyExitViT
from .text_tower import Float32Storage, QuantTextTower, TextArch, UnsupportedCLIP, arch_from_clip, check_tokens
from .validate import ModelLoadError


class QuantCLIP(Float32Storage):
    """INT8 open_clip ``CLIP``: ``.visual`` (a ``QuantEarlyExitViT``), the INT8 text tower (``.text``),
    ``logit_scale`` (an ``nn.Parameter`` holding the log scale, as open_clip) and ``logit_bias`` (None unless
    the model has one). ``encode_image`` / ``encode_text`` / ``forward`` have open_clip's contracts."""

    def __init__(self, visual: QuantEarlyExitViT, text: QuantTextTower, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor | None = None, tokenizer_name: str | None = None):
        super().__init__()
        if not isinstance(visual, QuantEarlyExitViT):
            raise TypeError(f"visual must be a QuantEarlyExitViT, got {type(visual).__name__}")
        if text.arch.output_dim != visual.output_dim:
            raise ValueError(f"the text tower's output_dim {text.arch.output_dim} differs from the image tower's "
                             f"{visual.output_dim}")
        if tokenizer_name is not None and not isinstance(tokenizer_name, str):
            raise TypeError(f"tokenizer_name must be a str or None, got {type(tokenizer_name).__name__}")
        self.visual = visual
        self.text = text
        self.logit_scale = nn.Parameter(logit_scale.detach().float().clone(), requires_grad=False)
        self.logit_bias = (None if logit_bias is None
                           else nn.Parameter(logit_bias.detach().float().clone(), requires_grad=False))
        self.tokenizer_name = tokenizer_name
        self.eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_open_clip(
        cls,
        clip: nn.Module,
        *,
        act_quant: str = "per_token",
        smooth_alpha: float | None = None,
        calibration_images: torch.Tensor | None = None,
        calibration_texts=None,
        backend: str = "auto",
        act_dtype: torch.dtype | str | None = None,
        tokenizer_name: str | None = None,
        static_percentile: float | None = None,
    ) -> QuantCLIP:
        """Quantize an open_clip ``CLIP`` (not modified): both towers under one recipe.

        ``calibration_images`` (normalised ``[N, 3, H, W]``) and ``calibration_texts`` (token ids
        ``[N, context_length]``, or a list of prompts tokenized with ``tokenizer_name``'s tokenizer)
        are needed for ``act_quant="per_tensor_static"`` and ``smooth_alpha``. ``tokenizer_name``:
        the open_clip model name whose tokenizer goes with the model (e.g. ``"ViT-B-32"``), recorded
        and saved; ``get_tokenizer()`` returns it."""
        arch = arch_from_clip(clip)  # UnsupportedCLIP before any work
        config = QuantConfig(act_quant=act_quant, smooth_alpha=smooth_alpha, static_percentile=static_percentile)
        if calibration_texts is not None:
            calibration_texts = _calibration_tokens(calibration_texts, arch, tokenizer_name)
        try:
            visual = QuantEarlyExitViT.from_open_clip(
                clip.visual, act_quant=act_quant, smooth_alpha=smooth_alpha, calibration_images=calibration_images,
                backend=backend, static_percentile=static_percentile, act_dtype=act_dtype)
        except NotImplementedError as err:
            raise UnsupportedCLIP(f"image tower: {err}") from None
        text = QuantTextTower.from_open_clip(clip, config, calibration_texts)
        bias = getattr(clip, "logit_bias", None)
        model = cls(visual.cpu(), text, clip.logit_scale, bias, tokenizer_name)
        return model.to(clip.logit_scale.device)

    # ------------------------------------------------------------------ open_clip's attributes
    @property
    def context_length(self) -> int:
        return self.text.arch.context_length

    @property
    def vocab_size(self) -> int:
        return self.text.arch.vocab_size

    @property
    def output_dim(self) -> int:
        return self.text.arch.output_dim

    @property
    def device(self) -> torch.device:
        return self.visual.device

    @property
    def quant_config(self) -> QuantConfig:
        return self.text.quant_config

    def text_ops(self):
        """The ``Ops`` the text tower runs on (the image tower's backend, resolved for the device)."""
        return get_ops(resolve_backend(self.visual.backend, self.device, self.quant_config))

    @property
    def text_act_dtype(self) -> torch.dtype:
        name = resolve_backend(self.visual.backend, self.device, self.quant_config)
        return resolve_act_dtype(self.visual._act_dtype_request, self.device, name)

    def get_tokenizer(self):
        """``open_clip.get_tokenizer(self.tokenizer_name)``; ``ValueError`` when no name was recorded."""
        if not self.tokenizer_name:
            raise ValueError("no tokenizer name recorded with this model: build it with "
                             "QuantCLIP.from_open_clip(..., tokenizer_name='ViT-B-32') or pass tokenizer=")
        import open_clip

        return open_clip.get_tokenizer(self.tokenizer_name)

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, output_dim]`` fp32: the image tower's embedding (``QuantEarlyExitViT.forward``)."""
        out = self.visual(image)
        out = (out[0] if isinstance(out, tuple) else out).float()
        return normalise(out) if normalize else out

    @torch.no_grad()
    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids ``[B, context_length]`` -> ``[B, output_dim]`` fp32, as open_clip's ``CLIP.encode_text``."""
        text = check_tokens(text, self.text.arch, self.device)
        with torch.autocast(self.device.type, enabled=False):
            out = self.text(text, self.text_ops(), self.text_act_dtype)
        return normalise(out) if normalize else out

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        """``(image_features, text_features, logit_scale.exp())`` normalised (None for a missing input), and
        ``logit_bias`` last when the model has one: open_clip's ``CLIP.forward`` with ``output_dict=False``."""
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        scale = self.logit_scale.exp()
        if self.logit_bias is not None:
            return image_features, text_features, scale, self.logit_bias
        return image_features, text_features, scale

    @torch.no_grad()
    def zero_shot_classifier(self, class_names: Sequence[str], templates=("{}",), tokenizer=None,
                             batch_size: int = 256) -> torch.Tensor:
        """Zero-shot class embeddings ``[C, output_dim]`` fp32 with L2-normalised rows (``set_classifier``'s layout).

        ``templates``: format strings with one ``{}`` or callables ``name -> prompt`` (open_clip's);
        the normalised embeddings of a class's prompts are averaged and renormalised, as open_clip's
        ``build_zero_shot_classifier``. ``tokenizer``: default ``get_tokenizer()``."""
        names = _check_class_names(class_names)
        fill = _check_templates(templates)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        tokenizer = tokenizer if tokenizer is not None else self.get_tokenizer()
        prompts = [f(name) for name in names for f in fill]
        parts = []
        for start in range(0, len(prompts), batch_size):
            tokens = _tokenize(tokenizer, prompts[start: start + batch_size], self.text.arch)
            parts.append(self.encode_text(tokens.to(self.device), normalize=True))
        emb = torch.cat(parts).view(len(names), len(fill), -1).mean(dim=1)
        return normalise(emb).float()

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``path/`` (a directory): the image tower as ``QuantEarlyExitViT.save`` writes it, ``text.safetensors``
        and ``clip.json``; no pickle."""
        path = Path(path)
        self.visual.save(path)
        tensors = {f"text.{k}": v.detach().cpu().contiguous() for k, v in self.text.state_dict().items()}
        tensors["logit_scale"] = self.logit_scale.detach().cpu().contiguous()
        if self.logit_bias is not None:
            tensors["logit_bias"] = self.logit_bias.detach().cpu().contiguous()
        config = {
            "format": CLIP_FORMAT,
            "format_version": CLIP_FORMAT_VERSION,
            "kind": KIND,
            "tokenizer_name": self.tokenizer_name,
            "text": self.text.arch.to_dict(),
            "quant": self.quant_config.to_dict(),
            "text_chunk_tokens": self.text.chunk_tokens,
            "files": {"image": "config.json", "text": TEXT_WEIGHTS_FILE},
        }
        write_text_weights(tensors, path, config)
        (path / CLIP_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", backend: str | None = None) -> QuantCLIP:
        """Rebuild a model written by :meth:`save` (needs neither open_clip weights nor a download).

        ``backend``: None keeps what was saved."""
        path = Path(path)
        cfg = read_clip_config(path)  # ModelLoadError for every way the directory can be wrong
        visual = QuantEarlyExitViT.load(path, device="cpu", backend=backend)
        tensors = read_text_weights(path, cfg)
        text = QuantTextTower(cfg.arch, cfg.quant_config)
        text.load_state_dict({k[len("text."):]: v for k, v in tensors.items() if k.startswith("text.")}, strict=True)
        if cfg.chunk_tokens is not None:
            text.chunk_tokens = cfg.chunk_tokens
        try:
            model = cls(visual, text, tensors["logit_scale"], tensors.get("logit_bias"), cfg.tokenizer_name)
        except (TypeError, ValueError) as err:  # the towers disagree (output_dim)
            raise ModelLoadError(f"{path}: {err}") from None
        return model.to(device).eval()

    def extra_repr(self) -> str:
        a = self.text.arch
        return (f"text: width={a.width}, layers={a.layers}, heads={a.heads}, context_length={a.context_length}, "
                f"vocab_size={a.vocab_size}, tokenizer={self.tokenizer_name!r}")


# ---------------------------------------------------------------------- helpers
def _tokenize(tokenizer, prompts: list[str], arch: TextArch) -> torch.Tensor:
    tokens = tokenizer(prompts)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[0] != len(prompts):
        raise ValueError(f"the tokenizer must return token ids [N, {arch.context_length}] for N prompts, got "
                         f"{type(tokens).__name__} {tuple(getattr(tokens, 'shape', ()))}")
    return tokens


def _calibration_tokens(texts, arch: TextArch, tokenizer_name: str | None) -> torch.Tensor:
    if isinstance(texts, (list, tuple)):
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("calibration_texts given as a list must be a non-empty list of str (prompts)")
        if not tokenizer_name:
            raise ValueError("calibration_texts given as prompts need tokenizer_name= (an open_clip model name) to "
                             "tokenize them; or pass token ids [N, context_length]")
        import open_clip

        texts = _tokenize(open_clip.get_tokenizer(tokenizer_name), list(texts), arch)
    if isinstance(texts, torch.Tensor):
        return check_tokens(texts, arch, texts.device, name="calibration_texts")
    raise TypeError(f"calibration_texts must be token ids [N, {arch.context_length}] or a list of prompts, got "
                    f"{type(texts).__name__}")


def _check_class_names(class_names) -> list[str]:
    if isinstance(class_names, str) or not isinstance(class_names, Sequence) or not class_names:
        raise ValueError(f"class_names must be a non-empty sequence of str, got {class_names!r:.80}")
    bad = [c for c in class_names if not isinstance(c, str)]
    if bad:
        raise TypeError(f"class_names must be str, got {type(bad[0]).__name__} ({bad[0]!r:.40})")
    return list(class_names)


def _check_templates(templates) -> list[Callable[[str], str]]:
    if isinstance(templates, str):
        templates = (templates,)
    if not isinstance(templates, Sequence) or not templates:
        raise ValueError("templates must be a non-empty sequence of format strings with one '{}' or callables")
    fill = []
    for t in templates:
        if isinstance(t, str):
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must hold exactly one '{{}}' for the class name")
            fill.append(t.format)
        elif callable(t):
            fill.append(t)
        else:
            raise TypeError(f"a template must be a format string or a callable, got {type(t).__name__}")
    return fill
