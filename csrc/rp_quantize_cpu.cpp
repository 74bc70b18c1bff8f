// CPU kernels of random-projection quantization and nearest-codeword assignment.
//
// One call, one parallel loop over three kinds of items, in this order:
//   1. row blocks: load the stacked rows (straight from the (B, T, F) input, no stacked
//      copy), LayerNorm, project on every head at once, unit-normalise (cosine);
//   2. per head, codebook chunks: convert to fp32, fold the score coefficients in, and lay
//      the codewords out as panels of kGroup codewords transposed to (d, kGroup);
//   3. per head, (head, row block) scoring: the block's rows against the head's panels in
//      L1-sized tiles, a register-blocked micro-kernel of kRows rows x kGroup codewords, a
//      running best per row and vector lane. The (rows, V) score matrix never exists.
// Later items wait (yielding) for the earlier ones they read; there is no barrier.
//
// Exactness across instruction sets. The projection and the scores are the only
// multiply-adds written per ISA (cpu_isa.h: AVX-512, AVX2+FMA, scalar), and each value is
// one chain of correctly rounded fused multiply-adds in a fixed order:
//     y[r][c]   = fma(x[r][F*k-1], P[F*k-1][c], ... fma(x[r][0], P[0][c], 0))
//     score_v   = fma(y[d-1], c'_v[d-1], ... fma(y[0], c'_v[0], b_v))
// with the coefficients of codeword_coeffs() folded into the panels: cosine c'_v =
// c_v / max(|c_v|, eps) (F.normalize's division), b_v = 0; l2 c'_v = 2 c_v (exact), b_v =
// -|c_v|^2, so score = 2 y.c - |c|^2. The SIMD paths use the hardware FMA; the scalar
// path (the SSE2 baseline has none) emulates it exactly (fma_exact below). Everything else
// (loading, LayerNorm, norms, the panels) is baseline code shared by every path. So every
// path computes the same fp32 score bits for every (row, codeword), and the label rule
// (highest score, ties to the lowest index, NaN never wins, label 0 when no score beats
// -inf) gives the same index on every path.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "rp_quantize.h"
#include "sslfast/bind.h"
#include "sslfast/cpu_isa.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace sslfast {
namespace rpq {
namespace {

constexpr int64_t kGroup = 64;        // codewords per panel (4 AVX-512 / 8 AVX2 vectors)
constexpr int64_t kRowBlock = 32;     // rows per work item (a multiple of every kRows)
constexpr int64_t kTileBytes = 32768; // panels scored against a row block while in L1
constexpr int64_t kChunkGroups = 16;  // panels per conversion item
constexpr int kAlign = 64;
constexpr float kInf = std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------ exact scalar fma

uint64_t dbits(double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}
double from_dbits(uint64_t u) {
  double v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// fma(a, b, c) of fp32, correctly rounded, without an FMA instruction: a*b is exact in
// fp64; the fp64 sum s is corrected to round-to-odd with its exact error (TwoSum), and a
// round-to-odd fp64 value rounds to the same fp32 as the exact sum (53 >= 24 + 2 bits).
// Non-finite sums pass through unchanged (they are what the hardware gives, up to NaN bits).
inline float fma_exact(float a, float b, float c) {
  const double p = static_cast<double>(a) * static_cast<double>(b);
  const double cd = c;
  const double s = p + cd;
  const double bv = s - p;
  const double e = (p - (s - bv)) + (cd - bv);
  // s is the nearest double; an inexact sum lies between s and its neighbour toward e, one
  // of which is odd: keep s if odd, else step to the neighbour (+1 ulp of magnitude when e
  // has s's sign, -1 otherwise). Written without branches so loops over it vectorise (SSE2).
  const uint64_t u = dbits(s);
  const bool adjust = (e != 0.0) & ((u & 1u) == 0) & (s - s == 0.0);  // s - s == 0: s finite
  const uint64_t step = ((u ^ dbits(e)) >> 63) != 0 ? ~uint64_t(0) : uint64_t(1);
  return static_cast<float>(from_dbits(u + (adjust ? step : 0)));
}

#if SSLFAST_X86_SIMD
// fma_exact on 4 lanes with SSE2 (the baseline ISA): the same operations as fma_exact on two
// pairs of doubles, so the same bits.
inline __m128d fma_exact_pd(__m128d a, __m128d b, __m128d c) {
  const __m128d p = _mm_mul_pd(a, b);
  const __m128d s = _mm_add_pd(p, c);
  const __m128d bv = _mm_sub_pd(s, p);
  const __m128d e = _mm_add_pd(_mm_sub_pd(p, _mm_sub_pd(s, bv)), _mm_sub_pd(c, bv));
  const __m128d zero = _mm_setzero_pd();
  const __m128i one = _mm_set_epi64x(1, 1);
  const __m128i u = _mm_castpd_si128(s);
  // (u & 1) == 0 per 64-bit lane: compare the low dwords, copy the result to the high ones.
  const __m128i even =
      _mm_shuffle_epi32(_mm_cmpeq_epi32(_mm_and_si128(u, one), _mm_setzero_si128()), _MM_SHUFFLE(2, 2, 0, 0));
  const __m128i adjust = _mm_and_si128(
      _mm_and_si128(_mm_castpd_si128(_mm_cmpneq_pd(e, zero)), _mm_castpd_si128(_mm_cmpeq_pd(_mm_sub_pd(s, s), zero))),
      even);
  // all ones (-1) where e and s differ in sign, else +1
  const __m128i differ =
      _mm_shuffle_epi32(_mm_srai_epi32(_mm_xor_si128(u, _mm_castpd_si128(e)), 31), _MM_SHUFFLE(3, 3, 1, 1));
  const __m128i step = _mm_or_si128(differ, one);
  return _mm_castsi128_pd(_mm_add_epi64(u, _mm_and_si128(adjust, step)));
}

// acc[v] = fma_exact(a, b[v], acc[v]) for v < n (n a multiple of 4).
inline void fma_exact_row(float a, const float* b, float* acc, int64_t n) {
  const __m128d ad = _mm_set1_pd(a);
  for (int64_t v = 0; v < n; v += 4) {
    const __m128 bv = _mm_loadu_ps(b + v), cv = _mm_loadu_ps(acc + v);
    const __m128d lo = fma_exact_pd(ad, _mm_cvtps_pd(bv), _mm_cvtps_pd(cv));
    const __m128d hi = fma_exact_pd(ad, _mm_cvtps_pd(_mm_movehl_ps(bv, bv)), _mm_cvtps_pd(_mm_movehl_ps(cv, cv)));
    _mm_storeu_ps(acc + v, _mm_movelh_ps(_mm_cvtpd_ps(lo), _mm_cvtpd_ps(hi)));
  }
}
#else
inline void fma_exact_row(float a, const float* b, float* acc, int64_t n) {
  for (int64_t v = 0; v < n; ++v) acc[v] = fma_exact(a, b[v], acc[v]);
}
#endif

// ------------------------------------------------------------------ shared (baseline) code

float* align_up(float* ptr) {
  return reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(ptr) + kAlign - 1) & ~std::uintptr_t(kAlign - 1));
}

// Panels of head h: ngroups of (d + 1) * kGroup floats: (d, kGroup) scaled codewords c'
// (j-major, zeros past V), then kGroup initial scores b (-inf past V, so padding never wins).
struct Panels {
  float* base;
  int64_t d, ngroups;
  int64_t group_floats() const { return (d + 1) * kGroup; }
  float* head(int64_t h) const { return base + h * ngroups * group_floats(); }
};

template <int kDtype>
void build_panels_t(const Problem& p, int64_t h, int64_t g0, int64_t g1, const Panels& pn) {
  float coef_a[kGroup], coef_b[kGroup];
  for (int64_t g = g0; g < g1; ++g) {
    float* panel = pn.head(h) + g * pn.group_floats();
    const int64_t v0 = g * kGroup;
    const int64_t n = std::min(kGroup, p.V - v0);
    const int64_t base = (h * p.V + v0) * p.d;
    // v outer: codeword v is read contiguously and written down column v of the panel
    // (d lines of one 64-float-wide panel, all in L1).
    for (int64_t v = 0; v < n; ++v) {
      float cc = 0.0f;
      for (int64_t j = 0; j < p.d; ++j) {
        const float c = load_float(p.cb, base + v * p.d + j, kDtype);
        panel[j * kGroup + v] = c;
        cc += c * c;  // |c|^2, in j order
      }
      coef_a[v] = cc;
    }
    for (int64_t j = 0; j < p.d; ++j)
      for (int64_t v = n; v < kGroup; ++v) panel[j * kGroup + v] = 0.0f;
    // Fold a_v of codeword_coeffs() into the codeword. Cosine divides by the clamped norm
    // (F.normalize's formula, so e.g. d = 1 codewords become exactly +-1); l2 scales by 2 (exact).
    for (int64_t v = 0; v < n; ++v) {
      float a;
      codeword_coeffs(coef_a[v], p.metric, &a, &coef_b[v]);
      coef_a[v] = p.metric == kCosine ? std::max(std::sqrt(coef_a[v]), kNormEps) : a;
    }
    for (int64_t j = 0; j < p.d; ++j) {
      float* row = panel + j * kGroup;
      if (p.metric == kCosine) {
        for (int64_t v = 0; v < n; ++v) row[v] /= coef_a[v];
      } else {
        for (int64_t v = 0; v < n; ++v) row[v] *= coef_a[v];
      }
    }
    float* b = panel + p.d * kGroup;
    for (int64_t v = 0; v < n; ++v) b[v] = coef_b[v];
    for (int64_t v = n; v < kGroup; ++v) b[v] = -kInf;
  }
}

void build_panels(const Problem& p, int64_t h, int64_t g0, int64_t g1, const Panels& pn) {
  switch (p.cb_dtype) {
    case static_cast<int>(DType::f16):
      return build_panels_t<static_cast<int>(DType::f16)>(p, h, g0, g1, pn);
    case static_cast<int>(DType::bf16):
      return build_panels_t<static_cast<int>(DType::bf16)>(p, h, g0, g1, pn);
    default:
      return build_panels_t<static_cast<int>(DType::f32)>(p, h, g0, g1, pn);
  }
}

// Loads the block's rows into xb (nrows, in_dim), with LayerNorm when asked. Templated on the
// storage type so the conversion loop vectorises.
template <int kDtype>
void load_rows_t(const Problem& p, const int64_t* rows, int64_t nrows, float* xb) {
  for (int64_t r = 0; r < nrows; ++r) {
    float* xr = xb + r * p.in_dim;
    const int64_t off = stacked_row_offset(rows[r], p.rows_per_seq, p.T, p.F, p.k);
    for (int64_t i = 0; i < p.in_dim; ++i) xr[i] = load_float(p.x, off + i, kDtype);
    if (p.layernorm) {
      float sum = 0.0f;
      for (int64_t i = 0; i < p.in_dim; ++i) sum += xr[i];
      const float mean = sum / static_cast<float>(p.in_dim);
      float m2 = 0.0f;
      for (int64_t i = 0; i < p.in_dim; ++i) m2 += (xr[i] - mean) * (xr[i] - mean);
      const float rstd = layernorm_rstd(m2, p.in_dim, kLayerNormEps);
      for (int64_t i = 0; i < p.in_dim; ++i) xr[i] = (xr[i] - mean) * rstd;
    }
  }
}

void load_rows(const Problem& p, const int64_t* rows, int64_t nrows, float* xb) {
  switch (p.x_dtype) {
    case static_cast<int>(DType::f16):
      return load_rows_t<static_cast<int>(DType::f16)>(p, rows, nrows, xb);
    case static_cast<int>(DType::bf16):
      return load_rows_t<static_cast<int>(DType::bf16)>(p, rows, nrows, xb);
    default:
      return load_rows_t<static_cast<int>(DType::f32)>(p, rows, nrows, xb);
  }
}

// Unit-normalises each head's d-vector of the rows (cosine).
void normalize_heads(const Problem& p, float* y, int64_t nrows) {
  for (int64_t r = 0; r < nrows; ++r) {
    for (int64_t h = 0; h < p.H; ++h) {
      float* v = y + (r * p.H + h) * p.d;
      float ss = 0.0f;
      for (int64_t j = 0; j < p.d; ++j) ss += v[j] * v[j];
      const float nrm = std::max(std::sqrt(ss), kNormEps);  // F.normalize: v / max(|v|, eps)
      for (int64_t j = 0; j < p.d; ++j) v[j] /= nrm;
    }
  }
}

// Running best of a row, per vector lane: score and the index of the first codeword of the
// vector it came from (the lane adds its own offset). L = 1 for the scalar path.
// Reduces the L lanes of a row to its label: the lowest-index maximum (better()); lanes that
// never improved hold (-inf, lane), so a row whose scores are all -inf or NaN gets label 0.
int64_t reduce_lanes(const float* best, const int32_t* base, int L) {
  float s_best = -kInf;
  int64_t i_best = std::numeric_limits<int64_t>::max();
  for (int l = 0; l < L; ++l) {
    const int64_t idx = static_cast<int64_t>(base[l]) + l;
    if (better(best[l], idx, s_best, i_best)) {
      s_best = best[l];
      i_best = idx;
    }
  }
  return i_best;
}

// ------------------------------------------------------------------ per-ISA code
// Each ISA provides
//   project(xb, nrows, in_dim, P, HD, y): y (nrows, HD) = xb @ P, one fma chain over i per entry;
//   score(y, ldy, nrows, d, panels, g0, g1, best, base): updates the running bests of nrows
//     rows (best/base: kLanes floats / ints per row) with panels g0 .. g1-1 of one head.

struct ScalarIsa {
  static constexpr int kLanes = 1;
  static void project(const float* xb, int64_t nrows, int64_t in_dim, const float* P, int64_t HD, float* y) {
    for (int64_t r = 0; r < nrows; ++r) {
      const float* xr = xb + r * in_dim;
      float* yr = y + r * HD;
      for (int64_t c = 0; c < HD; ++c) yr[c] = 0.0f;
      for (int64_t i = 0; i < in_dim; ++i) {
        const float xi = xr[i];
        const float* pi = P + i * HD;
        const int64_t n4 = HD / 4 * 4;
        fma_exact_row(xi, pi, yr, n4);
        for (int64_t c = n4; c < HD; ++c) yr[c] = fma_exact(xi, pi[c], yr[c]);
      }
    }
  }
  static void score(const float* y, int64_t ldy, int64_t nrows, int64_t d, const float* panels, int64_t g0,
                    int64_t g1, float* best, int32_t* base) {
    const int64_t gf = (d + 1) * kGroup;
    float acc[kGroup];
    for (int64_t r = 0; r < nrows; ++r) {
      const float* yr = y + r * ldy;
      float b = best[r];
      int32_t bi = base[r];
      for (int64_t g = g0; g < g1; ++g) {
        const float* panel = panels + g * gf;
        // j outer, the panel's codewords inner (contiguous): the emulated fmas vectorise.
        for (int64_t v = 0; v < kGroup; ++v) acc[v] = panel[d * kGroup + v];
        for (int64_t j = 0; j < d; ++j) {
          const float yj = yr[j];
          const float* cj = panel + j * kGroup;
          fma_exact_row(yj, cj, acc, kGroup);
        }
        for (int64_t v = 0; v < kGroup; ++v) {
          if (acc[v] > b) {
            b = acc[v];
            bi = static_cast<int32_t>(g * kGroup + v);
          }
        }
      }
      best[r] = b;
      base[r] = bi;
    }
  }
};

#if SSLFAST_X86_SIMD

// AVX-512: kRows rows x 4 vectors (one panel) of accumulators = 16 zmm, plus 4 codeword
// vectors; each codeword load feeds kRows FMAs.
struct Avx512Isa {
  static constexpr int kLanes = 16;
  static constexpr int kRows = 4;
  static constexpr int kProjRows = 8;

