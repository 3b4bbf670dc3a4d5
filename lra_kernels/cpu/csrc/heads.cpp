// Exit head and gate features, per sample, in a fixed order (contracts: kernels/exit_head.py,
// kernels/gate_features.py):
//
//   m = mean_{t >= 1} h[b, t, :] (or h[b, 0, :]);  n = LayerNorm(m);  e = n @ proj;  z = e / max(|e|, 1e-12)
//   logits[b, c] = logit_scale * z . text[c]
//   features[b] = (max softmax, top-2 softmax margin, mean_d Var_t(h[b, 1:, d]))    NaN if not finite
//
// Every row is computed alone (vectorised over channels / classes, tokens and k in order), so a
// sample's exit decision never depends on the batch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>
#include <vector>

#include "common.h"

namespace lra_cpu {

namespace {

int ftype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return F32;
    case at::kBFloat16:
      return BF16;
    case at::kHalf:
      return F16;
    default:
      TORCH_CHECK(false, "expected float32/bfloat16/float16, got ", t.scalar_type());
  }
}

// out[r][0..N) = a[r][0..K) @ w[K, N] for R rows at once (w row-major, ld N; a rows ld lda, out rows
// ld ldo): k in order, vectorised over n; the rows share every load of w.
template <int R>
void rows_vec_matmul(const float* a, int64_t lda, const float* w, int64_t K, int64_t N, float* out, int64_t ldo) {
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    __mmask16 mk[4];
    for (int c = 0; c < 4; ++c) mk[c] = n0 + 16 * c < N ? tail_mask(N - n0 - 16 * c) : (__mmask16)0;
    for (int64_t k = 0; k < K; ++k) {
      const float* wr = w + k * N + n0;
      const __m512 w0 = _mm512_maskz_loadu_ps(mk[0], wr), w1 = _mm512_maskz_loadu_ps(mk[1], wr + 16);
      const __m512 w2 = _mm512_maskz_loadu_ps(mk[2], wr + 32), w3 = _mm512_maskz_loadu_ps(mk[3], wr + 48);
      for (int r = 0; r < R; ++r) {
        const __m512 av = _mm512_set1_ps(a[r * lda + k]);
        acc[r][0] = _mm512_fmadd_ps(av, w0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(av, w1, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(av, w2, acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(av, w3, acc[r][3]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c)
        if (mk[c]) _mm512_mask_storeu_ps(out + r * ldo + n0 + 16 * c, mk[c], acc[r][c]);
  }
}

// out[r][n] = a[r][0..K) . w[n][0..K) for R rows at once (w row-major [N, K]): 16 partial sums in k
// order, then one fixed reduction; the rows share every load of w.
template <int R>
void rows_dot(const float* a, int64_t lda, const float* w, int64_t K, int64_t N, float* out, int64_t ldo) {
  for (int64_t n = 0; n < N; ++n) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = tail_mask(K - k);
      const __m512 wv = _mm512_maskz_loadu_ps(mk, w + n * K + k);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, a + r * lda + k), wv, acc[r]);
    }
    for (int r = 0; r < R; ++r) out[r * ldo + n] = _mm512_reduce_add_ps(acc[r]);
  }
}

}  // namespace

void vec_matmul_rows(const float* a, int64_t lda, int64_t rows, const float* w, int64_t K, int64_t N, float* out,
                     int64_t ldo) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) rows_vec_matmul<4>(a + r * lda, lda, w, K, N, out + r * ldo, ldo);
  for (; r < rows; ++r) rows_vec_matmul<1>(a + r * lda, lda, w, K, N, out + r * ldo, ldo);
}

void dot_rows(const float* a, int64_t lda, int64_t rows, const float* w, int64_t K, int64_t N, float* out,
              int64_t ldo) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) rows_dot<4>(a + r * lda, lda, w, K, N, out + r * ldo, ldo);
  for (; r < rows; ++r) rows_dot<1>(a + r * lda, lda, w, K, N, out + r * ldo, ldo);
}

