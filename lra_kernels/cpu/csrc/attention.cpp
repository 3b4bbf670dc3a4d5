#include "attention.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "common.h"
#include "gemm.h"

namespace lra_cpu {

namespace {

struct HeadScratch {
  std::vector<float> kt, v, q, s;
};

// In-register transpose of a 16 x 16 fp32 block: r[i] holds row i on entry, column i on exit.
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // u[4g + e], lane L: rows 4g..4g+3 of element 4L + e
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int e = 0; e < 4; ++e) {
    t[e] = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x88);
    t[4 + e] = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xDD);
    t[8 + e] = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x88);
    t[12 + e] = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xDD);
  }
  for (int e = 0; e < 4; ++e) {
    r[e] = _mm512_shuffle_f32x4(t[e], t[8 + e], 0x88);
    r[8 + e] = _mm512_shuffle_f32x4(t[e], t[8 + e], 0xDD);
    r[4 + e] = _mm512_shuffle_f32x4(t[4 + e], t[12 + e], 0x88);
    r[12 + e] = _mm512_shuffle_f32x4(t[4 + e], t[12 + e], 0xDD);
  }
}

// NR query rows i0.. of one head against the prepared K^T (kt[d][j]) and V (vv[j][c]): scores, softmax,
// P V, rows out[(i0 + r) * ldo + h * hd + d]. NR is a template argument so that the accumulators are
// named registers (an array indexed by a run-time row count lives on the stack: measured 3x slower).
template <int HV, int NR>
inline void attend_rows(const char* base, int type, int64_t ld, int64_t T, int64_t Tp, int64_t hd, int64_t h,
                        int64_t i0, const float* __restrict kt, const float* __restrict vv, float* __restrict qq,
                        float* __restrict ss, float scale, float* out, int64_t ldo, bool causal) {
  constexpr int HP = HV * 16;
  const int es = elem_size(type);
  // keys this group of rows reads: all T, or (causal) up to its last row; row r itself stops at i0 + r
  const int64_t Tg = causal ? i0 + NR : T;
  for (int r = 0; r < NR; ++r) {
    const char* row = base + (i0 + r) * ld * es;
    for (int c = 0; c < HV; ++c)
      _mm512_storeu_ps(qq + r * HP + c * 16, load_f(row + (h * hd + c * 16) * es, type, tail_mask(hd - c * 16)));
  }
  // scores: s[r][j] = (q_r . k_j) * scale, 64 keys at a time
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < Tg; j0 += 64) {
    __m512 acc[NR][4];
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t d = 0; d < hd; ++d) {
      const float* kp = kt + d * Tp + j0;
      const __m512 k0 = _mm512_loadu_ps(kp), k1 = _mm512_loadu_ps(kp + 16);
      const __m512 k2 = _mm512_loadu_ps(kp + 32), k3 = _mm512_loadu_ps(kp + 48);
      for (int r = 0; r < NR; ++r) {
        const __m512 qv = _mm512_set1_ps(qq[r * HP + d]);
        acc[r][0] = _mm512_fmadd_ps(qv, k0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(qv, k1, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(qv, k2, acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(qv, k3, acc[r][3]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(ss + r * Tp + j0 + c * 16, _mm512_mul_ps(acc[r][c], vs));
  }
  // softmax numerators and sums; the division is applied to the output row
  float inv_sum[NR];
  for (int r = 0; r < NR; ++r) {
    float* s = ss + r * Tp;
    const int64_t Tr = causal ? i0 + r + 1 : T;  // keys of this row; p = 0 for Tr <= j < Tg
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < Tr; j += 16) mx = _mm512_mask_max_ps(mx, tail_mask(Tr - j), mx, _mm512_loadu_ps(s + j));
    const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < Tr; j += 16) {
      const __mmask16 mk = tail_mask(Tr - j);
      const __m512 p = _mm512_maskz_mov_ps(mk, Sleef_expf16_u10(_mm512_sub_ps(_mm512_loadu_ps(s + j), vmax)));
      _mm512_storeu_ps(s + j, p);
      sum = _mm512_add_ps(sum, p);
    }
    inv_sum[r] = 1.0f / _mm512_reduce_add_ps(sum);
    for (int64_t j = Tr; j < Tg; ++j) s[j] = 0.0f;
  }
  // out_r = sum_j p[r][j] v_j / sum_r
  __m512 o[NR][HV];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < HV; ++c) o[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < Tg; ++j) {
    __m512 v[HV];
    for (int c = 0; c < HV; ++c) v[c] = _mm512_loadu_ps(vv + j * HP + c * 16);
    for (int r = 0; r < NR; ++r) {
      const __m512 p = _mm512_set1_ps(ss[r * Tp + j]);
      for (int c = 0; c < HV; ++c) o[r][c] = _mm512_fmadd_ps(p, v[c], o[r][c]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    const __m512 is = _mm512_set1_ps(inv_sum[r]);
    for (int c = 0; c < HV; ++c)
      _mm512_mask_storeu_ps(out + (i0 + r) * ldo + h * hd + c * 16, tail_mask(hd - c * 16), _mm512_mul_ps(o[r][c], is));
  }
}

// One (batch element, head): rows out[t * ldo + d] (fp32) for t < T, d < hd.
template <int HV>
void head_attention(const char* base, int type, int64_t ld, int64_t T, int64_t D, int64_t hd, int64_t h, float* out,
                    int64_t ldo, bool causal, HeadScratch& sc) {
  constexpr int R = HV >= 4 ? std::max(1, 16 / HV) : 4;  // query rows per group: R x 4 score accumulators
  constexpr int HP = HV * 16;
  const int es = elem_size(type);
  const int64_t Tp = round_up(T, 64);
  sc.kt.resize(HP * Tp);
  sc.v.resize(T * HP);
  sc.q.resize(R * HP);
  sc.s.resize(R * Tp);
  const float scale = 1.0f / std::sqrt((float)hd);
  float* __restrict kt = sc.kt.data();
  float* __restrict vv = sc.v.data();
  // V rows as fp32; K transposed (kt[d][j], keys past T zero) with 16 x 16 in-register transposes
  for (int64_t j = 0; j < T; ++j) {
    const char* row = base + j * ld * es;
    for (int c = 0; c < HV; ++c)
      _mm512_storeu_ps(vv + j * HP + c * 16, load_f(row + (2 * D + h * hd + c * 16) * es, type, tail_mask(hd - c * 16)));
  }
  for (int64_t j0 = 0; j0 < Tp; j0 += 16) {
    for (int c = 0; c < HV; ++c) {
      __m512 blk[16];
      const __mmask16 mk = tail_mask(hd - c * 16);
      for (int i = 0; i < 16; ++i)
        blk[i] = j0 + i < T ? load_f(base + ((j0 + i) * ld + D + h * hd + c * 16) * es, type, mk) : _mm512_setzero_ps();
      transpose16(blk);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(kt + (c * 16 + i) * Tp + j0, blk[i]);
    }
  }
  int64_t i0 = 0;
  for (; i0 + R <= T; i0 += R)
    attend_rows<HV, R>(base, type, ld, T, Tp, hd, h, i0, kt, vv, sc.q.data(), sc.s.data(), scale, out, ldo, causal);
  switch (T - i0) {  // the last rows (fewer than R)
    case 1:
      attend_rows<HV, 1>(base, type, ld, T, Tp, hd, h, i0, kt, vv, sc.q.data(), sc.s.data(), scale, out, ldo, causal);
      break;
    case 2:
      if constexpr (R > 2)
        attend_rows<HV, 2>(base, type, ld, T, Tp, hd, h, i0, kt, vv, sc.q.data(), sc.s.data(), scale, out, ldo, causal);
      break;
    case 3:
      if constexpr (R > 3)
        attend_rows<HV, 3>(base, type, ld, T, Tp, hd, h, i0, kt, vv, sc.q.data(), sc.s.data(), scale, out, ldo, causal);
      break;
    default:
      break;
  }
}

using HeadFn = void (*)(const char*, int, int64_t, int64_t, int64_t, int64_t, int64_t, float*, int64_t, bool,
                       HeadScratch&);
constexpr HeadFn kHeads[9] = {nullptr,         head_attention<1>, head_attention<2>, head_attention<3>, head_attention<4>,
                              head_attention<5>, head_attention<6>, head_attention<7>, head_attention<8>};

int type_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return F32;
    case at::kBFloat16:
      return BF16;
    case at::kHalf:
      return F16;
    default:
      TORCH_CHECK(false, "attention: expected float32/bfloat16/float16, got ", t.scalar_type());
  }
}

// The qkv rows of one batch element, pulled into L2 ahead of use: the heads read them as 3 x 12 strided
// column strips, which the hardware prefetcher does not follow (half of the time went to those misses).
void prefetch_rows(const char* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
}

void store_row(const float* src, int64_t D, void* dst, int type) {
  const int es = elem_size(type);
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 mk = tail_mask(D - d);
    store_f((char*)dst + d * es, type, _mm512_maskz_loadu_ps(mk, src + d), mk);
  }
}

}  // namespace

