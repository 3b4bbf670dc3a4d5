"""One builder per CPU provider of an open_clip vision tower.

Every builder has the signature ``build_<name>(visual, calibration_images, *, workdir=None, threads=None)``
and returns a callable ``fn(images[B, 3, H, W] fp32) -> embeddings[B, output_dim] fp32``, or
raises :class:`PeerUnavailable` when its package is not installed (the bench then skips it).

``visual`` (the FP32 open_clip tower) is never modified. ``workdir`` is where exported files
(ONNX, OpenVINO IR) are written and reused: one directory per tower, so that each tower is
exported once per session. ``threads`` defaults to ``torch.get_num_threads()``.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

Embed = Callable[[torch.Tensor], torch.Tensor]


class PeerUnavailable(RuntimeError):
    """The provider cannot run here (a missing package); the reason says which."""


def _import(module: str, package: str | None = None):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise PeerUnavailable(f"{package or module} is not installed ({err}); pip install {package or module}") from err


def _workdir(workdir: str | Path | None) -> Path:
    return Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="lra-bench-"))


def _threads(threads: int | None) -> int:
    return threads or torch.get_num_threads()


def _torch_fn(module: nn.Module, dtype: torch.dtype = torch.float32) -> Embed:
    @torch.inference_mode()
    def fn(images: torch.Tensor) -> torch.Tensor:
        return module(images.to(dtype)).float()

    return fn


def platform_info() -> dict:
    """The machine, for every benchmark's ``extra_info``: CPU model and the int8/bf16 features the
    CPU kernels dispatch on, the kernel ISA chosen at load, torch and the thread count."""
    from lra_kernels import cpu
    from lra_kernels.hardware import cpu_caps

    caps = cpu_caps()
    return {
        "cpu": caps.summary(),
        "cpu_flags": sorted(f for f in caps.flags if f.startswith(("avx512", "amx", "avx_vnni"))),
        "cpu_kernels": cpu.describe(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def model_info(fn) -> dict:
    """Backend, activation dtype and scheme of one of our models (empty for a peer)."""
    if not hasattr(fn, "resolved_backend"):
        return {}
    return {"backend": fn.resolved_backend, "act_dtype": str(fn.act_dtype).replace("torch.", ""),
            "act_quant": fn.quant_config.act_quant, "smooth_alpha": fn.quant_config.smooth_alpha}


# ---------------------------------------------------------------------- torch
def build_open_clip_fp32(visual: nn.Module, calibration_images: torch.Tensor, **_) -> Embed:
    """The tower as built (FP32, eager)."""
    return _torch_fn(visual)


def build_open_clip_bf16(visual: nn.Module, calibration_images: torch.Tensor, **_) -> Embed:
    """A bf16 copy of the tower, fed bf16 images."""
    return _torch_fn(copy.deepcopy(visual).to(torch.bfloat16), torch.bfloat16)


def build_torch_dynamic_int8(visual: nn.Module, calibration_images: torch.Tensor, **_) -> Embed:
    """The paper's INT8 baseline: ``torch.ao.quantization.quantize_dynamic`` on ``nn.Linear``."""
    qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(visual), {nn.Linear}, dtype=torch.qint8)
    return _torch_fn(qmodel)


def build_lra_int8(visual: nn.Module, calibration_images: torch.Tensor, **_) -> Embed:
    """Ours, defaults: W8A8 per-token, INT8 patch embedding (torch backend; Inductor-compiled
    blocks on CPU at the first call)."""
    from lra_kernels import QuantEarlyExitViT

    return QuantEarlyExitViT.from_open_clip(visual)


def build_lra_int8_smoothquant(visual: nn.Module, calibration_images: torch.Tensor, **_) -> Embed:
    """Ours with SmoothQuant (alpha 0.5) calibrated on the same images as OpenVINO's NNCF."""
    from lra_kernels import QuantEarlyExitViT

    return QuantEarlyExitViT.from_open_clip(visual, smooth_alpha=0.5, calibration_images=calibration_images)


def build_lra_int8_static(visual: nn.Module, calibration_images: torch.Tensor, **_) -> Embed:
    """Ours with static per-tensor activation scales + SmoothQuant (the same calibration images as
    NNCF): activations stay INT8 from one GEMM's epilogue to the next GEMM, as OpenVINO's."""
    from lra_kernels import QuantEarlyExitViT

    return QuantEarlyExitViT.from_open_clip(visual, act_quant="per_tensor_static", smooth_alpha=0.5,
                                            calibration_images=calibration_images)


def build_lra_int8_fp32_act(visual: nn.Module, calibration_images: torch.Tensor, **_) -> Embed:
    """Ours with fp32 activations (``act_dtype=torch.float32``) instead of the CPU default."""
    from lra_kernels import QuantEarlyExitViT

    return QuantEarlyExitViT.from_open_clip(visual, act_dtype=torch.float32)


def build_lra_int8_torch_backend(visual: nn.Module, calibration_images: torch.Tensor, **_) -> Embed:
    """Ours on the reference torch backend (``torch._int_mm`` + Inductor-compiled blocks, fp32): the
    CPU path before the CPU kernels, kept as the fallback."""
    from lra_kernels import QuantEarlyExitViT

    return QuantEarlyExitViT.from_open_clip(visual, backend="torch")


