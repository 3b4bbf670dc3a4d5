// The operator library ``torch.ops.lra_cpu``: argument checks, allocation, and the row-wise kernels
// that are not GEMMs (LayerNorm + quantize, fixed-order matrix-vector products).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "attention.h"
#include "common.h"
#include "gemm.h"

namespace lra_cpu {

std::tuple<at::Tensor, at::Tensor> exit_head_op(const at::Tensor& h, const std::optional<at::Tensor>& ln_w,
                                                const std::optional<at::Tensor>& ln_b, double eps,
                                                const std::optional<at::Tensor>& proj, const at::Tensor& text,
                                                double logit_scale, bool cls);
at::Tensor gate_features_op(const at::Tensor& logits, const at::Tensor& h);
void dot_rows(const float* a, int64_t lda, int64_t rows, const float* w, int64_t K, int64_t N, float* out,
              int64_t ldo);
void vec_matmul_rows(const float* a, int64_t lda, int64_t rows, const float* w, int64_t K, int64_t N, float* out,
                     int64_t ldo);

static int float_type(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return F32;
    case at::kBFloat16:
      return BF16;
    case at::kHalf:
      return F16;
    default:
      TORCH_CHECK(false, what, ": expected float32/bfloat16/float16, got ", t.scalar_type());
  }
}

static at::ScalarType scalar_of(int type) {
  return type == F32 ? at::kFloat : (type == BF16 ? at::kBFloat16 : at::kHalf);
}

static const float* opt_f32(const std::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n, what,
              ": expected a contiguous float32 vector of ", n, " elements, got ", t->sizes(), " ", t->scalar_type());
  return t->data_ptr<float>();
}

// Codes buffer [round_up(M, 32) + 32, round_up(K, 64)] uint8; the rows past M hold code 0.
at::Tensor alloc_codes(int64_t M, int64_t K) {
  const int64_t Mp = round_up(M, MALIGN) + MALIGN, Kp = round_up(K, KALIGN);
  at::Tensor codes = at::empty({Mp, Kp}, at::TensorOptions().dtype(at::kByte));
  std::memset(codes.data_ptr<uint8_t>() + M * Kp, 128, (size_t)((Mp - M) * Kp));
  return codes;
}

static std::tuple<at::Tensor, at::Tensor> pack_weight_op(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "pack_weight: expected int8 w[N, K], got ", w.sizes(),
              " ", w.scalar_type());
  at::Tensor wc = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t Np = round_up(N, NPANEL), Kp = round_up(K, KALIGN);
  at::Tensor packed = at::empty({Np * Kp}, at::TensorOptions().dtype(at::kChar));
  at::Tensor colsum = at::empty({Np}, at::TensorOptions().dtype(at::kInt));
  pack_weight(wc.data_ptr<int8_t>(), N, K, packed.data_ptr<int8_t>(), colsum.data_ptr<int32_t>());
  return {packed, colsum};
}

// x[M, K] (rows contiguous) -> codes [Mp, Kp] uint8 (code + 128), scale [M] fp32.
// layernorm: LayerNorm (ln_w, ln_b, eps) first; smooth: multiply by smooth[K] first (no LayerNorm);
// static_scale > 0: that calibrated scale, else one scale per row.
static std::tuple<at::Tensor, at::Tensor> quantize_op(const at::Tensor& x, const std::optional<at::Tensor>& ln_w,
                                                      const std::optional<at::Tensor>& ln_b, double eps,
                                                      bool layernorm, const std::optional<at::Tensor>& smooth,
                                                      double static_scale) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "quantize: expected x[M, K] with contiguous rows, got ", x.sizes());
  const int type = float_type(x, "quantize: x");
  const int64_t M = x.size(0), K = x.size(1), ld = x.stride(0);
  const float* w = opt_f32(ln_w, K, "quantize: ln_w");
  const float* b = opt_f32(ln_b, K, "quantize: ln_b");
  const float* s = opt_f32(smooth, K, "quantize: smooth");
  at::Tensor codes = alloc_codes(M, K);
  at::Tensor scale = at::empty({M}, at::TensorOptions().dtype(at::kFloat));
  const int64_t Kp = codes.size(1);
  const char* xp = (const char*)x.data_ptr();
  uint8_t* q = codes.data_ptr<uint8_t>();
  float* sc = scale.data_ptr<float>();
  const int es = elem_size(type);
  const float fs = (float)static_scale;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<float> h(round_up(K, 16));
    for (int64_t m = m0; m < m1; ++m) {
      const char* row = xp + m * ld * es;
      if (layernorm) {
        layernorm_row(row, type, K, w, b, (float)eps, h.data());
      } else {
        for (int64_t k = 0; k < K; k += 16) {
          const __mmask16 mk = tail_mask(K - k);
          __m512 v = load_f(row + k * es, type, mk);
          if (s) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mk, s + k));
          _mm512_mask_storeu_ps(h.data() + k, mk, v);
        }
      }
      sc[m] = quantize_row(h.data(), K, Kp, q + m * Kp, fs);
    }
  });
  return {codes, scale};
}

