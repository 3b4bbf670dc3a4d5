// Shared pieces of the CPU kernels: data formats, AVX-512 helpers, the quantizer and the activations.
//
// Formats (see lra_kernels/cpu/__init__.py):
//   activation codes  uint8 [Mp, Kp]: q + 128 (q the symmetric int8 code), Kp = round_up(K, 64),
//                     Mp = round_up(M, 32); padding holds 128 (code 0).
//   packed weight     int8 [Np / 64][Kp / 4][64][4]: for each 64-column panel, groups of 4
//                     consecutive k of each column (one 512-bit VNNI operand, one AMX B-tile row);
//                     zero padded. colsum[n] = sum_k w[n, k] (int32) undoes the +128 of the codes.
//
// Numerics follow lra_kernels.quant and kernels/int8_gemm.py (the torch references): the dequant
// epilogue is (acc * x_scale) * w_scale + bias in separate fp32 roundings (built with
// -ffp-contract=off), codes are round-half-even (cvtps2dq under the default MXCSR), a row holding
// NaN/Inf gets a NaN/Inf scale and zero codes. The activations agree with F.gelu & co. to a few
// ulp (GELU's erf is a rational fit, exp is Sleef's from libtorch_cpu).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

namespace lra_cpu {

constexpr int QMAX = 127;
constexpr float AMAX_FLOOR = 1e-12f;
constexpr int KALIGN = 64;   // K padding of codes and packed weights
constexpr int NPANEL = 64;   // columns per packed panel
constexpr int MALIGN = 32;   // row padding of code buffers (AMX tiles read 16-row blocks)

enum Act : int { ACT_NONE = 0, ACT_GELU = 1, ACT_GELU_TANH = 2, ACT_QUICK_GELU = 3 };
enum FloatType : int { F32 = 0, BF16 = 1, F16 = 2 };

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Scratch memory of the calling thread: at least n elements of T starting on a cache line, kept and
// reused by the thread's later calls (grown when too small, never shrunk), not zeroed: callers write
// what they read. Why not a fresh buffer per call: at batch 1 a ViT-B GEMM takes ~100 us, and
// allocating and zeroing its 0.6 MB int32 scratch each time cost a third of that. Why aligned:
// std::vector's storage is 16-byte aligned, and AMX tile stores of 64-byte rows into it split every
// row over two lines (measured on an AMX Xeon core: the GEMM ran at 1.0 instead of 1.5 TOPS).
// ``slot`` keeps one caller's buffers apart (a buffer stays valid until the same thread asks for the
// same slot again).
enum ScratchSlot : int { SCRATCH_ACC = 0, SCRATCH_ROW = 1, SCRATCH_LN = 2, SCRATCH_ROWS = 3, SCRATCH_SLOTS = 4 };

template <class T>
T* thread_scratch(ScratchSlot slot, int64_t n) {
  struct Buffer {
    void* p = nullptr;
    size_t bytes = 0;
    ~Buffer() { std::free(p); }
  };
  static thread_local Buffer buffers[SCRATCH_SLOTS];
  Buffer& b = buffers[slot];
  const size_t need = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * static_cast<int64_t>(sizeof(T)), 64));
  if (b.bytes < need) {
    std::free(b.p);
    b.p = std::aligned_alloc(64, need);
    b.bytes = b.p ? need : 0;
    if (!b.p) throw std::bad_alloc();
  }
  return static_cast<T*>(b.p);
}

}  // namespace lra_cpu

extern "C" __m512 Sleef_expf16_u10(__m512);

