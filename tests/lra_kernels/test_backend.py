"""Backend selection (``lra_kernels.backend``): the ops contract each backend fulfils, and its reasons to decline."""

import dataclasses

import pytest
import torch

from lra_kernels import backend
from lra_kernels.config import QuantConfig
from lra_kernels.ops import BackendUnavailable, Ops
from lra_kernels.ops.reference import TORCH_OPS

CPU = torch.device("cpu")
REQUIRED = [f.name for f in dataclasses.fields(Ops) if f.name != "name" and f.default is dataclasses.MISSING]


@pytest.mark.parametrize("name", ["torch", "triton", "cpu"])
def test_every_backend_fills_the_contract(name):
    b = backend.backend_named(name)
    if b.declines(CPU) is not None and name == "cpu":
        pytest.skip(f"the CPU kernels are unavailable here: {b.declines(CPU)}")
    ops = b.ops()
    assert isinstance(ops, Ops) and ops.name == name and ops is b.ops()  # built once
    for field in REQUIRED:
        assert callable(getattr(ops, field)), field
    for field in ("fused_block", "fused_linear"):
        assert getattr(ops, field) is None or callable(getattr(ops, field)), field


def test_ops_are_frozen_and_replace_makes_a_copy():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TORCH_OPS.int8_gemm = None

    def gemm(*args, **kwargs):
        return TORCH_OPS.int8_gemm(*args, **kwargs)

    other = TORCH_OPS.replace(int8_gemm=gemm)
    assert other.int8_gemm is gemm and TORCH_OPS.int8_gemm is not gemm and other.attention is TORCH_OPS.attention


def test_the_torch_backend_declines_nothing():
    assert backend.backend_named("torch").declines(torch.device("meta"), QuantConfig(act_quant="paper")) is None


def test_triton_declines_cpu_tensors_unless_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = backend.backend_named("triton").declines(CPU)
    assert reason is not None and "CUDA" in reason
    with pytest.raises(BackendUnavailable, match="backend='triton' cannot run this model: .*CUDA"):
        backend.choose_backend("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.resolve_backend("triton", CPU) == "triton"


def test_cpu_declines_other_devices_and_the_paper_scheme():
    cpu = backend.backend_named("cpu")
    assert "CPU tensors" in cpu.declines(torch.device("meta"))
    assert "paper's scheme" in cpu.declines(CPU, QuantConfig(act_quant="paper"))
    with pytest.raises(ValueError, match="backend='cpu' cannot run this model: the paper's scheme"):
        backend.resolve_backend("cpu", CPU, QuantConfig(act_quant="paper"))


def test_auto_takes_the_first_candidate_that_accepts():
    paper = QuantConfig(act_quant="paper")
    assert backend.resolve_backend("auto", CPU, paper) == "torch", "the CPU kernels decline the paper's scheme"
    expected = "cpu" if backend.backend_named("cpu").declines(CPU) is None else "torch"
    assert backend.resolve_backend("auto", CPU) == expected
    assert backend.resolve_backend("auto", torch.device("meta")) == "torch"


def test_auto_with_no_taker_lists_every_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setitem(backend.AUTO_ORDER, "cpu", ("triton", "cpu"))
    with pytest.raises(BackendUnavailable) as err:
        backend.choose_backend("auto", CPU, QuantConfig(act_quant="paper"))
    msg = str(err.value)
    assert "'triton': " in msg and "'cpu': " in msg and "paper's scheme" in msg
    assert isinstance(err.value, ValueError) and isinstance(err.value, RuntimeError)


def test_unknown_backends_are_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.resolve_backend("cuda", CPU)
    with pytest.raises(ValueError, match="no operations for backend 'auto'"):
        backend.get_ops("auto")
