"""``lra_kernels.names``: the one definition of the shared names, and the places that must follow it."""

import pytest
import torch

from lra_kernels import ExitPolicy, names
from lra_kernels.config import QuantConfig
from lra_kernels.kernels.gate_features import gate_features_ref
from lra_kernels.kernels.int8_gemm import apply_activation


@pytest.mark.parametrize("act_quant", names.ACT_QUANT)
def test_every_scheme_is_a_config(act_quant):
    assert QuantConfig(act_quant=act_quant).act_quant == act_quant
    with pytest.raises(ValueError, match="act_quant must be one of"):
        QuantConfig(act_quant="per_channel")


def test_the_gate_has_one_weight_per_feature():
    logits, h = torch.randn(4, 7), torch.randn(4, 5, 8)
    assert gate_features_ref(logits, h).shape == (4, names.N_FEATURES) == (4, len(names.GATE_FEATURES))
    p = ExitPolicy.disabled()
    assert p.weight.shape == (0, names.N_FEATURES)
    with pytest.raises(ValueError, match="weight must have shape"):
        ExitPolicy((1,), torch.zeros(1, names.N_FEATURES + 1), torch.zeros(1), torch.zeros(1, names.N_FEATURES),
                   torch.ones(1, names.N_FEATURES), torch.ones(1))


@pytest.mark.parametrize("head", names.HEADS)
def test_every_head_is_a_policy_head(head):
    F = names.N_FEATURES
    p = ExitPolicy((1,), torch.zeros(1, F), torch.zeros(1), torch.zeros(1, F), torch.ones(1, F), torch.ones(1), head)
    assert p.head == head


def test_activation_codes_follow_the_names():
    assert list(names.ACT_CODES) == list(names.ACTIVATIONS) and names.ACT_CODES["none"] == 0
    y = torch.randn(5)
    for act in names.ACTIVATIONS:
        apply_activation(y, act)
    with pytest.raises(ValueError, match="activation must be one of"):
        apply_activation(y, "relu")


def test_modes_are_the_schemes_and_float():
    assert names.MODES == (*names.ACT_QUANT, "float") and names.BACKENDS[0] == "auto"