namespace lra_cpu {

// ------------------------------------------------------------------ loads and stores of float rows
inline __m512 load_f(const void* p, int type, __mmask16 m) {
  if (type == F32) return _mm512_maskz_loadu_ps(m, p);
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  if (type == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

inline __m256i f32_to_bf16(__m512 v) {
  // Round to nearest even; NaN -> quiet NaN (0x7fc0), as c10::BFloat16.
  __m512i b = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb);
  r = _mm512_srli_epi32(r, 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

inline void store_f(void* p, int type, __m512 v, __mmask16 m) {
  if (type == F32) {
    _mm512_mask_storeu_ps(p, m, v);
  } else if (type == BF16) {
    _mm256_mask_storeu_epi16(p, m, f32_to_bf16(v));
  } else {
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

inline int elem_size(int type) { return type == F32 ? 4 : 2; }

// v rounded to what storing it as ``type`` keeps (bf16 / fp16), back in fp32.
inline __m512 round_to(__m512 v, int type) {
  if (type == F32) return v;
  if (type == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(f32_to_bf16(v)), 16));
  return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << remaining) - 1u);
}

// ------------------------------------------------------------------ activations (fp32 vectors)
// 1 / q to ~23 bits: the 14-bit estimate and one Newton step (a division costs 3-5x more).
inline __m512 reciprocal(__m512 q) {
  const __m512 r = _mm512_rcp14_ps(q);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.0f)));
}

// erf(x) = x P(x^2) / Q(x^2) on |x| <= 4 (a rational fit, max abs error 3.4e-7 in fp32), +-1 beyond
// (erfc(4) = 1.5e-8). No exponential: GELU after the c_fc GEMM costs a fraction of ATen's form.
inline __m512 erf_fast(__m512 x) {
  const __m512 ax = _mm512_min_ps(_mm512_abs_ps(x), _mm512_set1_ps(4.0f));
  const __m512 t = _mm512_mul_ps(ax, ax);
  __m512 p = _mm512_set1_ps(1.9746773887163727e-06f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.00028807282797060907f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.004004884045571089f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.05347141623497009f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.19627736508846283f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.128378987312317f));
  __m512 q = _mm512_set1_ps(3.748088056454435e-05f);
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.00121666444465518f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.015446937642991543f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.11648831516504288f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.5072774291038513f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.0f));
  __m512 e = _mm512_min_ps(_mm512_mul_ps(_mm512_mul_ps(ax, p), reciprocal(q)), _mm512_set1_ps(1.0f));
  return _mm512_or_ps(e, _mm512_and_ps(x, _mm512_set1_ps(-0.f)));  // the sign of x
}