namespace {

// patch mean of row b (fp32, channels vectorised, tokens in order) into m[0..D)
void patch_mean(const char* h, int type, int64_t T, int64_t D, int64_t ld_t, float* m) {
  const int es = elem_size(type);
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 mk = tail_mask(D - d);
    __m512 s = _mm512_setzero_ps();
    for (int64_t t = 1; t < T; ++t) s = _mm512_add_ps(s, load_f(h + (t * ld_t + d) * es, type, mk));
    _mm512_mask_storeu_ps(m + d, mk, _mm512_div_ps(s, _mm512_set1_ps((float)(T - 1))));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> exit_head_op(const at::Tensor& h, const std::optional<at::Tensor>& ln_w,
                                                const std::optional<at::Tensor>& ln_b, double eps,
                                                const std::optional<at::Tensor>& proj, const at::Tensor& text,
                                                double logit_scale, bool cls) {
  TORCH_CHECK(h.dim() == 3 && h.stride(2) == 1, "exit_head: expected h[B, T, D] with contiguous channels");
  const int64_t B = h.size(0), T = h.size(1), D = h.size(2);
  TORCH_CHECK(cls ? T >= 1 : T >= 2, "exit_head: not enough tokens (T=", T, ")");
  const int64_t E = proj.has_value() ? proj->size(1) : D;
  TORCH_CHECK(!proj.has_value() || (proj->scalar_type() == at::kFloat && proj->is_contiguous() && proj->size(0) == D),
              "exit_head: proj must be a contiguous float32 [D, E]");
  TORCH_CHECK(text.scalar_type() == at::kFloat && text.is_contiguous() && text.dim() == 2 && text.size(1) == E,
              "exit_head: expected the classifier as contiguous float32 [C, E]");
  for (const auto* t : {&ln_w, &ln_b})
    TORCH_CHECK(!t->has_value() || ((*t)->scalar_type() == at::kFloat && (*t)->numel() == D && (*t)->is_contiguous()),
                "exit_head: LayerNorm parameters must be contiguous float32 [D]");
  const int64_t C = text.size(0);
  const int type = ftype(h);
  const int es = elem_size(type);
  at::Tensor logits = at::empty({B, C}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor z = at::empty({B, E}, at::TensorOptions().dtype(at::kFloat));
  const char* hp = (const char*)h.data_ptr();
  const float* w = ln_w.has_value() ? ln_w->data_ptr<float>() : nullptr;
  const float* bb = ln_b.has_value() ? ln_b->data_ptr<float>() : nullptr;
  const float* pp = proj.has_value() ? proj->data_ptr<float>() : nullptr;
  const float* tp = text.data_ptr<float>();
  float* lp = logits.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  const int64_t sb = h.stride(0), st = h.stride(1);
  constexpr int G = 4;  // rows per group: the projection and the classifier are read once per group
  const int64_t ldd = round_up(D, 16) + 16, lde = round_up(E, 16) + 16;
  at::parallel_for(0, (B + G - 1) / G, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> m(ldd), n(G * ldd), e(G * lde);
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t b0 = grp * G, rows = std::min<int64_t>(G, B - b0);
      for (int64_t r = 0; r < rows; ++r) {
        const char* row = hp + (b0 + r) * sb * es;
        if (cls) {
          for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 mk = tail_mask(D - d);
            _mm512_mask_storeu_ps(m.data() + d, mk, load_f(row + d * es, type, mk));
          }
        } else {
          patch_mean(row, type, T, D, st, m.data());
        }
        layernorm_row(m.data(), F32, D, w, bb, (float)eps, n.data() + r * ldd);
      }
      if (pp) {
        vec_matmul_rows(n.data(), ldd, rows, pp, D, E, e.data(), lde);
      } else {
        for (int64_t r = 0; r < rows; ++r) std::copy(n.begin() + r * ldd, n.begin() + r * ldd + D, e.begin() + r * lde);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* er = e.data() + r * lde;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t j = 0; j < E; j += 16) {
          const __m512 v = _mm512_maskz_loadu_ps(tail_mask(E - j), er + j);
          ss = _mm512_fmadd_ps(v, v, ss);
        }
        const float norm = std::max(std::sqrt(_mm512_reduce_add_ps(ss)), 1e-12f);
        for (int64_t j = 0; j < E; ++j) er[j] /= norm;
        std::copy(er, er + E, zp + (b0 + r) * E);
      }
      dot_rows(e.data(), lde, rows, tp, E, C, lp + b0 * C, C);  // the classifier's rows, read in place
      const __m512 vs = _mm512_set1_ps((float)logit_scale);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < C; c += 16) {
          const __mmask16 mk = tail_mask(C - c);
          float* o = lp + (b0 + r) * C + c;
          _mm512_mask_storeu_ps(o, mk, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, o), vs));
        }
    }
  });
  return {logits, z};
}