  SSLFAST_TARGET_AVX512 static void project(const float* xb, int64_t nrows, int64_t in_dim, const float* P,
                                            int64_t HD, float* y) {
    for (int64_t c0 = 0; c0 < HD; c0 += 16) {
      const __mmask16 m = HD - c0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (HD - c0)) - 1u);
      for (int64_t r0 = 0; r0 < nrows; r0 += kProjRows) {
        const int64_t n = std::min<int64_t>(kProjRows, nrows - r0);
        const float* xr[kProjRows];
        for (int r = 0; r < kProjRows; ++r) xr[r] = xb + (r0 + std::min<int64_t>(r, n - 1)) * in_dim;
        __m512 acc[kProjRows];
        for (int r = 0; r < kProjRows; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t i = 0; i < in_dim; ++i) {
          const __m512 pv = _mm512_maskz_loadu_ps(m, P + i * HD + c0);
          for (int r = 0; r < kProjRows; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xr[r][i]), pv, acc[r]);
        }
        for (int r = 0; r < n; ++r) _mm512_mask_storeu_ps(y + (r0 + r) * HD + c0, m, acc[r]);
      }
    }
  }

  SSLFAST_TARGET_AVX512 static void score(const float* y, int64_t ldy, int64_t nrows, int64_t d,
                                          const float* panels, int64_t g0, int64_t g1, float* best,
                                          int32_t* base) {
    // d = 16 (BEST-RQ) with the j loop unrolled at compile time; the same operations in the same order.
    if (d == 16) return score_d<16>(y, ldy, nrows, d, panels, g0, g1, best, base);
    score_d<0>(y, ldy, nrows, d, panels, g0, g1, best, base);
  }

  template <int kD>
  SSLFAST_TARGET_AVX512 static inline __attribute__((always_inline)) void score_d(
      const float* y, int64_t ldy, int64_t nrows, int64_t d_rt, const float* panels, int64_t g0, int64_t g1,
      float* best, int32_t* base) {
    const int64_t d = kD > 0 ? kD : d_rt;
    const int64_t gf = (d + 1) * kGroup;
    for (int64_t r0 = 0; r0 < nrows; r0 += kRows) {
      const int64_t n = std::min<int64_t>(kRows, nrows - r0);
      const float* yr[kRows];
      for (int r = 0; r < kRows; ++r) yr[r] = y + (r0 + std::min<int64_t>(r, n - 1)) * ldy;
      for (int64_t g = g0; g < g1; ++g) {
        const float* panel = panels + g * gf;
        __m512 acc[kRows][4];
        for (int u = 0; u < 4; ++u) {
          const __m512 bu = _mm512_load_ps(panel + d * kGroup + 16 * u);
          for (int r = 0; r < kRows; ++r) acc[r][u] = bu;
        }
        for (int64_t j = 0; j < d; ++j) {
          const float* cj = panel + j * kGroup;
          const __m512 c0 = _mm512_load_ps(cj), c1 = _mm512_load_ps(cj + 16), c2 = _mm512_load_ps(cj + 32),
                       c3 = _mm512_load_ps(cj + 48);
          for (int r = 0; r < kRows; ++r) {
            const __m512 yj = _mm512_set1_ps(yr[r][j]);
            acc[r][0] = _mm512_fmadd_ps(yj, c0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(yj, c1, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(yj, c2, acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(yj, c3, acc[r][3]);
          }
        }
        const int32_t v0 = static_cast<int32_t>(g * kGroup);
        __m512i vidx[4];  // first codeword of each vector, shared by the rows
        for (int u = 0; u < 4; ++u) vidx[u] = _mm512_set1_epi32(v0 + 16 * u);
        for (int r = 0; r < kRows; ++r) {  // rows past n update spare slots (see run_isa)
          // Lowest-index maximum per lane: vectors in index order, strictly greater replaces.
          __m512 m = acc[r][0];
          __m512i mi = vidx[0];
          for (int u = 1; u < 4; ++u) {
            const __mmask16 gt = _mm512_cmp_ps_mask(acc[r][u], m, _CMP_GT_OQ);
            m = _mm512_mask_mov_ps(m, gt, acc[r][u]);
            mi = _mm512_mask_mov_epi32(mi, gt, vidx[u]);
          }
          float* bp = best + (r0 + r) * kLanes;
          int32_t* ip = base + (r0 + r) * kLanes;
          const __m512 bv = _mm512_load_ps(bp);
          const __mmask16 gt = _mm512_cmp_ps_mask(m, bv, _CMP_GT_OQ);
          _mm512_store_ps(bp, _mm512_mask_mov_ps(bv, gt, m));
          _mm512_mask_store_epi32(ip, gt, mi);
        }
      }
    }
  }
};

// AVX2: kRows rows x 4 vectors (half a panel) of accumulators = 8 ymm.
struct Avx2Isa {
  static constexpr int kLanes = 8;
  static constexpr int kRows = 2;
  static constexpr int kProjRows = 4;

  SSLFAST_TARGET_AVX2 static void project(const float* xb, int64_t nrows, int64_t in_dim, const float* P,
                                          int64_t HD, float* y) {
    for (int64_t c0 = 0; c0 < HD; c0 += 8) {
      const int64_t w = std::min<int64_t>(8, HD - c0);
      const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(w)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      for (int64_t r0 = 0; r0 < nrows; r0 += kProjRows) {
        const int64_t n = std::min<int64_t>(kProjRows, nrows - r0);
        const float* xr[kProjRows];
        for (int r = 0; r < kProjRows; ++r) xr[r] = xb + (r0 + std::min<int64_t>(r, n - 1)) * in_dim;
        __m256 acc[kProjRows];
        for (int r = 0; r < kProjRows; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t i = 0; i < in_dim; ++i) {
          const __m256 pv = _mm256_maskload_ps(P + i * HD + c0, m);
          for (int r = 0; r < kProjRows; ++r) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(xr[r][i]), pv, acc[r]);
        }
        for (int r = 0; r < n; ++r) _mm256_maskstore_ps(y + (r0 + r) * HD + c0, m, acc[r]);
      }
    }
  }

  SSLFAST_TARGET_AVX2 static void score(const float* y, int64_t ldy, int64_t nrows, int64_t d, const float* panels,
                                        int64_t g0, int64_t g1, float* best, int32_t* base) {
    const int64_t gf = (d + 1) * kGroup;
    for (int64_t r0 = 0; r0 < nrows; r0 += kRows) {
      const int64_t n = std::min<int64_t>(kRows, nrows - r0);
      const float* yr[kRows];
      for (int r = 0; r < kRows; ++r) yr[r] = y + (r0 + std::min<int64_t>(r, n - 1)) * ldy;
      for (int64_t g = g0; g < g1; ++g) {
        const float* panel = panels + g * gf;
        for (int half = 0; half < 2; ++half) {
          const int64_t o = 32 * half;
          __m256 acc[kRows][4];
          for (int u = 0; u < 4; ++u) {
            const __m256 bu = _mm256_load_ps(panel + d * kGroup + o + 8 * u);
            for (int r = 0; r < kRows; ++r) acc[r][u] = bu;
          }
          for (int64_t j = 0; j < d; ++j) {
            const float* cj = panel + j * kGroup + o;
            const __m256 c0 = _mm256_load_ps(cj), c1 = _mm256_load_ps(cj + 8), c2 = _mm256_load_ps(cj + 16),
                         c3 = _mm256_load_ps(cj + 24);
            for (int r = 0; r < kRows; ++r) {
              const __m256 yj = _mm256_set1_ps(yr[r][j]);
              acc[r][0] = _mm256_fmadd_ps(yj, c0, acc[r][0]);
              acc[r][1] = _mm256_fmadd_ps(yj, c1, acc[r][1]);
              acc[r][2] = _mm256_fmadd_ps(yj, c2, acc[r][2]);
              acc[r][3] = _mm256_fmadd_ps(yj, c3, acc[r][3]);
            }
          }
          const int32_t v0 = static_cast<int32_t>(g * kGroup + o);
          for (int r = 0; r < kRows; ++r) {
            __m256 m = acc[r][0];
            __m256i mi = _mm256_set1_epi32(v0);
            for (int u = 1; u < 4; ++u) {
              const __m256 gt = _mm256_cmp_ps(acc[r][u], m, _CMP_GT_OQ);
              m = _mm256_blendv_ps(m, acc[r][u], gt);
              mi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(mi),
                                                        _mm256_castsi256_ps(_mm256_set1_epi32(v0 + 8 * u)), gt));
            }
            float* bp = best + (r0 + r) * kLanes;
            int32_t* ip = base + (r0 + r) * kLanes;
            const __m256 bv = _mm256_load_ps(bp);
            const __m256 gt = _mm256_cmp_ps(m, bv, _CMP_GT_OQ);
            _mm256_store_ps(bp, _mm256_blendv_ps(bv, m, gt));
            const __m256 bi = _mm256_load_ps(reinterpret_cast<const float*>(ip));
            _mm256_store_ps(reinterpret_cast<float*>(ip), _mm256_blendv_ps(bi, _mm256_castsi256_ps(mi), gt));
          }
        }
      }
    }
  }
};

