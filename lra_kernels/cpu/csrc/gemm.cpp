#include "gemm.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>

#include "common.h"

#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
#define LRA_HAVE_AMX 1
#else
#define LRA_HAVE_AMX 0
#endif

namespace lra_cpu {

static std::atomic<bool> g_use_amx{false};


bool amx_compiled() { return LRA_HAVE_AMX; }

bool amx_request_permission() {
#if LRA_HAVE_AMX
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023;
  constexpr long XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
  return false;
#endif
}

void use_amx(bool on) { g_use_amx = on && LRA_HAVE_AMX; }
bool amx_in_use() { return g_use_amx; }

// ------------------------------------------------------------------ packing
void pack_weight(const int8_t* w, int64_t N, int64_t K, int8_t* packed, int32_t* colsum) {
  const int64_t Kp = round_up(K, KALIGN), Np = round_up(N, NPANEL), KQ = Kp / 4;
  at::parallel_for(0, Np / NPANEL, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int8_t* dst = packed + p * KQ * 256;
      for (int64_t c = 0; c < NPANEL; ++c) {
        const int64_t n = p * NPANEL + c;
        int32_t s = 0;
        for (int64_t k = 0; k < Kp; ++k) {
          const int8_t v = (n < N && k < K) ? w[n * K + k] : 0;
          dst[((k / 4) * NPANEL + c) * 4 + (k % 4)] = v;
          s += v;
        }
        colsum[n] = s;
      }
    }
  });
}

// ------------------------------------------------------------------ micro-kernels
// acc[r][0..64) = sum over the panel's K of codes(row r) . weights(column): raw u8 x s8 sums.
// Written with one named accumulator per register (GCC keeps an array of vectors on the stack).
#define LRA_ROW_DECL(r)                                                                 \
  __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = c##r##0, c##r##2 = c##r##0, c##r##3 = c##r##0; \
  if (ACCUM && MR > r) {                                                                \
    c##r##0 = _mm512_loadu_si512(acc + r * ldc);                                        \
    c##r##1 = _mm512_loadu_si512(acc + r * ldc + 16);                                   \
    c##r##2 = _mm512_loadu_si512(acc + r * ldc + 32);                                   \
    c##r##3 = _mm512_loadu_si512(acc + r * ldc + 48);                                   \
  }
#define LRA_ROW_FMA(r)                                                   \
  if (MR > r) {                                                          \
    const __m512i a = _mm512_set1_epi32(*(const int32_t*)(A + r * lda + 4 * kk)); \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, a, b0);                       \
    c##r##1 = _mm512_dpbusd_epi32(c##r##1, a, b1);                       \
    c##r##2 = _mm512_dpbusd_epi32(c##r##2, a, b2);                       \
    c##r##3 = _mm512_dpbusd_epi32(c##r##3, a, b3);                       \
  }