at::Tensor gate_features_op(const at::Tensor& logits_in, const at::Tensor& h) {
  TORCH_CHECK(h.dim() == 3 && h.stride(2) == 1 && h.size(1) >= 2, "gate_features: expected h[B, T >= 2, D]");
  const at::Tensor logits = logits_in.to(at::kFloat).contiguous();
  const int64_t B = h.size(0), T = h.size(1), D = h.size(2), C = logits.size(1);
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == B && C >= 1, "gate_features: expected logits[B, C >= 1]");
  const int type = ftype(h);
  const int es = elem_size(type);
  at::Tensor out = at::empty({B, 3}, at::TensorOptions().dtype(at::kFloat));
  const char* hp = (const char*)h.data_ptr();
  const float* lp = logits.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t sb = h.stride(0), st = h.stride(1);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> m(round_up(D, 16) + 16);
    for (int64_t b = b0; b < b1; ++b) {
      const float* l = lp + b * C;
      bool finite = true;
      int64_t top = 0;
      for (int64_t c = 0; c < C; ++c) {
        if (!std::isfinite(l[c])) finite = false;
        if (l[c] > l[top]) top = c;
      }
      float second = -INFINITY;
      for (int64_t c = 0; c < C; ++c)
        if (c != top && l[c] > second) second = l[c];
      double sum = 0.0;
      for (int64_t c = 0; c < C; ++c) sum += std::exp((double)l[c] - (double)l[top]);
      const float conf = (float)(1.0 / sum);
      const float margin = C >= 2 ? (float)((1.0 - std::exp((double)second - (double)l[top])) / sum) : 1.0f;
      // spatial variance: per channel, mean over patches, then mean squared deviation; mean over channels
      const char* row = hp + b * sb * es;
      patch_mean(row, type, T, D, st, m.data());
      __m512 acc_d = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 mk = tail_mask(D - d);
        const __m512 mean = _mm512_maskz_loadu_ps(mk, m.data() + d);
        __m512 s2 = _mm512_setzero_ps();
        for (int64_t t = 1; t < T; ++t) {
          const __m512 dv = _mm512_sub_ps(load_f(row + (t * st + d) * es, type, mk), mean);
          s2 = _mm512_fmadd_ps(dv, dv, s2);
        }
        acc_d = _mm512_add_ps(acc_d, _mm512_maskz_mov_ps(mk, _mm512_div_ps(s2, _mm512_set1_ps((float)(T - 1)))));
      }
      const float svar = _mm512_reduce_add_ps(acc_d) / (float)D;
      if (!finite || !std::isfinite(svar)) {
        op[b * 3] = op[b * 3 + 1] = op[b * 3 + 2] = NAN;
      } else {
        op[b * 3] = conf;
        op[b * 3 + 1] = margin;
        op[b * 3 + 2] = svar;
      }
    }
  });
  return out;
}

}  // namespace lra_cpu
