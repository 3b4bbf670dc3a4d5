"""Names every layer shares, defined once. This module imports nothing (not even torch).

The runtime (``lra_kernels``) and the method (``lra_ee``) both read these; a new gate feature,
head, quantization mode or backend starts here (see docs/architecture.md).
"""

from __future__ import annotations

# ---------------------------------------------------------------------- INT8
QMAX = 127  # symmetric INT8 codes lie in [-QMAX, QMAX]
AMAX_FLOOR = 1e-12  # rows whose max |x| is below this are quantized as if it were this

# ---------------------------------------------------------------------- quantization recipes
ACT_QUANT = ("per_token", "per_tensor_static", "paper")  # QuantConfig.act_quant: the tower's scheme
MODES = (*ACT_QUANT, "float")  # QuantLinear.mode: a scheme, or no quantization (the paper's attention)
GEMMS = ("in_proj", "out_proj", "c_fc", "c_proj")  # the INT8 GEMMs of a block, in order

# ---------------------------------------------------------------------- GEMM epilogues
ACTIVATIONS = ("none", "gelu", "gelu_tanh", "quick_gelu")
ACT_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}  # the kernels' ACTIVATION constexpr

# ---------------------------------------------------------------------- heads and the gate
POOL_TYPES = ("tok", "avg")  # open_clip's pool_type: the model's own head
HEADS = ("patch_mean", "cls")  # exit heads: spatio-semantic aggregation, or the CLS token (ablation)
GATE_FEATURES = ("confidence", "margin", "spatial_variance")
N_FEATURES = len(GATE_FEATURES)

# ---------------------------------------------------------------------- backends
BACKENDS = ("auto", "torch", "triton", "cpu")  # what a model may be asked to run on
CONCRETE_BACKENDS = BACKENDS[1:]  # what "auto" resolves to