static std::vector<at::Tensor> gemm_op(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& packed,
                                       const at::Tensor& colsum, int64_t N, int64_t K, const at::Tensor& w_scale,
                                       const std::optional<at::Tensor>& bias, int64_t act,
                                       const std::optional<at::Tensor>& residual, int64_t kind,
                                       at::ScalarType out_dtype, const std::optional<at::Tensor>& smooth,
                                       double static_scale, const std::optional<at::Tensor>& ln_w,
                                       const std::optional<at::Tensor>& ln_b, double eps) {
  const int64_t M = a_scale.size(0), Kp = round_up(K, KALIGN), Np = round_up(N, NPANEL);
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kByte && a.is_contiguous() && a.size(1) == Kp &&
                  a.size(0) >= round_up(M, MALIGN) + MALIGN,
              "gemm: expected codes from lra_cpu.quantize for K=", K, " and M=", M, ", got ", a.sizes());
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat && a_scale.is_contiguous(), "gemm: a_scale must be float32");
  TORCH_CHECK(packed.numel() == Np * Kp && colsum.numel() == Np, "gemm: packed weight does not match N=", N, ", K=", K);
  GemmArgs g;
  g.a = a.data_ptr<uint8_t>();
  g.lda = Kp;
  g.a_scale = a_scale.data_ptr<float>();
  g.M = M;
  g.packed = packed.data_ptr<int8_t>();
  g.colsum = colsum.data_ptr<int32_t>();
  g.N = N;
  g.K = K;
  g.Kp = Kp;
  g.w_scale = opt_f32(w_scale, N, "gemm: w_scale");
  g.bias = opt_f32(bias, N, "gemm: bias");
  g.act = (int)act;
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == M && residual->size(1) == N && residual->stride(1) == 1,
                "gemm: residual must be [M, N] with contiguous rows, got ", residual->sizes());
    g.residual = residual->data_ptr();
    g.res_type = float_type(*residual, "gemm: residual");
    g.ld_res = residual->stride(0);
  }
  g.kind = (int)kind;
  g.smooth = opt_f32(smooth, N, "gemm: smooth");
  g.static_scale = (float)static_scale;
  g.ln_w = opt_f32(ln_w, N, "gemm: ln_w");
  g.ln_b = opt_f32(ln_b, N, "gemm: ln_b");
  g.eps = (float)eps;
  std::vector<at::Tensor> outs;
  at::Tensor out;
  if (kind == OUT_FLOAT || kind == OUT_FLOAT_LNQ) {
    out = at::empty({M, N}, at::TensorOptions().dtype(out_dtype));
    g.out = out.data_ptr();
    g.out_type = float_type(out, "gemm: out_dtype");
    g.ld_out = N;
    outs.push_back(out);
  } else if (kind == OUT_ACC) {
    out = at::empty({M, N}, at::TensorOptions().dtype(at::kInt));
    g.out = out.data_ptr();
    g.ld_out = N;
    outs.push_back(out);
  }
  if (kind == OUT_QUANT || kind == OUT_FLOAT_LNQ) {
    at::Tensor codes = alloc_codes(M, N);
    at::Tensor scale = at::empty({M}, at::TensorOptions().dtype(at::kFloat));
    g.q_out = codes.data_ptr<uint8_t>();
    g.ldq = codes.size(1);
    g.q_scale = scale.data_ptr<float>();
    outs.push_back(codes);
    outs.push_back(scale);
  }
  TORCH_CHECK(kind >= 0 && kind <= 3, "gemm: unknown output kind ", kind);
  gemm(g);
  return outs;
}