#endif  // SSLFAST_X86_SIMD

// ------------------------------------------------------------------ driver

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();  // honours OMP_NUM_THREADS
#else
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
#endif
}

// Runs fn(item, worker) for item in [0, n) on `workers` threads (the caller is worker 0),
// items handed out one at a time in order. Plain threads joined at the end instead of an
// OpenMP region: with libgomp's default wait policy idle workers spin at barriers and after
// the region, and on a shared CPU (measured here: 2 cores, load ~6) that spinning took the
// time of the threads doing work (about 45 ms instead of 15 ms wall for a 5 ms-CPU call).
template <typename Fn>
void parallel_items(int64_t n, int workers, Fn&& fn) {
  std::atomic<int64_t> next{0};
  auto work = [&](int worker) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i, worker);
  };
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w) pool.emplace_back(work, w);
  work(0);
  for (auto& t : pool) t.join();
}

void wait_for(const std::atomic<int64_t>& counter, int64_t target) {
  while (counter.load(std::memory_order_acquire) < target) std::this_thread::yield();
}

template <typename Isa>
void run_isa(const Problem& p, const int64_t* active, int64_t nactive) {
  constexpr int L = Isa::kLanes;
  const int64_t R = kRowBlock;
  const int64_t nblocks = (nactive + R - 1) / R;
  const int64_t ngroups = (p.V + kGroup - 1) / kGroup;
  const int64_t nchunks = (ngroups + kChunkGroups - 1) / kChunkGroups;
  const int64_t HD = p.proj != nullptr ? p.H * p.d : p.in_dim;  // y row width (H * d either way)
  const int64_t group_bytes = (p.d + 1) * kGroup * static_cast<int64_t>(sizeof(float));
  const int64_t tile_groups = std::max<int64_t>(1, kTileBytes / group_bytes);

  // Scratch kept per calling thread between calls: fresh multi-MB buffers would page-fault
  // on every call, which costs as much as the codebook pass itself.
  thread_local std::vector<float> panel_store, y_store;
  panel_store.resize(p.H * ngroups * (p.d + 1) * kGroup + kAlign);
  const Panels panels{align_up(panel_store.data()), p.d, ngroups};
  y_store.resize(nactive * HD);
  float* y_all = y_store.data();

  std::unique_ptr<std::atomic<int64_t>[]> heads_built(new std::atomic<int64_t>[p.H]);  // chunks done per head
  for (int64_t h = 0; h < p.H; ++h) heads_built[h].store(0);
  std::atomic<int64_t> blocks_done{0};

  // Item order: [row blocks] then per head [its codebook chunks][its scoring items].
  const int64_t per_head = nchunks + nblocks;
  const int64_t nitems = nblocks + p.H * per_head;
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads(), nitems)));
  struct Scratch {
    std::vector<float> xb, best_store;
    std::vector<int32_t> base_store;
  };
  std::vector<Scratch> scratch(workers);
  for (auto& sc : scratch) {
    sc.xb.resize(p.proj != nullptr ? R * p.in_dim : 0);
    // R is a multiple of every kRows: a block's last register block may update the bests of
    // rows past the block's end (repeats of its last row), which are never read.
    sc.best_store.resize(R * L + kAlign);
    sc.base_store.resize(R * L + kAlign);
  }

  parallel_items(nitems, workers, [&](int64_t item, int worker) {
    Scratch& sc = scratch[worker];
    if (item < nblocks) {
      const int64_t r0 = item * R, nr = std::min(R, nactive - r0);
      float* y = y_all + r0 * HD;
      if (p.proj != nullptr) {
        load_rows(p, active + r0, nr, sc.xb.data());
        Isa::project(sc.xb.data(), nr, p.in_dim, p.proj, HD, y);
      } else {
        load_rows(p, active + r0, nr, y);
      }
      if (p.metric == kCosine) normalize_heads(p, y, nr);
      blocks_done.fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    const int64_t h = (item - nblocks) / per_head, k = (item - nblocks) % per_head;
    if (k < nchunks) {
      build_panels(p, h, k * kChunkGroups, std::min(ngroups, (k + 1) * kChunkGroups), panels);
      heads_built[h].fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    const int64_t blk = k - nchunks;
    const int64_t r0 = blk * R, nr = std::min(R, nactive - r0);
    float* best = align_up(sc.best_store.data());
    int32_t* base = reinterpret_cast<int32_t*>(align_up(reinterpret_cast<float*>(sc.base_store.data())));
    for (int64_t i = 0; i < R * L; ++i) {
      best[i] = -kInf;
      base[i] = 0;
    }
    wait_for(blocks_done, nblocks);
    wait_for(heads_built[h], nchunks);
    const float* y = y_all + r0 * HD + h * p.d;
    const float* hp = panels.head(h);
    for (int64_t g0 = 0; g0 < ngroups; g0 += tile_groups)
      Isa::score(y, HD, nr, p.d, hp, g0, std::min(ngroups, g0 + tile_groups), best, base);
    for (int64_t r = 0; r < nr; ++r) p.out[active[r0 + r] * p.H + h] = reduce_lanes(best + r * L, base + r * L, L);
  });
}

void run(const Problem& p) {
  if (p.rows == 0) return;
  thread_local std::vector<int64_t> active_store;
  active_store.resize(p.rows);
  int64_t nactive = 0;
  for (int64_t n = 0; n < p.rows; ++n) {
    if (p.mask != nullptr && p.mask[n] == 0) {
      for (int64_t h = 0; h < p.H; ++h) p.out[n * p.H + h] = -1;
    } else {
      active_store[nactive++] = n;
    }
  }
  if (nactive == 0) return;
  switch (cpu_isa()) {
#if SSLFAST_X86_SIMD
    case Isa::avx512:
      return run_isa<Avx512Isa>(p, active_store.data(), nactive);
    case Isa::avx2:
      return run_isa<Avx2Isa>(p, active_store.data(), nactive);
#endif
    default:
      return run_isa<ScalarIsa>(p, active_store.data(), nactive);
  }
}

// x: contiguous (B, T, F) of dtype x_dtype; rows = B * (T // k); proj: fp32 (F*k, H*d) or 0;
// codebooks: contiguous (H, V, d) of cb_dtype; mask: uint8 (rows,) or 0; out: int64 (rows, H).
void rp_quantize_cpu(std::uintptr_t x, int x_dtype, int64_t B, int64_t T, int64_t F, int64_t k, std::uintptr_t proj,
                     std::uintptr_t cb, int cb_dtype, int64_t H, int64_t V, int64_t d, bool layernorm, int metric,
                     std::uintptr_t mask, std::uintptr_t out) {
  const Problem p = make_problem(x, x_dtype, B, T, F, k, proj, cb, cb_dtype, H, V, d, layernorm, metric, mask, out);
  py::gil_scoped_release release;
  run(p);
}

}  // namespace
}  // namespace rpq

