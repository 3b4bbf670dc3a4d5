"""``QuantEarlyExitViT``: an INT8 (W8A8) open_clip vision tower, drop-in for ``clip.visual``."""

from __future__ import annotations

import functools
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backend import get_ops, resolve_backend, validate_backend
from .block import QuantBlock, QuantLinear
from .config import QuantConfig, VisionArch
from .executor import AllExitsResult, ClassifyResult, run_all_exits, run_early_exit
from .flops import FlopsModel, flops_model
from .hardware import act_dtype_name, parse_act_dtype, resolve_act_dtype
from .policy import ExitPolicy


class PatchEmbed(nn.Module):
    """open_clip's ``conv1`` (a stride-``patch`` convolution without bias): ``[B, 3, H, W] -> [B, G, D]``.

    Float: ``F.conv2d``. INT8: patches flattened in ``(channel, row, column)`` order, quantized
    per patch and multiplied with the per-channel INT8 weight ``[D, 3 * ph * pw]``.
    """

    def __init__(self, width: int, patch_size: tuple[int, int], int8: bool):
        super().__init__()
        self.patch_size = patch_size
        ph, pw = patch_size
        if int8:
            self.linear = QuantLinear(3 * ph * pw, width, "per_token", bias=False)
        else:
            self.register_buffer("weight", torch.zeros(width, 3, ph, pw))

    @property
    def int8(self) -> bool:
        return hasattr(self, "linear")

    def forward(self, images: torch.Tensor, ops) -> torch.Tensor:
        B, C, H, W = images.shape
        ph, pw = self.patch_size
        if not self.int8:
            x = F.conv2d(images, self.weight, stride=self.patch_size)
            return x.flatten(2).transpose(1, 2)
        gh, gw = H // ph, W // pw
        patches = images.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B * gh * gw, C * ph * pw)
        return self.linear(patches, ops).view(B, gh * gw, -1)


class QuantTransformer(nn.Module):
    """Holds the blocks under open_clip's name, ``transformer.resblocks``."""

    def __init__(self, blocks: list[QuantBlock]):
        super().__init__()
        self.resblocks = nn.ModuleList(blocks)
        self.layers = len(blocks)


def _call_block(block: QuantBlock, x: torch.Tensor, ops) -> torch.Tensor:
    return block(x, ops)


def _call_embed(model: "QuantEarlyExitViT", images: torch.Tensor, ops, act_dtype: torch.dtype) -> torch.Tensor:
    return model.embed_eager(images, ops, act_dtype)


# Graphs per compiled function: (static + dynamic batch + batch of 1) per block structure, and
# structures differ per quantization scheme; dynamo's default of 8 would silently fall back to
# eager once a process holds a few schemes.
_RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    # dynamic=None: the first shape compiles static; later batch sizes mark the batch dimension
    # dynamic (maybe_mark_dynamic below), so one graph serves every batch size.
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), _RECOMPILE_LIMIT))
    # realize_opcount_threshold: store (in a per-row local buffer) rather than recompute an
    # elementwise chain read twice, as the GELU output is by the amax and the quantize passes of
    # the c_proj input; Inductor's default recomputes its erf, 12% of the tower's time on CPU.
    return torch.compile(fn, dynamic=None, options={"realize_opcount_threshold": 4})


@functools.lru_cache(maxsize=None)
def _have_cxx() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