// out[b, n] = sum_k a[b, k] * w[k, n] (w_nk: w given as [N, K]) with the same order of operations for
// every row, whatever the batch: a batch of matrix-vector products, blocked over rows for speed.
static at::Tensor rows_matmul_op(const at::Tensor& a_in, const at::Tensor& w_in, bool w_nk) {
  TORCH_CHECK(a_in.dim() == 2 && w_in.dim() == 2, "rows_matmul: expected a[B, K] and a 2-D weight");
  const at::Tensor a = a_in.to(at::kFloat).contiguous(), w = w_in.to(at::kFloat).contiguous();
  const int64_t B = a.size(0), K = a.size(1);
  const int64_t N = w_nk ? w.size(0) : w.size(1);
  TORCH_CHECK((w_nk ? w.size(1) : w.size(0)) == K, "rows_matmul: a is [", B, ", ", K, "] but w is ", w.sizes());
  at::Tensor out = at::empty({B, N}, at::TensorOptions().dtype(at::kFloat));
  const float* ap = a.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr int R = 4;
  at::parallel_for(0, (B + R - 1) / R, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b0 = g * R, nb = std::min<int64_t>(R, B - b0);
      if (!w_nk) {  // vectorised over n; k in order; the rows of a group share every load of w
        vec_matmul_rows(ap + b0 * K, K, nb, wp, K, N, op + b0 * N, N);
      } else {  // dot products of rows: 16 partial sums in k order, then one fixed reduction
        dot_rows(ap + b0 * K, K, nb, wp, K, N, op + b0 * N, N);
      }
    }
  });
  return out;
}

// One transformer block (open_clip's ResidualAttentionBlock, pre-LayerNorm) as the six kernels above in
// one call, for the Python of a block costs ~0.15 ms at batch 1 (a ViT-B block then takes ~1 ms):
//   a = quantize(LN1(x)); qkv = gemm(a, in_proj); a = attention_quant(qkv)
//   x, a = gemm_ln_quant(a, out_proj, residual x, LN2); a = gemm_quant(a, c_fc, act, smooth)
//   x = gemm(a, c_proj, residual x)
// The same calls as ``lra_kernels.cpu.block.forward_stepwise``, so the same bits. The four linears in
// that order: packed / colsum / w_scale / bias / nk (N, K pairs) / static_scale (0: per token);
// norm: ln_1 weight, bias, ln_2 weight, bias; smooth: c_proj's SmoothQuant factor.
static at::Tensor block_op(const at::Tensor& x, at::TensorList packed, at::TensorList colsum, at::TensorList w_scale,
                           const c10::List<std::optional<at::Tensor>>& bias,
                           const c10::List<std::optional<at::Tensor>>& norm, const std::optional<at::Tensor>& smooth,
                           at::IntArrayRef nk, at::ArrayRef<double> eps, at::ArrayRef<double> static_scale,
                           int64_t heads, bool causal, int64_t act) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "block: expected a contiguous x[B, T, D], got ", x.sizes());
  TORCH_CHECK(packed.size() == 4 && colsum.size() == 4 && w_scale.size() == 4 && bias.size() == 4 && nk.size() == 8 &&
                  static_scale.size() == 4,
              "block: expected the 4 linears in_proj, out_proj, c_fc, c_proj");
  TORCH_CHECK(norm.size() == 4 && eps.size() == 2, "block: expected ln_1 and ln_2 (weight, bias, eps)");
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const at::ScalarType dt = x.scalar_type();
  const at::Tensor x2 = x.view({B * T, D});
  const std::optional<at::Tensor> none;
  auto [codes, scale] = quantize_op(x2, norm.get(0), norm.get(1), eps[0], true, none, static_scale[0]);
  const at::Tensor qkv = gemm_op(codes, scale, packed[0], colsum[0], nk[0], nk[1], w_scale[0], bias.get(0), ACT_NONE,
                                 none, OUT_FLOAT, dt, none, 0.0, none, none, 0.0)[0];
  const auto att = attention_op(qkv, B, T, heads, OUT_QUANT, at::kFloat, static_scale[1], causal);
  const auto mid = gemm_op(att[0], att[1], packed[1], colsum[1], nk[2], nk[3], w_scale[1], bias.get(1), ACT_NONE, x2,
                           OUT_FLOAT_LNQ, dt, none, static_scale[2], norm.get(2), norm.get(3), eps[1]);
  const auto hidden = gemm_op(mid[1], mid[2], packed[2], colsum[2], nk[4], nk[5], w_scale[2], bias.get(2), act, none,
                              OUT_QUANT, at::kFloat, smooth, static_scale[3], none, none, 0.0);
  const at::Tensor out = gemm_op(hidden[0], hidden[1], packed[3], colsum[3], nk[6], nk[7], w_scale[3], bias.get(3),
                                 ACT_NONE, mid[0], OUT_FLOAT, dt, none, 0.0, none, none, 0.0)[0];
  return out.view({B, T, D});
}