std::vector<at::Tensor> attention_op(const at::Tensor& qkv, int64_t B, int64_t T, int64_t heads, int64_t kind,
                                     at::ScalarType out_dtype, double static_scale, bool causal) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(0) == B * T && qkv.size(1) % 3 == 0,
              "attention: expected qkv[B * T, 3D] with contiguous rows, got ", qkv.sizes());
  const int64_t D = qkv.size(1) / 3, M = B * T;
  TORCH_CHECK(heads > 0 && D % heads == 0, "attention: width ", D, " is not divisible by ", heads, " heads");
  const int64_t hd = D / heads;
  TORCH_CHECK(hd <= 128, "attention: head dimensions above 128 are not supported, got ", hd);
  const int HV = (int)((hd + 15) / 16);
  const HeadFn head = kHeads[HV];
  const int type = type_of(qkv);
  const int64_t ld = qkv.stride(0);
  const char* base = (const char*)qkv.data_ptr();
  const int es = elem_size(type);
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  std::vector<at::Tensor> outs;
  TORCH_CHECK(kind == OUT_FLOAT || kind == OUT_QUANT, "attention: unknown output kind ", kind);
  at::Tensor out, codes, scale;
  int ot = F32;
  if (kind == OUT_FLOAT) {
    out = at::empty({M, D}, at::TensorOptions().dtype(out_dtype));
    ot = type_of(out);
  } else {
    codes = alloc_codes(M, D);
    scale = at::empty({M}, at::TensorOptions().dtype(at::kFloat));
  }
  char* op = kind == OUT_FLOAT ? (char*)out.data_ptr() : nullptr;
  uint8_t* q = kind == OUT_QUANT ? codes.data_ptr<uint8_t>() : nullptr;
  float* sp = kind == OUT_QUANT ? scale.data_ptr<float>() : nullptr;
  const int64_t Kp = kind == OUT_QUANT ? codes.size(1) : 0;
  const float ss = (float)static_scale;
  auto finish = [&](int64_t m, const float* row) {
    if (kind == OUT_FLOAT)
      store_row(row, D, op + m * D * elem_size(ot), ot);
    else
      sp[m] = quantize_row(row, D, Kp, q + m * Kp, ss);
  };
  if (B >= nth) {  // a whole batch element per task: its rows are finished while in cache
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      static thread_local HeadScratch sc;  // grows to the largest head seen, then reused
      float* const rows = thread_scratch<float>(SCRATCH_ROWS, T * D + 16);
      const int64_t block_bytes = T * ld * es;
      prefetch_rows(base + b0 * block_bytes, block_bytes);
      for (int64_t b = b0; b < b1; ++b) {
        if (b + 1 < b1) prefetch_rows(base + (b + 1) * block_bytes, block_bytes);
        for (int64_t h = 0; h < heads; ++h)
          head(base + b * T * ld * es, type, ld, T, D, hd, h, rows, D, causal, sc);
        for (int64_t t = 0; t < T; ++t) finish(b * T + t, rows + t * D);
      }
    });
  } else {  // fewer batch elements than threads: heads in parallel, then the rows (same arithmetic)
    float* const rows = thread_scratch<float>(SCRATCH_ROWS, M * D + 16);  // every column written by its head
    prefetch_rows(base, M * ld * es);
    at::parallel_for(0, B * heads, 1, [&](int64_t i0, int64_t i1) {
      static thread_local HeadScratch sc;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / heads, h = i % heads;
        head(base + b * T * ld * es, type, ld, T, D, hd, h, rows + b * T * D, D, causal, sc);
      }
    });
    at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) finish(m, rows + m * D);
    });
  }
  if (kind == OUT_FLOAT) {
    outs.push_back(out);
    return outs;
  }
  outs.push_back(codes);
  outs.push_back(scale);
  return outs;
}

}  // namespace lra_cpu