class QuantEarlyExitViT(nn.Module):
    """INT8 open_clip ``VisionTransformer`` with layer-wise early exits.

    Build with :meth:`from_open_clip`; restore with :meth:`load`. ``forward(images)`` has the
    contract of ``clip.visual(images)``: ``[B, output_dim]`` unnormalised embeddings (and the
    patch tokens when the tower was built with ``output_tokens``).

    The float tensors (embeddings, LayerNorms, ``proj``, scales) stay fp32 whatever ``.to()`` is
    asked. The float activations (residual stream, attention core, GEMM outputs) run in
    ``act_dtype`` (fp32, bf16 or fp16; ``None`` = the best for the device, see
    ``lra_kernels.hardware``); the heads and the gate features are computed in fp32.
    """

    def __init__(
        self,
        arch: VisionArch,
        quant_config: QuantConfig | None = None,
        backend: str = "auto",
        compile_blocks: bool | None = None,
        act_dtype: torch.dtype | str | None = None,
    ):
        super().__init__()
        quant_config = quant_config or QuantConfig()
        self.arch, self.quant_config = arch, quant_config
        self.backend = validate_backend(backend)
        self._act_dtype_request = parse_act_dtype(act_dtype)
        self.compile_blocks = compile_blocks
        self._compile_failed = False
        # CPU torch path: large batches run in chunks of about this many tokens (ViT-B/32: 32
        # images), which keeps a block's INT32/FP32 intermediates in the last-level cache; rows
        # are batch-independent, so chunking changes no result. None disables it.
        self.cpu_chunk_tokens: int | None = 1600

        # open_clip's public attributes
        self.image_size, self.patch_size, self.grid_size = arch.image_size, arch.patch_size, arch.grid_size
        self.output_dim = arch.output_dim if arch.has_proj else arch.width
        self.output_tokens = arch.output_tokens
        self.pool_type, self.final_ln_after_pool = arch.pool_type, arch.final_ln_after_pool
        self.preprocess_cfg = dict(arch.preprocess_cfg)
        self.image_mean = tuple(self.preprocess_cfg.get("mean", ())) or None
        self.image_std = tuple(self.preprocess_cfg.get("std", ())) or None

        D = arch.width
        smooth = quant_config.smooth_alpha is not None
        self.conv1 = PatchEmbed(D, arch.patch_size, quant_config.int8_patch_embed)
        self.register_buffer("class_embedding", torch.zeros(D))
        self.register_buffer("positional_embedding", torch.zeros(arch.num_tokens, D))
        self.ln_pre = nn.Identity() if arch.no_ln_pre else nn.LayerNorm(D, eps=arch.eps)
        blocks = [
            QuantBlock(
                D,
                arch.heads,
                arch.mlp_hidden,
                arch.activation,
                arch.eps,
                quant_config.attn_mode,
                quant_config.mlp_mode,
                attn_bias=arch.attn_bias,
                smooth_proj=smooth,
            )
            for _ in range(arch.layers)
        ]
        self.transformer = QuantTransformer(blocks)
        self.ln_post = nn.LayerNorm(D, eps=arch.eps)
        self.register_buffer("proj", torch.zeros(D, arch.output_dim) if arch.has_proj else None)
        # zero-shot classifier (set_classifier); saved through extra_state, not the state dict
        self.register_buffer("classifier", None, persistent=False)
        self.logit_scale = 100.0
        self.class_names: list[str] | None = None
        self._exit_policy = ExitPolicy.disabled()
        self.cuda_graphs = None  # a lra_kernels.cuda_graphs.GraphedViT once enable_cuda_graphs() is called
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_open_clip(
        cls,
        visual: nn.Module,
        *,
        act_quant: str = "per_token",
        smooth_alpha: float | None = None,
        calibration_images: torch.Tensor | None = None,
        backend: str = "auto",
        static_percentile: float | None = None,
        int8_patch_embed: bool | None = None,
        compile_blocks: bool | None = None,
        act_dtype: torch.dtype | str | None = None,
    ) -> "QuantEarlyExitViT":
        """Quantize an open_clip ``VisionTransformer`` (``clip.visual``).

        ``calibration_images`` (a normalised float batch ``[N, 3, H, W]``) is required for
        ``act_quant="per_tensor_static"`` and for ``smooth_alpha``. ``act_dtype``: the dtype of the
        float activations, ``torch.float32`` / ``torch.bfloat16`` / ``torch.float16``, or ``None``
        for the best default of the device the model runs on (saved with the model). The FP32
        tower is not modified.
        """
        from .convert import convert_open_clip

        config = QuantConfig(
            act_quant=act_quant,
            smooth_alpha=smooth_alpha,
            static_percentile=static_percentile,
            int8_patch_embed=int8_patch_embed,
        )
        return convert_open_clip(visual, config, calibration_images, backend=backend, compile_blocks=compile_blocks,
                                 act_dtype=act_dtype)

    def _apply(self, fn, recurse=True):
        # Float storage stays fp32 whatever dtype a conversion asks for (scales and LayerNorms lose
        # too much in half precision; the activations' dtype is the backend's choice). Device
        # moves go through. This also holds when a parent (``clip.half()``) converts us.
        def keep_dtype(t):
            out = fn(t)
            if t.is_floating_point() and out.dtype != t.dtype:
                return t.to(out.device)
            return out

        return super()._apply(keep_dtype, recurse)

    # ------------------------------------------------------------------ properties
    @property
    def depth(self) -> int:
        return self.arch.layers

    @property
    def width(self) -> int:
        return self.arch.width

    @property
    def device(self) -> torch.device:
        return self.class_embedding.device

    @property
    def resolved_backend(self) -> str:
        return resolve_backend(self.backend, self.device, self.quant_config)

    def ops(self):
        return get_ops(self.resolved_backend)

    @property
    def act_dtype(self) -> torch.dtype:
        """The dtype the float activations run in on the model's current device."""
        return resolve_act_dtype(self._act_dtype_request, self.device, self.resolved_backend)

    @act_dtype.setter
    def act_dtype(self, value: torch.dtype | str | None) -> None:
        self._act_dtype_request = parse_act_dtype(value)

    @property
    def act_dtype_request(self) -> str:
        """What was asked for (``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"``), as saved."""
        return act_dtype_name(self._act_dtype_request)

    # ------------------------------------------------------------------ input checks
    def check_images(self, images) -> torch.Tensor:
        """Validate an image batch; raise ``TypeError``/``ValueError`` saying what was expected."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"expected images as a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
        H, W = self.image_size
        if images.ndim != 4:
            raise ValueError(f"expected images of shape [B, 3, {H}, {W}], got {tuple(images.shape)}")
        if images.shape[1] != 3:
            raise ValueError(f"expected 3 colour channels (images [B, 3, {H}, {W}]), got {images.shape[1]} in {tuple(images.shape)}")
        if tuple(images.shape[2:]) != (H, W):
            raise ValueError(
                f"expected images of height x width {H} x {W} (the tower's image_size), got "
                f"{images.shape[2]} x {images.shape[3]}; resize with the model's preprocess"
            )
        if not images.is_floating_point():
            raise TypeError(
                f"expected float images (fp32/fp16/bf16, normalised with image_mean/image_std), got {images.dtype}"
            )
        if images.device != self.device:
            raise ValueError(f"images are on {images.device} but the model is on {self.device}; move one with .to()")
        return images

    # ------------------------------------------------------------------ stages
    def embed_eager(self, images: torch.Tensor, ops, act_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = self.conv1(images.float(), ops).float()
        cls_tok = self.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_tok, x], dim=1) + self.positional_embedding
        return self.ln_pre(x).to(act_dtype)

    def _use_compile(self) -> bool:
        if self._compile_failed or self.resolved_backend != "torch" or self.device.type != "cpu":
            return False
        if self.compile_blocks is None:
            return _have_cxx()
        return bool(self.compile_blocks)

    def _run(self, fn, module, x, ops, *args):
        if self._use_compile() and x.shape[0] > 0:
            torch._dynamo.maybe_mark_dynamic(x, 0)
            try:
                return _compiled(fn)(module, x, ops, *args)
            except Exception as err:  # a missing compiler or an Inductor limitation: stay correct, run eager
                self._compile_failed = True
                warnings.warn(f"torch.compile of the quantized tower failed ({type(err).__name__}: {err}); running eager")
        return fn(module, x, ops, *args)

    def embed(self, images: torch.Tensor, ops=None) -> torch.Tensor:
        """``[B, 3, H, W]`` -> tokens ``[B, T, D]`` in ``act_dtype`` (patch embedding, class token, positions, ln_pre)."""
        return self._run(_call_embed, self, images, ops or self.ops(), self.act_dtype)

    def run_block(self, index: int, x: torch.Tensor, ops=None) -> torch.Tensor:
        """Run block ``index`` (0-based) on tokens ``[B, T, D]``."""
        return self._run(_call_block, self.transformer.resblocks[index], x, ops or self.ops())

    def pool(self, x: torch.Tensor, ops=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own head, as open_clip's ``_pool`` + ``proj``: ``(pooled[B, E], tokens[B, T-1, D])``, fp32."""
        if self.pool_type == "tok" and not self.final_ln_after_pool and not self.output_tokens:
            pooled = self.ln_post(x[:, 0].float())  # LayerNorm is per token: the class token alone
            return (ops or self.ops()).matmul_rows(pooled, self.proj) if self.proj is not None else pooled, x[:, 1:]
        x = x.float()
        if self.final_ln_after_pool:
            pooled, tokens = self._global_pool(x)
            pooled = self.ln_post(pooled)
        elif self.pool_type == "tok":
            # LayerNorm is per token: normalising the class token alone gives the same pooled row.
            pooled, tokens = self.ln_post(x[:, 0]), x[:, 1:]
            if self.output_tokens:
                tokens = self.ln_post(tokens)
        else:
            x = self.ln_post(x)
            pooled, tokens = self._global_pool(x)
        if self.proj is not None:
            pooled = (ops or self.ops()).matmul_rows(pooled, self.proj)
        return pooled, tokens

    def _global_pool(self, x):
        if self.pool_type == "avg":
            return x[:, 1:].mean(dim=1), x[:, 1:]
        return x[:, 0], x[:, 1:]

    def chunk_size(self) -> int | None:
        """Images per chunk, or None for one pass (GPU, the paper's batch-dependent scheme)."""
        if (self.cpu_chunk_tokens and self.device.type == "cpu" and self.resolved_backend in ("torch", "cpu")
                and self.quant_config.act_quant != "paper"):
            return max(1, int(self.cpu_chunk_tokens) // self.arch.num_tokens)
        return None

    def _chunks(self, images: torch.Tensor) -> list[torch.Tensor]:
        n = self.chunk_size()
        return [images] if n is None or images.shape[0] <= n else list(images.split(n))

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block, ``[B, T, D]`` in ``act_dtype`` (images already checked)."""
        ops = self.ops()
        x = self.embed(images, ops)
        for i in range(self.depth):
            x = self.run_block(i, x, ops)
        return x

    @torch.no_grad()
    def hidden_states(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Tokens after the embedding and after each block: ``depth + 1`` tensors ``[B, T, D]`` in ``act_dtype``."""
        images = self.check_images(images)
        ops = self.ops()
        per_chunk = []
        with torch.autocast(images.device.type, enabled=False):
            for chunk in self._chunks(images):
                states = [self.embed(chunk, ops)]
                for i in range(self.depth):
                    states.append(self.run_block(i, states[-1], ops))
                per_chunk.append(states)
        return per_chunk[0] if len(per_chunk) == 1 else [torch.cat(s) for s in zip(*per_chunk)]

    @torch.no_grad()
    def forward(self, images: torch.Tensor):
        images = self.check_images(images)
        if images.shape[0] == 0:
            out = images.new_zeros(0, self.output_dim)
            if self.output_tokens:
                return out, images.new_zeros(0, self.grid_size[0] * self.grid_size[1], self.width)
            return out
        if self.early_exit_active and not self.output_tokens:
            # Exit heads give directions, not the final head's norms: all rows come back normalised.
            return self.classify(images).embeddings.to(images.dtype)
        with torch.autocast(images.device.type, enabled=False):
            if self.cuda_graphs is not None and self.cuda_graphs.usable(images):
                parts = [self.cuda_graphs.pool(images)]
            else:
                ops = self.ops()
                parts = [self.pool(self.forward_tokens(chunk), ops) for chunk in self._chunks(images)]
        pooled, tokens = (torch.cat(t) for t in zip(*parts)) if len(parts) > 1 else parts[0]
        if self.output_tokens:
            return pooled.to(images.dtype), tokens.to(images.dtype)
        return pooled.to(images.dtype)

    # ------------------------------------------------------------------ early exit
    @property
    def exit_policy(self) -> ExitPolicy:
        return self._exit_policy

    @exit_policy.setter
    def exit_policy(self, policy: ExitPolicy | None) -> None:
        policy = ExitPolicy.disabled() if policy is None else policy
        if not isinstance(policy, ExitPolicy):
            raise TypeError(f"exit_policy must be an ExitPolicy, got {type(policy).__name__}")
        policy.validate_for(self.depth)
        if policy.head == "patch_mean" and self.arch.num_tokens < 2:
            raise ValueError("a patch_mean exit head needs patch tokens")
        self._exit_policy = policy

    @property
    def early_exit_active(self) -> bool:
        """True when a classifier is set and the policy has exit points."""
        return self.classifier is not None and self.exit_policy.enabled

    def set_classifier(
        self, text_features: torch.Tensor, logit_scale: float = 100.0, class_names: list[str] | None = None
    ) -> None:
        """Zero-shot classes: ``text_features[C, output_dim]`` with L2-normalised rows."""
        if not isinstance(text_features, torch.Tensor) or not text_features.is_floating_point():
            raise TypeError(f"text_features must be a float tensor [C, {self.output_dim}], got {type(text_features).__name__}")
        if text_features.ndim != 2 or text_features.shape[1] != self.output_dim or text_features.shape[0] < 1:
            raise ValueError(f"text_features must have shape [C, {self.output_dim}] with C >= 1, got {tuple(text_features.shape)}")
        t = text_features.detach().float()
        if not torch.isfinite(t).all():
            raise ValueError("text_features contain NaN or Inf")
        norms = t.norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            raise ValueError(
                f"text_features rows must be L2-normalised (norms range {norms.min():.4f}..{norms.max():.4f}); "
                "use torch.nn.functional.normalize(text_features, dim=-1)"
            )
        if class_names is not None and len(class_names) != t.shape[0]:
            raise ValueError(f"{len(class_names)} class names for {t.shape[0]} classes")
        if not (isinstance(logit_scale, (int, float)) and logit_scale > 0):
            raise ValueError(f"logit_scale must be a positive number, got {logit_scale!r}")
        self.classifier = t.to(self.device).contiguous()
        self.logit_scale = float(logit_scale)
        self.class_names = list(class_names) if class_names is not None else None

    def enable_cuda_graphs(self, buckets=None, capture: bool | None = None):
        """Run ``forward`` and ``classify`` through CUDA graphs per batch bucket (``lra_kernels.cuda_graphs``);
        returns the ``GraphedViT`` (``.warmup()`` captures ahead of serving). ``capture=False``: the same
        padding and segments, run eagerly. Undo with ``model.cuda_graphs = None``."""
        from .cuda_graphs import DEFAULT_BUCKETS, GraphedViT

        self.cuda_graphs = GraphedViT(self, buckets or DEFAULT_BUCKETS, capture)
        return self.cuda_graphs

    def clear_classifier(self) -> None:
        self.classifier, self.class_names = None, None

    def _require_classifier(self) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError("no classifier set: call set_classifier(text_features) first")
        return self.classifier

    @torch.no_grad()
    def classify(self, images: torch.Tensor, return_gate: bool = False, policy: ExitPolicy | None = None) -> ClassifyResult:
        """Zero-shot classification with early exits (full depth when the policy is disabled).

        Returns logits[B, C], L2-normalised embeddings[B, E], exit_layer[B] (int64; ``depth``
        means the whole network and the model's own head) and, with ``return_gate``, the gate
        features and scores at each exit point. ``policy``: run with this ``ExitPolicy`` instead of
        ``self.exit_policy`` (the model is not changed; ``ExitPolicy.disabled()`` = full depth), so
        evaluations can compare policies on one model from several threads.
        """
        text = self._require_classifier()
        images = self.check_images(images)
        if policy is not None:
            if not isinstance(policy, ExitPolicy):
                raise TypeError(f"policy must be an ExitPolicy, got {type(policy).__name__}")
            policy.validate_for(self.depth)
        active = self.exit_policy if policy is None else policy
        with torch.autocast(images.device.type, enabled=False):
            if policy is None and self.cuda_graphs is not None and self.cuda_graphs.usable(images):
                return self.cuda_graphs.classify(images, return_gate)
            parts = [run_early_exit(self, c.float(), active, text, self.logit_scale, return_gate)
                     for c in self._chunks(images)]
        return parts[0] if len(parts) == 1 else ClassifyResult.cat(parts)

    @torch.no_grad()
    def all_exits(self, images: torch.Tensor, layers: tuple[int, ...] | None = None, head: str | None = None) -> AllExitsResult:
        """Evaluate exit heads + gate features at ``layers`` (default: the policy's) and the
        final head, on every sample, without leaving early (calibration / evaluation)."""
        text = self._require_classifier()
        images = self.check_images(images)
        layers = tuple(self.exit_policy.exit_layers if layers is None else sorted(set(int(x) for x in layers)))
        if layers and (layers[0] < 1 or layers[-1] > self.depth - 1):
            raise ValueError(f"exit layers must lie in 1..{self.depth - 1}, got {layers}")
        with torch.autocast(images.device.type, enabled=False):
            parts = [run_all_exits(self, c.float(), layers, text, self.logit_scale, head or self.exit_policy.head)
                     for c in self._chunks(images)]
        return parts[0] if len(parts) == 1 else AllExitsResult.cat(parts)

    def flops(self, num_classes: int | None = None) -> FlopsModel:
        """Per-sample FLOPs of each stage (see ``lra_kernels.flops``)."""
        if num_classes is None:
            num_classes = self._require_classifier().shape[0]
        return flops_model(self.arch, num_classes, self.exit_policy.head)

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and JSON for save(): exit policy and classifier."""
        tensors, policy_info = self.exit_policy.to_state()
        info = {"exit_policy": policy_info}
        if self.classifier is not None:
            tensors["classifier.text_features"] = self.classifier
            info["classifier"] = {"logit_scale": self.logit_scale, "class_names": self.class_names}
        return tensors, info

    def load_extra_state(self, tensors: dict[str, torch.Tensor], info: dict) -> None:
        if "classifier" in info:
            c = info["classifier"]
            self.set_classifier(tensors["classifier.text_features"], c["logit_scale"], c.get("class_names"))
        if "exit_policy" in info:
            self.exit_policy = ExitPolicy.from_state(tensors, info["exit_policy"])

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``path/`` (a directory): ``model.safetensors`` and ``config.json``; no pickle."""
        from .serialization import save_model

        return save_model(self, path)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", backend: str | None = None,
             act_dtype: torch.dtype | str | None = None) -> "QuantEarlyExitViT":
        """Rebuild a model written by :meth:`save`; needs neither open_clip weights nor a download.

        ``backend`` / ``act_dtype``: None keeps what was saved."""
        from .serialization import load_model

        return load_model(path, device=device, backend=backend, act_dtype=act_dtype)

    def extra_repr(self) -> str:
        a, q = self.arch, self.quant_config
        return (
            f"width={a.width}, layers={a.layers}, heads={a.heads}, image_size={a.image_size}, patch_size={a.patch_size}, "
            f"act_quant={q.act_quant}, smooth_alpha={q.smooth_alpha}, backend={self.backend} ({self.resolved_backend}), "
            f"act_dtype={act_dtype_name(self.act_dtype)}" + ("" if self._act_dtype_request else " (auto)")
        )