static std::string isa_op() {
  return amx_in_use() ? "amx_int8" : "avx512_vnni";
}

static bool set_amx_op(bool on) {
  if (on && !(amx_compiled() && amx_request_permission())) return false;
  use_amx(on);
  return amx_in_use() == on;
}

static bool amx_compiled_op() { return amx_compiled(); }

}  // namespace lra_cpu

TORCH_LIBRARY(lra_cpu, m) {
  m.def("pack_weight(Tensor w) -> (Tensor, Tensor)", &lra_cpu::pack_weight_op);
  m.def("quantize(Tensor x, Tensor? ln_w, Tensor? ln_b, float eps, bool layernorm, Tensor? smooth, "
        "float static_scale) -> (Tensor, Tensor)",
        &lra_cpu::quantize_op);
  m.def("gemm(Tensor a, Tensor a_scale, Tensor packed, Tensor colsum, int N, int K, Tensor w_scale, Tensor? bias, "
        "int act, Tensor? residual, int kind, ScalarType out_dtype, Tensor? smooth, float static_scale, "
        "Tensor? ln_w, Tensor? ln_b, float eps) -> Tensor[]",
        &lra_cpu::gemm_op);
  m.def("attention(Tensor qkv, int B, int T, int heads, int kind, ScalarType out_dtype, float static_scale, "
        "bool causal) -> Tensor[]",
        &lra_cpu::attention_op);
  m.def("block(Tensor x, Tensor[] packed, Tensor[] colsum, Tensor[] w_scale, Tensor?[] bias, Tensor?[] norm, "
        "Tensor? smooth, int[] nk, float[] eps, float[] static_scale, int heads, bool causal, int act) -> Tensor",
        &lra_cpu::block_op);
  m.def("rows_matmul(Tensor a, Tensor w, bool w_nk) -> Tensor", &lra_cpu::rows_matmul_op);
  m.def("exit_head(Tensor h, Tensor? ln_w, Tensor? ln_b, float eps, Tensor? proj, Tensor text, float logit_scale, "
        "bool cls) -> (Tensor, Tensor)",
        &lra_cpu::exit_head_op);
  m.def("gate_features(Tensor logits, Tensor h) -> Tensor", &lra_cpu::gate_features_op);
  m.def("isa() -> str", &lra_cpu::isa_op);
  m.def("set_amx(bool on) -> bool", &lra_cpu::set_amx_op);
  m.def("amx_compiled() -> bool", &lra_cpu::amx_compiled_op);
}