void bind_rp_quantize(py::module_& m) {
  // Which SIMD path runs is sslfast._C.cpu_isa() / set_cpu_isa() (cpu_isa.h); every path
  // returns the same labels.
  m.def("rp_quantize", &rpq::rp_quantize_cpu, py::arg("x"), py::arg("x_dtype"), py::arg("B"), py::arg("T"),
        py::arg("F"), py::arg("k"), py::arg("proj"), py::arg("codebooks"), py::arg("cb_dtype"), py::arg("H"),
        py::arg("V"), py::arg("d"), py::arg("layernorm"), py::arg("metric"), py::arg("mask"), py::arg("out"));
  // Test hook: out[i] = the scalar path's emulated fma(a[i], b[i], c[i]) (fp32 arrays of n).
  m.def(
      "rp_quantize_fma_exact",
      [](std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t out, int64_t n) {
        // even elements: the scalar emulation; odd elements: the 4-lane one (lane i / 2 % 4)
        for (int64_t i = 0; i < n; ++i) {
          const float ai = as_ptr<const float>(a)[i], ci = as_ptr<const float>(c)[i];
          const float* bi = as_ptr<const float>(b) + i;
          if (i % 2 == 0) {
            as_ptr<float>(out)[i] = rpq::fma_exact(ai, *bi, ci);
          } else {
            float bq[4] = {*bi, *bi, *bi, *bi}, acc[4] = {ci, ci, ci, ci};
            rpq::fma_exact_row(ai, bq, acc, 4);
            as_ptr<float>(out)[i] = acc[i / 2 % 4];
          }
        }
      },
      py::arg("a"), py::arg("b"), py::arg("c"), py::arg("out"), py::arg("n"));
}

}  // namespace sslfast