#define LRA_ROW_STORE(r)                                  \
  if (MR > r) {                                           \
    _mm512_storeu_si512(acc + r * ldc + 0, c##r##0);      \
    _mm512_storeu_si512(acc + r * ldc + 16, c##r##1);     \
    _mm512_storeu_si512(acc + r * ldc + 32, c##r##2);     \
    _mm512_storeu_si512(acc + r * ldc + 48, c##r##3);     \
  }

template <int MR, bool ACCUM>
static void ukernel_vnni(const uint8_t* __restrict A, int64_t lda, const int8_t* __restrict B, int64_t KQ,
                         int32_t* __restrict acc, int64_t ldc) {
  LRA_ROW_DECL(0) LRA_ROW_DECL(1) LRA_ROW_DECL(2) LRA_ROW_DECL(3) LRA_ROW_DECL(4) LRA_ROW_DECL(5)
  for (int64_t kk = 0; kk < KQ; ++kk) {
    const int8_t* bp = B + kk * 256;
    const __m512i b0 = _mm512_loadu_si512(bp), b1 = _mm512_loadu_si512(bp + 64);
    const __m512i b2 = _mm512_loadu_si512(bp + 128), b3 = _mm512_loadu_si512(bp + 192);
    LRA_ROW_FMA(0) LRA_ROW_FMA(1) LRA_ROW_FMA(2) LRA_ROW_FMA(3) LRA_ROW_FMA(4) LRA_ROW_FMA(5)
  }
  LRA_ROW_STORE(0) LRA_ROW_STORE(1) LRA_ROW_STORE(2) LRA_ROW_STORE(3) LRA_ROW_STORE(4) LRA_ROW_STORE(5)
}
#undef LRA_ROW_DECL
#undef LRA_ROW_FMA
#undef LRA_ROW_STORE

using UKernel = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int32_t*, int64_t);
// [accumulate][rows]
static const UKernel kVnni[2][7] = {
    {nullptr, ukernel_vnni<1, false>, ukernel_vnni<2, false>, ukernel_vnni<3, false>, ukernel_vnni<4, false>,
     ukernel_vnni<5, false>, ukernel_vnni<6, false>},
    {nullptr, ukernel_vnni<1, true>, ukernel_vnni<2, true>, ukernel_vnni<3, true>, ukernel_vnni<4, true>,
     ukernel_vnni<5, true>, ukernel_vnni<6, true>}};
// K per pass of the VNNI kernel: a 384 x 64 slice of a weight panel (24 KiB) stays in L1 while every
// micro-tile of the row block uses it.
constexpr int64_t KCHUNK = 384;
constexpr int VNNI_MR = 6;

#if LRA_HAVE_AMX
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

static inline void amx_configure() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// 32 rows x 64 columns: two passes of 32 x 32 (2 A tiles, 2 B tiles, 4 accumulators each).
static inline void ukernel_amx(const uint8_t* A, int64_t lda, const int8_t* B, int64_t Kp, int32_t* acc,
                               int64_t ldc) {
  for (int half = 0; half < 2; ++half) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k0 = 0; k0 < Kp; k0 += 64) {
      const int8_t* bp = B + (k0 / 4) * 256 + half * 128;
      _tile_loadd(4, A + k0, lda);
      _tile_loadd(5, A + 16 * lda + k0, lda);
      _tile_loadd(6, bp, 256);
      _tile_loadd(7, bp + 64, 256);
      _tile_dpbusd(0, 4, 6);
      _tile_dpbusd(1, 4, 7);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
    }
    int32_t* c = acc + half * 32;
    const int64_t stride = ldc * 4;
    _tile_stored(0, c, stride);
    _tile_stored(1, c + 16, stride);
    _tile_stored(2, c + 16 * ldc, stride);
    _tile_stored(3, c + 16 * ldc + 16, stride);
  }
}
#endif

// ------------------------------------------------------------------ epilogue
// One output row: acc[0..Np) raw sums -> the kind's outputs. Rows are processed left to right, so the
// residual and the outputs stream sequentially; row-wise post-processing (LayerNorm, quantization)
// sees the whole row in ``row`` (fp32, L1-resident).
static inline void epilogue_row(const GemmArgs& g, const int32_t* acc, int64_t m, float* row, float* lnbuf) {
  const int es_out = elem_size(g.out_type), es_res = elem_size(g.res_type);
  const __m512 xs = _mm512_set1_ps(g.a_scale[m]);
  const char* res = g.residual ? (const char*)g.residual + m * g.ld_res * es_res : nullptr;
  char* out = g.out ? (char*)g.out + m * g.ld_out * (g.kind == OUT_ACC ? 4 : es_out) : nullptr;
  const int64_t N = g.N;
  for (int64_t n = 0; n < N; n += 16) {
    const __mmask16 mk = tail_mask(N - n);
    __m512i a = _mm512_loadu_si512(acc + n);
    a = _mm512_sub_epi32(a, _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mk, g.colsum + n), 7));
    if (g.kind == OUT_ACC) {
      _mm512_mask_storeu_epi32(out + n * 4, mk, a);
      continue;
    }
    __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a), xs), _mm512_maskz_loadu_ps(mk, g.w_scale + n));
    if (g.bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mk, g.bias + n));
    y = activation(y, g.act);
    if (res) y = _mm512_add_ps(y, load_f(res + n * es_res, g.res_type, mk));
    if (g.kind == OUT_QUANT) {
      if (g.smooth) y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(mk, g.smooth + n));
      _mm512_storeu_ps(row + n, y);
      continue;
    }
    store_f(out + n * es_out, g.out_type, y, mk);
    if (g.kind == OUT_FLOAT_LNQ)  // the row as stored (rounded to the activation dtype) is what gets normalised
      _mm512_storeu_ps(row + n, round_to(y, g.out_type));
  }
  if (g.kind == OUT_FLOAT_LNQ) {
    layernorm_row(row, F32, N, g.ln_w, g.ln_b, g.eps, lnbuf);
    g.q_scale[m] = quantize_row(lnbuf, N, g.ldq, g.q_out + m * g.ldq, g.static_scale);
  } else if (g.kind == OUT_QUANT) {
    g.q_scale[m] = quantize_row(row, N, g.ldq, g.q_out + m * g.ldq, g.static_scale);
  }
}

// ------------------------------------------------------------------ drivers
// No result depends on the blocking or the thread count: the sums are exact integers and the epilogue
// is per row, so both drivers give the same bits.

#if LRA_HAVE_AMX
// AMX: the threads split the columns, not the rows. An AMX Xeon core feeds its tiles from L2 at
// ~160 GB/s but from L3 at ~30: with rows split, every thread streams every weight from L3 for each
// block of rows (1.0-1.5 TOPS per core at ViT-B shapes); with columns split, a thread's share of the
// weights (<= 1.2 MiB for ViT-B) stays in its L2 across all row blocks (~3 TOPS per core). Rows go in
// blocks of AMX_MB: every thread computes its panels of the block into a shared int32 scratch, all meet
// at a barrier, then each runs the epilogue of a share of the block's rows (which needs whole rows:
// LayerNorm, per-token quantization) while the others start the next block in the other scratch.
constexpr int64_t AMX_MB = 32;  // 64 and 128 measured slower (fewer barriers, but the scratch crowds L2)