inline __m512 activation(__m512 y, int act) {
  if (act == ACT_GELU) {  // 0.5 y (1 + erf(y / sqrt 2))
    const __m512 e = erf_fast(_mm512_mul_ps(y, _mm512_set1_ps(0.70710678118654752440f)));
    return _mm512_mul_ps(_mm512_mul_ps(y, _mm512_set1_ps(0.5f)), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  }
  if (act == ACT_GELU_TANH) {
    // y * sigmoid(2u), u = sqrt(2/pi) (y + 0.044715 y^3): the tanh form without a tanh
    const __m512 y3 = _mm512_mul_ps(_mm512_mul_ps(y, y), y);
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                   _mm512_add_ps(y, _mm512_mul_ps(_mm512_set1_ps(0.044715f), y3)));
    const __m512 e = Sleef_expf16_u10(_mm512_mul_ps(_mm512_set1_ps(-2.0f), u));
    return _mm512_div_ps(y, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  }
  if (act == ACT_QUICK_GELU) {  // y * sigmoid(1.702 y)
    const __m512 e = Sleef_expf16_u10(_mm512_mul_ps(_mm512_set1_ps(-1.702f), y));
    return _mm512_div_ps(y, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  }
  return y;
}

// ------------------------------------------------------------------ the quantizer
// Codes of one fp32 value vector: clamp(round(v), -127, 127) + 128 as uint8 lanes; NaN -> 128.
inline __m128i codes_u8(__m512 v) {
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
  __m512i q = _mm512_cvtps_epi32(v);  // round half to even (MXCSR default)
  q = _mm512_maskz_mov_epi32((__mmask16)~nan, q);
  q = _mm512_add_epi32(q, _mm512_set1_epi32(128));
  return _mm512_cvtepi32_epi8(q);
}

// Row statistics for the per-token quantizer: max |h| over the row, NaN when the row holds NaN.
struct RowAmax {
  __m512 amax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  inline void add(__m512 h, __mmask16 m) {
    nan |= _mm512_mask_cmp_ps_mask(m, h, h, _CMP_UNORD_Q);
    amax = _mm512_mask_max_ps(amax, m, amax, _mm512_abs_ps(h));
  }
  inline float value() const {
    if (nan) return NAN;
    return _mm512_reduce_max_ps(amax);  // +Inf survives max
  }
};

// Quantize one fp32 row h[0..K) into codes out[0..Kp) (padding 128) with the per-token scale
// (static_scale <= 0) or a calibrated scale. Returns the row's scale.
inline float quantize_row(const float* h, int64_t K, int64_t Kp, uint8_t* out, float static_scale) {
  float scale, inv;
  if (static_scale > 0.f) {
    inv = 1.0f / static_scale;
    bool finite = true;
    for (int64_t k = 0; k < K; k += 16) {
      __mmask16 m = tail_mask(K - k);
      __m512 v = _mm512_maskz_loadu_ps(m, h + k);
      // finite <=> |v| < inf (false for NaN and +-Inf)
      __mmask16 ok = _mm512_mask_cmp_ps_mask(m, _mm512_abs_ps(v), _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
      if (ok != m) finite = false;
    }
    scale = finite ? static_scale : NAN;
  } else {
    RowAmax st;
    for (int64_t k = 0; k < K; k += 16) {
      __mmask16 m = tail_mask(K - k);
      st.add(_mm512_maskz_loadu_ps(m, h + k), m);
    }
    float amax = st.value();
    if (amax < AMAX_FLOOR) amax = AMAX_FLOOR;  // NaN < floor is false: NaN stays
    inv = (1.0f / amax) * (float)QMAX;          // torch: 127 / amax == reciprocal(amax) * 127
    scale = amax / (float)QMAX;
  }
  const __m512 vinv = _mm512_set1_ps(inv);
  int64_t k = 0;
  for (; k < K; k += 16) {
    __mmask16 m = tail_mask(K - k);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, h + k), vinv);
    _mm_mask_storeu_epi8(out + k, m, codes_u8(v));
  }
  if (Kp > K) std::memset(out + K, 128, (size_t)(Kp - K));
  return scale;
}

// LayerNorm of one row x[0..K) (any float type) into h (fp32): fixed summation order, so a row's
// result never depends on the rest of the batch.
inline void layernorm_row(const void* x, int type, int64_t K, const float* w, const float* b, float eps, float* h) {
  const char* xp = (const char*)x;
  const int es = elem_size(type);
  __m512 s = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __mmask16 m = tail_mask(K - k);
    __m512 v = load_f(xp + k * es, type, m);
    _mm512_storeu_ps(h + k, v);  // h has room for round_up(K, 16)
    s = _mm512_add_ps(s, v);
  }
  const float mean = _mm512_reduce_add_ps(s) / (float)K;
  const __m512 vmean = _mm512_set1_ps(mean);
  __m512 s2 = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __mmask16 m = tail_mask(K - k);
    __m512 d = _mm512_maskz_sub_ps(m, _mm512_loadu_ps(h + k), vmean);
    s2 = _mm512_fmadd_ps(d, d, s2);
  }
  const float var = _mm512_reduce_add_ps(s2) / (float)K;
  const float rstd = 1.0f / std::sqrt(var + eps);
  const __m512 vrstd = _mm512_set1_ps(rstd);
  for (int64_t k = 0; k < K; k += 16) {
    __mmask16 m = tail_mask(K - k);
    __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(h + k), vmean), vrstd);
    if (w) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + k));
    if (b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, b + k));
    _mm512_mask_storeu_ps(h + k, m, v);
  }
}

}  // namespace lra_cpu
