"""``QuantEarlyExitViT``: an INT8 (W8A8) open_clip vision tower, drop-in for ``clip.visual``.

The class holds the parts (``lra_kernels.tower``), the zero-shot classifier and the exit policy,
and runs them. Building is elsewhere: the converter (``lra_kernels.convert``) makes the parts of
an open_clip tower, the saved-model format (``lra_kernels.serialization``) reads them back; the
backend is chosen in ``lra_kernels.backend``, the heads are ``lra_kernels.heads``, the early-exit
loop is ``lra_kernels.executor``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from . import compiled, heads
from .backend import get_ops, resolve_backend, validate_backend
from .config import QuantConfig, VisionArch
from .convert import convert_open_clip
from .executor import AllExitsResult, ClassifyResult, run_all_exits, run_early_exit
from .flops import FlopsModel, flops_model
from .hardware import act_dtype_name, parse_act_dtype, resolve_act_dtype
from .policy import ExitPolicy, check_exit_layers
from .serialization import read_model, save_model, split_state
from .tower import QuantTransformer, TowerParts, check_images, empty_parts
from .validate import ModelLoadError, spec_of


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
        *,
        parts: TowerParts | None = None,
    ):
        """A model of ``arch`` from its ``parts`` (``convert_open_clip``); without them, zero weights to load into."""
        super().__init__()
        quant_config = quant_config or QuantConfig()
        self.arch, self.quant_config = arch, quant_config
        self.backend = validate_backend(backend)
        self._act_dtype_request = parse_act_dtype(act_dtype)
        self.compile_blocks = compile_blocks
        self._compile_failed = False
        # CPU paths: large batches run in chunks of about this many tokens (ViT-B/32: 32 images),
        # which keeps a block's INT32/FP32 intermediates in the last-level cache; rows are
        # batch-independent, so chunking changes no result. None disables it.
        self.cpu_chunk_tokens: int | None = 1600

        # open_clip's public attributes
        self.image_size, self.patch_size, self.grid_size = arch.image_size, arch.patch_size, arch.grid_size
        self.output_dim = arch.output_dim if arch.has_proj else arch.width
        self.output_tokens = arch.output_tokens
        self.pool_type, self.final_ln_after_pool = arch.pool_type, arch.final_ln_after_pool
        self.preprocess_cfg = dict(arch.preprocess_cfg)
        self.image_mean = tuple(self.preprocess_cfg.get("mean", ())) or None
        self.image_std = tuple(self.preprocess_cfg.get("std", ())) or None

        parts = (parts or empty_parts(arch, quant_config)).check(arch)
        self.conv1 = parts.conv1
        self.register_buffer("class_embedding", parts.class_embedding)
        self.register_buffer("positional_embedding", parts.positional_embedding)
        self.ln_pre = parts.ln_pre
        self.transformer = QuantTransformer(parts.blocks)
        self.ln_post = parts.ln_post
        self.register_buffer("proj", parts.proj)
        # zero-shot classifier (set_classifier); saved through extra_state, not the state dict
        self.register_buffer("classifier", None, persistent=False)
        self.logit_scale = 100.0
        self.class_names: list[str] | None = None
        self._exit_policy = ExitPolicy.disabled()
        self.cuda_graphs = None  # a lra_kernels.cuda_graphs.GraphedViT once enable_cuda_graphs() is called
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ construction and persistence
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
    ) -> QuantEarlyExitViT:
        """Quantize an open_clip ``VisionTransformer`` (``clip.visual``).

        ``calibration_images`` (a normalised float batch ``[N, 3, H, W]``) is required for
        ``act_quant="per_tensor_static"`` and for ``smooth_alpha``. ``act_dtype``: the dtype of the
        float activations, ``torch.float32`` / ``torch.bfloat16`` / ``torch.float16``, or ``None``
        for the best default of the device the model runs on (saved with the model). The FP32
        tower is not modified.
        """
        config = QuantConfig(act_quant=act_quant, smooth_alpha=smooth_alpha, static_percentile=static_percentile,
                             int8_patch_embed=int8_patch_embed)
        arch, parts = convert_open_clip(visual, config, calibration_images)
        model = cls(arch, config, backend=backend, compile_blocks=compile_blocks, act_dtype=act_dtype, parts=parts)
        return model.to(visual.conv1.weight.device).eval()

    def save(self, path: str | Path) -> Path:
        """Write ``path/`` (a directory): ``model.safetensors`` and ``config.json``; no pickle."""
        return save_model(self, path)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", backend: str | None = None,
             act_dtype: torch.dtype | str | None = None) -> QuantEarlyExitViT:
        """Rebuild a model written by :meth:`save`; needs neither open_clip weights nor a download.

        ``backend`` / ``act_dtype``: None keeps what was saved."""
        saved = read_model(path, cls._state_spec)  # validated first: every problem is one ModelLoadError
        model = cls(saved.arch, saved.quant_config, backend=backend or saved.backend,
                    act_dtype=act_dtype if act_dtype is not None else saved.act_dtype)
        try:
            state, rest = split_state(saved, set(model.state_dict()), path)
            model.load_state_dict(state, strict=True)
            model.load_extra_state(rest, saved.extra)
        except (ValueError, TypeError, RuntimeError, KeyError) as err:  # e.g. an exit policy or classifier rejected
            raise ModelLoadError(f"{path}: {err}") from None
        return model.to(device).eval()

    @classmethod
    def _state_spec(cls, arch: VisionArch, quant_config: QuantConfig) -> dict:
        """The state dict a model of ``arch`` has, as ``{name: (safetensors dtype, shape)}``, built on the meta
        device (no weights allocated)."""
        with torch.device("meta"):
            parts = empty_parts(arch, quant_config)
        return spec_of(cls(arch, quant_config, parts=parts).state_dict())

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
        """The ``lra_kernels.ops.Ops`` this model runs on (its backend, resolved for its device)."""
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

    def check_images(self, images) -> torch.Tensor:
        """Validate an image batch; raise ``TypeError``/``ValueError`` saying what was expected."""
        return check_images(images, self.image_size, self.device)

    # ------------------------------------------------------------------ stages
    def embed_eager(self, images: torch.Tensor, ops, act_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = self.conv1(images.float(), ops).float()
        cls_tok = self.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_tok, x], dim=1) + self.positional_embedding
        return self.ln_pre(x).to(act_dtype)

    def _run(self, fn, module, x, ops, *args):
        if (not self._compile_failed and x.shape[0] > 0
                and compiled.wanted(self.compile_blocks, self.resolved_backend, self.device)):
            torch._dynamo.maybe_mark_dynamic(x, 0)
            try:
                return compiled.compiled(fn)(module, x, ops, *args)
            except Exception as err:  # a missing compiler or an Inductor limitation: stay correct, run eager
                self._compile_failed = True
                warnings.warn(f"torch.compile of the quantized tower failed ({type(err).__name__}: {err}); "
                              f"running eager")
        return fn(module, x, ops, *args)

    def embed(self, images: torch.Tensor, ops=None) -> torch.Tensor:
        """``[B, 3, H, W]`` -> tokens ``[B, T, D]`` in ``act_dtype`` (patch embedding, class token, positions,
        ln_pre)."""
        return self._run(compiled.call_embed, self, images, ops or self.ops(), self.act_dtype)

    def run_block(self, index: int, x: torch.Tensor, ops=None) -> torch.Tensor:
        """Run block ``index`` (0-based) on tokens ``[B, T, D]``."""
        return self._run(compiled.call_block, self.transformer.resblocks[index], x, ops or self.ops())

    def pool(self, x: torch.Tensor, ops=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own head, as open_clip's ``_pool`` + ``proj``: ``(pooled[B, E], tokens[B, T-1, D])``, fp32."""
        return heads.own_head(self, x, (ops or self.ops()).matmul_rows)

    def exit_head(self, x: torch.Tensor, head: str | None = None, ops=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The exit head (``head``: default the policy's) on tokens ``x[B, T, D]`` against the classifier:
        ``(logits[B, C], z[B, E])`` fp32."""
        ops = ops or self.ops()
        return heads.exit_head(self, ops.exit_head, x, self.require_classifier(), self.logit_scale,
                               head or self.exit_policy.head)

    def final_head(self, x: torch.Tensor, ops=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own head on tokens ``x`` (after the last block) against the classifier: ``(logits, z)``."""
        ops = ops or self.ops()
        return heads.final_head(self, x, self.require_classifier(), self.logit_scale, ops.matmul_rows)

    def gate_features(self, logits: torch.Tensor, x: torch.Tensor, ops=None) -> torch.Tensor:
        """The gate features ``[B, N_FEATURES]`` of an exit head's ``logits`` on tokens ``x``."""
        return (ops or self.ops()).gate_features(logits, x)

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
        """Zero-shot classes: ``text_features[C, output_dim]`` with L2-normalised rows. The model keeps its
        own copy: a later in-place change to ``text_features`` does not reach it."""
        t = heads.check_text_features(text_features, self.output_dim, class_names, logit_scale)
        self.classifier = t.to(self.device, copy=True).contiguous()
        self.logit_scale = float(logit_scale)
        self.class_names = list(class_names) if class_names is not None else None

    def clear_classifier(self) -> None:
        self.classifier, self.class_names = None, None

    def require_classifier(self) -> torch.Tensor:
        """The classifier ``[C, output_dim]``; ``RuntimeError`` when none is set."""
        if self.classifier is None:
            raise RuntimeError("no classifier set: call set_classifier(text_features) first")
        return self.classifier

    def enable_cuda_graphs(self, buckets=None, capture: bool | None = None):
        """Run ``forward`` and ``classify`` through CUDA graphs per batch bucket (``lra_kernels.cuda_graphs``);
        returns the ``GraphedViT`` (``.warmup()`` captures ahead of serving). ``capture=False``: the same
        padding and segments, run eagerly. Undo with ``model.cuda_graphs = None``."""
        from .cuda_graphs import DEFAULT_BUCKETS, GraphedViT

        self.cuda_graphs = GraphedViT(self, buckets or DEFAULT_BUCKETS, capture)
        return self.cuda_graphs

    @torch.no_grad()
    def classify(self, images: torch.Tensor, return_gate: bool = False,
                 policy: ExitPolicy | None = None) -> ClassifyResult:
        """Zero-shot classification with early exits (full depth when the policy is disabled).

        Returns logits[B, C], L2-normalised embeddings[B, E], exit_layer[B] (int64; ``depth``
        means the whole network and the model's own head) and, with ``return_gate``, the gate
        features and scores at each exit point. ``policy``: run with this ``ExitPolicy`` instead of
        ``self.exit_policy`` (the model is not changed; ``ExitPolicy.disabled()`` = full depth), so
        evaluations can compare policies on one model from several threads.
        """
        text = self.require_classifier()
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
    def all_exits(self, images: torch.Tensor, layers: tuple[int, ...] | None = None,
                  head: str | None = None) -> AllExitsResult:
        """Evaluate exit heads + gate features at ``layers`` (default: the policy's) and the
        final head, on every sample, without leaving early (calibration / evaluation)."""
        text = self.require_classifier()
        images = self.check_images(images)
        layers = check_exit_layers(self.exit_policy.exit_layers if layers is None else layers, self.depth)
        with torch.autocast(images.device.type, enabled=False):
            parts = [run_all_exits(self, c.float(), layers, text, self.logit_scale, head or self.exit_policy.head)
                     for c in self._chunks(images)]
        return parts[0] if len(parts) == 1 else AllExitsResult.cat(parts)

    def flops(self, num_classes: int | None = None) -> FlopsModel:
        """Per-sample FLOPs of each stage (see ``lra_kernels.flops``)."""
        if num_classes is None:
            num_classes = self.require_classifier().shape[0]
        return flops_model(self.arch, num_classes, self.exit_policy.head)

    def extra_repr(self) -> str:
        a, q = self.arch, self.quant_config
        return (
            f"width={a.width}, layers={a.layers}, heads={a.heads}, image_size={a.image_size}, "
            f"patch_size={a.patch_size}, act_quant={q.act_quant}, smooth_alpha={q.smooth_alpha}, "
            f"backend={self.backend} ({self.resolved_backend}), "
            f"act_dtype={act_dtype_name(self.act_dtype)}" + ("" if self._act_dtype_request else " (auto)")
        )
