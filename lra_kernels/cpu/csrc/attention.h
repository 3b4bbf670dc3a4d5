// Multi-head self-attention core on the qkv GEMM's output, fused with the quantization of its result.
//
//   qkv[B * T, 3D] -> per (b, head): softmax(q k^T / sqrt(hd)) v  -> out[B * T, D]
//
// Computed in fp32 from qkv of any float type; the output is stored as a float (kind 0) or,
// row by row once every head of a token is done, as the out_proj GEMM's input codes (kind 1, per
// token or with a calibrated scale). Each (b, head) is computed alone, in a fixed order. ``causal``: row t
// attends to keys 0..t only (open_clip's text tower; the keys past a row are never read).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace lra_cpu {

std::vector<at::Tensor> attention_op(const at::Tensor& qkv, int64_t B, int64_t T, int64_t heads, int64_t kind,
                                     at::ScalarType out_dtype, double static_scale, bool causal);
at::Tensor alloc_codes(int64_t M, int64_t K);

}  // namespace lra_cpu