def build_torchao_int8_dynamic(visual: nn.Module, calibration_images: torch.Tensor, **_) -> Embed:
    """torchao's ``Int8DynamicActivationInt8WeightConfig`` (per-token dynamic activations, per-channel
    weights) on a bf16 copy of the tower, ``torch.compile``d: the library route to W8A8 in PyTorch."""
    torchao = _import("torchao.quantization", "torchao")
    model = copy.deepcopy(visual).to(torch.bfloat16)
    torchao.quantize_(model, torchao.Int8DynamicActivationInt8WeightConfig())
    compiled = torch.compile(model)

    @torch.inference_mode()
    def fn(images: torch.Tensor) -> torch.Tensor:
        return compiled(images.to(torch.bfloat16)).float()

    return fn


# ---------------------------------------------------------------------- exports
@contextlib.contextmanager
def _mha_fastpath_off():
    """Trace ``nn.MultiheadAttention`` as its composite ops. Without grad it takes the fused fast
    path, ``aten::_native_multi_head_attention``, which the ONNX exporter cannot export and with
    which OpenVINO's conversion fails its trace check ("Graphs differed across invocations")."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


# ---------------------------------------------------------------------- ONNX Runtime
def export_onnx(visual: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """FP32 ONNX (opset 17, dynamic batch) with the legacy TorchScript exporter; reused if present."""
    if not path.exists():
        _import("onnx")
        with torch.no_grad(), _mha_fastpath_off():
            torch.onnx.export(
                visual,
                (example,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["images"],
                output_names=["embeddings"],
                dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
            )
    return path


def build_ort_int8(
    visual: nn.Module, calibration_images: torch.Tensor, *, workdir=None, threads: int | None = None
) -> Embed:
    """ONNX Runtime dynamic INT8 (per-channel QInt8 weights), after ORT's quantization pre-processing."""
    ort = _import("onnxruntime")
    _import("onnx")
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    work = _workdir(workdir)
    fp32 = export_onnx(visual, work / "visual_fp32.onnx", calibration_images[:1])
    pre, int8 = work / "visual_fp32_pre.onnx", work / "visual_int8.onnx"
    if not int8.exists():
        # ORT's recommended step before quantizing (ONNX shape inference + graph optimisation; made
        # no measurable difference here); its symbolic shape inference fails on the exported
        # Reshape, hence skipped.
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(str(pre), str(int8), per_channel=True, weight_type=QuantType.QInt8)

    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads(threads)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])

    def fn(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])

    return fn


# ---------------------------------------------------------------------- OpenVINO
def convert_openvino(visual: nn.Module, work: Path, example: torch.Tensor):
    """The FP32 tower as an OpenVINO model (dynamic batch), saved as IR in ``work`` and reused."""
    ov = _import("openvino")
    xml = work / "visual_fp32.xml"
    if not xml.exists():
        h, w = example.shape[-2:]
        shape = [(-1, 3, h, w)]
        with torch.no_grad(), _mha_fastpath_off():
            model = ov.convert_model(visual, example_input=example, input=shape)
        ov.save_model(model, str(xml), compress_to_fp16=False)
    return ov.Core().read_model(str(xml))


def _compile_openvino(model, threads: int | None, precision: str | None = None) -> Embed:
    ov = _import("openvino")
    # One stream using every thread (LATENCY hint): one synchronous batch-32 request at a time.
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": _threads(threads)}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def fn(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(request.infer({0: images.numpy()})[0].copy())

    fn.precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    return fn


def build_openvino_int8(
    visual: nn.Module, calibration_images: torch.Tensor, *, workdir=None, threads: int | None = None
) -> Embed:
    """OpenVINO + NNCF post-training INT8 (transformer preset, SmoothQuant, bias correction).

    The layers NNCF leaves unquantized run in f32: on the AVX512-BF16 bench machine that was
    ~10% faster than the CPU plugin's default there (bf16), and closer to FP32.
    """
    nncf = _import("nncf")
    model = convert_openvino(visual, _workdir(workdir), calibration_images[:1])
    batches = [b.numpy() for b in calibration_images.split(8)]
    qmodel = nncf.quantize(
        model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batches)
    )
    return _compile_openvino(qmodel, threads, "f32")


def build_openvino_bf16(
    visual: nn.Module, calibration_images: torch.Tensor, *, workdir=None, threads: int | None = None
) -> Embed:
    """OpenVINO, no quantization, bf16 inference precision (reference)."""
    return _compile_openvino(convert_openvino(visual, _workdir(workdir), calibration_images[:1]), threads, "bf16")


def build_openvino_fp32(
    visual: nn.Module, calibration_images: torch.Tensor, *, workdir=None, threads: int | None = None
) -> Embed:
    """OpenVINO, no quantization, f32 inference precision (reference)."""
    return _compile_openvino(convert_openvino(visual, _workdir(workdir), calibration_images[:1]), threads, "f32")


PROVIDERS = (
    "open_clip_fp32",
    "open_clip_bf16",
    "torch_dynamic_int8",
    "ort_int8",
    "openvino_int8",
    "openvino_bf16",
    "torchao_int8_dynamic",
    "lra_int8",
    "lra_int8_smoothquant",
    "lra_int8_static",
    "lra_int8_fp32_act",
    "lra_int8_torch_backend",
)
OURS = "lra_int8"
FP32 = "open_clip_fp32"


def builder(name: str) -> Callable[..., Embed]:
    return globals()[f"build_{name}"]