static void gemm_amx(const GemmArgs& g) {
  const int64_t KQ = g.Kp / 4, panels = (g.N + NPANEL - 1) / NPANEL, Np = panels * NPANEL;
  const int64_t ldc = Np + 16;  // rows of the scratch 64 bytes apart from a multiple of 4 KiB
  const int64_t nblocks = (g.M + AMX_MB - 1) / AMX_MB;
  int64_t nth = std::min<int64_t>(std::max(1, at::get_num_threads()), panels);
  if (omp_in_parallel()) nth = 1;
  int32_t* const acc = thread_scratch<int32_t>(SCRATCH_ACC, 2 * AMX_MB * ldc);  // shared by the team: 2 blocks
#pragma omp parallel num_threads(nth)
  {
    const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t p0 = tid * panels / team, p1 = (tid + 1) * panels / team;
    float* const row = thread_scratch<float>(SCRATCH_ROW, Np + 16);
    float* const lnbuf = thread_scratch<float>(SCRATCH_LN, Np + 16);
    amx_configure();
    for (int64_t blk = 0; blk <= nblocks; ++blk) {
      if (blk < nblocks) {  // this thread's panels of block blk
        const int64_t r0 = blk * AMX_MB;
        int32_t* c = acc + (blk & 1) * AMX_MB * ldc;
        for (int64_t p = p0; p < p1; ++p)
          ukernel_amx(g.a + r0 * g.lda, g.lda, g.packed + p * KQ * 256, g.Kp, c + p * NPANEL, ldc);
      }
      if (blk > 0) {  // a share of the rows of block blk - 1, complete since the last barrier
        const int64_t r0 = (blk - 1) * AMX_MB, rows = std::min<int64_t>(AMX_MB, g.M - r0);
        const int32_t* c = acc + ((blk - 1) & 1) * AMX_MB * ldc;
        for (int64_t i = tid * rows / team; i < (tid + 1) * rows / team; ++i)
          epilogue_row(g, c + i * ldc, r0 + i, row, lnbuf);
      }
#pragma omp barrier
    }
    _tile_release();
  }
}
#endif

// VNNI: each thread takes blocks of whole rows. Per block: the raw sums of every 64-column panel into an
// int32 scratch (a panel of weights is reused by all the block's micro-tiles), then the epilogue row
// by row.
void gemm(const GemmArgs& g) {
  if (g.M == 0 || g.N == 0) return;
#if LRA_HAVE_AMX
  if (g_use_amx.load()) return gemm_amx(g);
#endif
  const int64_t KQ = g.Kp / 4, panels = (g.N + NPANEL - 1) / NPANEL, Np = panels * NPANEL;
  const int64_t quantum = VNNI_MR;
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  // rows per block: the int32 scratch stays within ~384 KiB of L2
  const int64_t mb_max = std::max<int64_t>(quantum, (98304 / Np) / quantum * quantum);
  int64_t nblocks = (g.M + mb_max - 1) / mb_max;
  nblocks = std::min<int64_t>(round_up(nblocks, nth), (g.M + 7) / 8);  // even work, at least 8 rows each
  nblocks = std::max<int64_t>(nblocks, 1);
  const int64_t mb = round_up((g.M + nblocks - 1) / nblocks, quantum);
  nblocks = (g.M + mb - 1) / mb;

  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    int32_t* const acc = thread_scratch<int32_t>(SCRATCH_ACC, mb * Np);
    float* const row = thread_scratch<float>(SCRATCH_ROW, Np + 16);
    float* const lnbuf = thread_scratch<float>(SCRATCH_LN, Np + 16);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * mb, m1 = std::min(g.M, m0 + mb);
      for (int64_t p = 0; p < panels; ++p) {
        const int8_t* B = g.packed + p * KQ * 256;
        int32_t* c = acc + p * NPANEL;
        for (int64_t k0 = 0; k0 < g.Kp; k0 += KCHUNK) {
          const int64_t kq = std::min<int64_t>(KCHUNK, g.Kp - k0) / 4;
          for (int64_t r0 = m0; r0 < m1; r0 += VNNI_MR) {
            const int mr = (int)std::min<int64_t>(VNNI_MR, m1 - r0);
            kVnni[k0 > 0][mr](g.a + r0 * g.lda + k0, g.lda, B + (k0 / 4) * 256, kq, c + (r0 - m0) * Np, Np);
          }
        }
      }
      for (int64_t m = m0; m < m1; ++m) epilogue_row(g, acc + (m - m0) * Np, m, row, lnbuf);
    }
  });
}

}  // namespace lra_cpu
