// INT8 GEMM with fused epilogues on prepacked weights (AVX-512 VNNI, or AMX-INT8 tiles).
//
//   acc[m, n] = sum_k q[m, k] * w[n, k]                     (exact int32: u8 codes, minus 128 * colsum)
//   y[m, n]   = act((acc * x_scale[m]) * w_scale[n] + bias[n]) (+ residual[m, n])
//   then, by kind:
//     OUT_FLOAT      y stored as fp32/bf16/fp16
//     OUT_QUANT      (y * smooth[n]) quantized per token (or with a calibrated scale): the next
//                    GEMM's input codes, the hidden activations never leave the cache as floats
//     OUT_FLOAT_LNQ  y stored (the residual stream), then LayerNorm + quantization of the stored
//                    row: the next GEMM's input
//     OUT_ACC        acc itself, int32 (tests)
//
// Each thread owns blocks of whole rows (all N columns), so row-wise epilogues see complete rows
// and no result depends on the blocking, the thread count or the rest of the batch.
#pragma once

#include <cstdint>

namespace lra_cpu {

enum OutKind : int { OUT_FLOAT = 0, OUT_QUANT = 1, OUT_FLOAT_LNQ = 2, OUT_ACC = 3 };

struct GemmArgs {
  // input codes and scales
  const uint8_t* a = nullptr;
  int64_t lda = 0;
  const float* a_scale = nullptr;
  int64_t M = 0;
  // packed weight
  const int8_t* packed = nullptr;
  const int32_t* colsum = nullptr;
  int64_t N = 0, K = 0, Kp = 0;
  const float* w_scale = nullptr;
  const float* bias = nullptr;
  int act = 0;
  const void* residual = nullptr;
  int res_type = 0;
  int64_t ld_res = 0;
  // outputs
  int kind = OUT_FLOAT;
  void* out = nullptr;
  int out_type = 0;
  int64_t ld_out = 0;
  uint8_t* q_out = nullptr;
  int64_t ldq = 0;
  float* q_scale = nullptr;
  const float* smooth = nullptr;
  float static_scale = 0.f;  // > 0: calibrated scale of the next GEMM's input
  const float* ln_w = nullptr;
  const float* ln_b = nullptr;
  float eps = 0.f;
};

void pack_weight(const int8_t* w, int64_t N, int64_t K, int8_t* packed, int32_t* colsum);
void gemm(const GemmArgs& g);

// ISA of the GEMM micro-kernel: "amx" or "avx512_vnni". AMX is used only when compiled in, the
// kernel granted tile data, and use_amx(true) was called (after the self-test in Python).
bool amx_compiled();
bool amx_request_permission();
void use_amx(bool on);
bool amx_in_use();

}  // namespace lra_cpu
