// C++ CPU kernel of the masked-prediction loss (math in csrc/masked_prediction.h).
//
// One entry point serves the forward and the backward. Per head, rows are taken R at a time
// (a "chunk"); a chunk's logits S (R x V) are one GEMM with the head's weight, its rows are
// reduced (log-sum-exp, target logit, sum, top) and, when a per-row gradient weight g is
// given, turned in place into dS = scale * g * dloss/dz, from which dX (R x D) = dS W and the
// chunk's share of dW (V x D) += dS^T X are two more GEMMs. So the forward of a scalar loss
// computes its gradients in the same pass (the backward only scales them), and the backward
// of reduction "none" is this pass again with the incoming gradient: the logits are always
// recomputed, never stored beyond one chunk per thread. Memory O(N D + H V D + threads R V).
//
// Threads: chunks are processed in groups of `slots`; phase 1 gives each slot one chunk
// (logits, row math, dS, dX), phase 2 splits V into 48-class blocks and adds the group's
// chunks to dW in ascending chunk order. Every sum is taken in an order fixed by the shapes
// alone, so results are bit-identical for any number of threads.
//
// GEMMs: a 6 x 16 register-blocked micro-kernel (AVX2+FMA, or the scalar fallback with
// std::fma in the same order: the same bits) over 16-column panels of B. The head's weights
// are packed (and converted from fp16/bf16) into those panels once per head, both ways
// (W^T for the logits, W for dX: 2 V D floats), not once per chunk: repacked per chunk, the
// strided scalar copies took about as long as the micro-kernel itself at V = 8192.
//
// BiRQ's on-the-fly soft targets (masked_prediction_gumbel_forward_backward; the math in
// masked_prediction.h, "BiRQ"): the same chunks, with a second, small GEMM T = Y C_h^T (R x V,
// depth Dt) per chunk next to S. Each row turns its T row into target logits (Gumbel noise
// drawn from the seed), their log-sum-exp and q = softmax(t) (one row of V floats per thread),
// and is then a soft-target row. With gradients the T row becomes tgt_scale * g * dloss/dt in
// place, and dY (R x Dt) = dT C_h and dC_h += dT^T Y are two more small GEMMs beside dX and dW.
// The targets are never stored beyond one chunk per thread.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "masked_prediction.h"
#include "sslfast/bind.h"
#include "sslfast/cpu_isa.h"
#include "sslfast/philox_cpu.h"
#include "sslfast/dtype.h"

namespace py = pybind11;

namespace sslfast {
namespace mpl {
namespace {

constexpr int MR = 6;       // micro-kernel rows
constexpr int NR = 16;      // micro-kernel columns (two AVX2 vectors)
constexpr int64_t R = 96;   // rows per chunk (a multiple of MR)
constexpr int64_t VB = 48;  // classes per dW block (a multiple of MR and NR)
constexpr int64_t KC = 256; // depth of a packed B panel (KC x NR fp32 = 16 KB, L1)

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[i][j] (+)= sum_p A[i * lda + p] * B[p * NR + j], i < MR, j < NR.
void micro_scalar(int64_t k, const float* A, int64_t lda, const float* B, float* C, int64_t ldc, bool acc) {
  float c[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) c[i][j] = acc ? C[i * ldc + j] : 0.0f;
  for (int64_t p = 0; p < k; ++p)
    for (int i = 0; i < MR; ++i) {
      const float a = A[i * lda + p];
      for (int j = 0; j < NR; ++j) c[i][j] = std::fma(a, B[p * NR + j], c[i][j]);
    }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) C[i * ldc + j] = c[i][j];
}

#if SSLFAST_X86_SIMD
SSLFAST_TARGET_AVX2 void micro_avx2(int64_t k, const float* A, int64_t lda, const float* B, float* C, int64_t ldc,
                                    bool acc) {
  // Twelve named accumulators: an indexed array would be spilled to the stack.
#define MPL_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define MPL_DECL(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps();
  MPL_ROWS(MPL_DECL)
#define MPL_LOAD(i)                                  \
  c##i##0 = _mm256_loadu_ps(C + i * ldc);            \
  c##i##1 = _mm256_loadu_ps(C + i * ldc + 8);
  if (acc) {
    MPL_ROWS(MPL_LOAD)
  }
  for (int64_t p = 0; p < k; ++p) {
    const __m256 b0 = _mm256_loadu_ps(B + p * NR), b1 = _mm256_loadu_ps(B + p * NR + 8);
#define MPL_FMA(i)                                             \
  {                                                            \
    const __m256 a = _mm256_broadcast_ss(A + i * lda + p);     \
    c##i##0 = _mm256_fmadd_ps(a, b0, c##i##0);                 \
    c##i##1 = _mm256_fmadd_ps(a, b1, c##i##1);                 \
  }
    MPL_ROWS(MPL_FMA)
  }
#define MPL_STORE(i)                       \
  _mm256_storeu_ps(C + i * ldc, c##i##0);  \
  _mm256_storeu_ps(C + i * ldc + 8, c##i##1);
  MPL_ROWS(MPL_STORE)
#undef MPL_ROWS
#undef MPL_DECL
#undef MPL_LOAD
#undef MPL_FMA
#undef MPL_STORE
}
#endif

using MicroFn = void (*)(int64_t, const float*, int64_t, const float*, float*, int64_t, bool);

MicroFn micro_kernel() {
#if SSLFAST_X86_SIMD
  if (cpu_isa() != Isa::scalar) return micro_avx2;
#endif
  return micro_scalar;
}

// C (m x n, ldc) (+)= A (m x k, lda) * B (k x n), m % MR == 0, n % NR == 0. B is pre-packed
// in panels: panel(p0, j0) points to B[p0 .. p0 + kc)[j0 .. j0 + NR) laid out kc x NR.
template <class PanelB>
void gemm(MicroFn micro, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, PanelB&& panel, float* C,
          int64_t ldc, bool accumulate) {
  if (k == 0 && !accumulate) {
    for (int64_t i = 0; i < m; ++i) std::fill(C + i * ldc, C + i * ldc + n, 0.0f);
    return;
  }
  for (int64_t p0 = 0; p0 < k; p0 += KC) {
    const int64_t kc = std::min(KC, k - p0);
    for (int64_t j0 = 0; j0 < n; j0 += NR) {
      const float* b = panel(p0, j0);
      for (int64_t i0 = 0; i0 < m; i0 += MR)
        micro(kc, A + i0 * lda + p0, lda, b, C + i0 * ldc + j0, ldc, accumulate || p0 > 0);
    }
  }
}

struct Problem {
  const void* x;  // (N, Hx, D) storage dtype
  int x_dtype;
  const void* w;  // (H, V, D)
  int w_dtype;
  const void* bias;  // (H, V) or null
  int b_dtype;
  const int64_t* targets;  // (N, H), -1 = ignored; unused with q
  const void* q;           // (N, H, V) soft targets or null
  int q_dtype;
  const float* grad;       // (N, H) gradient weight per row, or null: no gradients
  int64_t N, H, Hx, V, D;
  float scale, eps;
  float* loss;  // (N, H) or null
  float* row_max;  // (N, H) or null: the row's max logit and log l (lse = their sum, kept apart)
  float* log_l;    // (N, H) or null
  uint8_t* top; // (N, H) or null
  float* dx;    // (N, Hx, D), accumulated into (zeroed by the caller)
  float* dw;    // (H, V, D)
  float* db;    // (H, V) or null
  float* dq;    // (N, H, V) (zeroed by the caller) or null
  // BiRQ (y not null): q = softmax(t) per row, t_v = tgt_scale <y[n, h % Hy], c[h, v]> + noise_scale G
  const float* y = nullptr;  // (N, Hy, Dt) fp32, L2-normalised by the op
  const float* c = nullptr;  // (H, V, Dt) fp32
  int64_t Hy = 1, Dt = 0;
  uint64_t seed = 0;
  float tgt_scale = 0.0f, noise_scale = 0.0f;
  float* dy = nullptr;  // (N, Hy, Dt), accumulated into (zeroed by the caller), or null
  float* dc = nullptr;  // (H, V, Dt) or null
};

// Workspace layout, all fp32: per slot S (R x Vs), dST (Vs x R), X rows (R x Dp), X panels
// (Dp / NR, R, NR), dX (R x Dp), a row of soft targets (Vs); shared: dW block
// accumulator (Vs x Dp), db accumulator (Vs), the head's W^T panels (Vs / NR, Dp, NR) and, with
// gradients, its W panels (Dp / NR, Vs, NR). Vs: V rounded up to VB, Dp: D rounded up to NR.
// BiRQ (Dt > 0) adds the same for (T, Y, C) with depth Dtp (Dt rounded up to NR): per slot T,
// dTT, Y rows, Y panels, dY; shared: dC accumulator, C^T panels and, with gradients, C panels.
struct Layout {
  int64_t Vs, Dp, Dtp, slots, per_slot, total;
  Layout(int64_t V, int64_t D, int64_t slots_, bool grad, int64_t Dt = 0)
      : Vs(round_up(std::max<int64_t>(V, 1), VB)), Dp(round_up(std::max<int64_t>(D, 1), NR)),
        Dtp(Dt > 0 ? round_up(Dt, NR) : 0), slots(slots_) {
    const int64_t targets = Dt > 0 ? R * Vs + (grad ? Vs * R : 0) + 2 * R * Dtp + (grad ? R * Dtp : 0) : 0;
    per_slot = R * Vs + (grad ? Vs * R : 0) + 2 * R * Dp + (grad ? R * Dp : 0) + Vs + targets;
    total = slots * per_slot + (grad ? Vs * Dp + Vs : 0) + (grad ? 2 : 1) * Vs * Dp +
            (grad ? 3 : 1) * Vs * Dtp;
  }
};

// The head's weights as the micro-kernel's B panels (zero past V and D).
struct Packed {
  const float* wt;  // (Vs / NR, Dp, NR): B(p = d, j = v) of S = X W^T
  const float* w;   // (Dp / NR, Vs, NR): B(p = v, j = d) of dX = dS W, or null
  const float* ct;  // BiRQ: (Vs / NR, Dtp, NR), B of T = Y C^T, or null
  const float* c;   // BiRQ: (Dtp / NR, Vs, NR), B of dY = dT C, or null
};

// Head h of a (H, V, D) class matrix (the weights W, or BiRQ's codebooks C with D = Dt) as
// panels: panel jp (NR classes) of its transpose (Vs / NR, Dp, NR) and panel jp (NR features)
// of itself (Dp / NR, Vs, NR, skipped when w is null), threads splitting the panels.
void pack_head(const void* src, int dtype, int64_t V, int64_t D, int64_t Vs, int64_t Dp, int64_t h, float* wt,
               float* w) {
  const int64_t nt = Vs / NR, nw = w ? Dp / NR : 0;
#pragma omp for schedule(static)
  for (int64_t jp = 0; jp < nt + nw; ++jp) {
    if (jp < nt) {
      float* out = wt + jp * Dp * NR;
      for (int64_t jj = 0; jj < NR; ++jj) {
        const int64_t v = jp * NR + jj;
        for (int64_t d = 0; d < Dp; ++d)
          out[d * NR + jj] = (v < V && d < D) ? load_float(src, (h * V + v) * D + d, dtype) : 0.0f;
      }
    } else {
      const int64_t d0 = (jp - nt) * NR;
      float* out = w + (jp - nt) * Vs * NR;
      for (int64_t v = 0; v < Vs; ++v)
        for (int64_t jj = 0; jj < NR; ++jj)
          out[v * NR + jj] = (v < V && d0 + jj < D) ? load_float(src, (h * V + v) * D + d0 + jj, dtype) : 0.0f;
    }
  }
}

int default_slots() {
#ifdef _OPENMP
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}

// A slot's logits (S, dST) and rows (X) and, for BiRQ, its target scores (T, dTT) and rows (Y).
struct Slot {
  float *S, *dST, *xr, *xf, *dxb, *qrow;
  float *T, *dTT, *yr, *yf, *dyb;
};

Slot slot_at(const Layout& L, float* ws, int64_t s, bool grad) {
  float* p = ws + s * L.per_slot;
  Slot sl;
  sl.S = p, p += R * L.Vs;
  sl.dST = grad ? p : nullptr, p += grad ? L.Vs * R : 0;
  sl.xr = p, p += R * L.Dp;
  sl.xf = p, p += R * L.Dp;
  sl.dxb = grad ? p : nullptr, p += grad ? R * L.Dp : 0;
  sl.qrow = p, p += L.Vs;
  const bool birq = L.Dtp > 0;
  sl.T = birq ? p : nullptr, p += birq ? R * L.Vs : 0;
  sl.dTT = birq && grad ? p : nullptr, p += birq && grad ? L.Vs * R : 0;
  sl.yr = birq ? p : nullptr, p += birq ? R * L.Dtp : 0;
  sl.yf = birq ? p : nullptr, p += birq ? R * L.Dtp : 0;
  sl.dyb = birq && grad ? p : nullptr;
  return sl;
}

// Rows n0 .. n0 + R of head hs of a (N, Hs, D) tensor as fp32 (R x Dp), zero past nr rows and D.
void load_rows(const void* src, int dtype, int64_t Hs, int64_t hs, int64_t D, int64_t Dp, int64_t n0, int64_t nr,
               float* out) {
  for (int64_t r = 0; r < R; ++r) {
    float* row = out + r * Dp;
    for (int64_t d = 0; d < Dp; ++d)
      row[d] = (r < nr && d < D) ? load_float(src, ((n0 + r) * Hs + hs) * D + d, dtype) : 0.0f;
  }
}

// dst[n0 + r, hs, :D] += rows[r, :D] for r < nr (dst (N, Hs, D); rows R x Dp).
void add_rows(const float* rows, int64_t Dp, int64_t nr, int64_t n0, int64_t Hs, int64_t hs, int64_t D, float* dst) {
  for (int64_t r = 0; r < nr; ++r) {
    float* out = dst + ((n0 + r) * Hs + hs) * D;
    const float* in = rows + r * Dp;
    for (int64_t d = 0; d < D; ++d) out[d] += in[d];
  }
}

// Phase 2's operands of a chunk: the gradient rows dS (R x Vs) transposed (Vs x R), and the
// chunk's rows (R x Dp) as NR-wide panels (Dp / NR, R, NR), the B of dW += dS^T X.
void phase2_operands(const float* dS, int64_t Vs, float* dST, const float* rows, int64_t Dp, float* panels) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < Vs; ++v) dST[v * R + r] = dS[r * Vs + v];
  for (int64_t jp = 0; jp < Dp / NR; ++jp)
    for (int64_t r = 0; r < R; ++r)
      std::memcpy(panels + (jp * R + r) * NR, rows + r * Dp + jp * NR, NR * sizeof(float));
}

// ---- BiRQ's Gumbel noise, exact and fast: gq::gumbel_at's bits (-log(-log(u)) in fp64, rounded
// once to fp32), one Philox call per four positions and the fp64 logs four lanes at a time.
// gq::gumbel_at per position took about 30% of the core's time (a Philox call and two libm logs each).

#if SSLFAST_X86_SIMD
// log of four positive normal doubles: x = 2^e m, m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s)
// with s = (m - 1) / (m + 1), |s| <= 0.1716, by its series to s^23 (truncation below 1e-17
// relative), e ln 2 added in two parts (fdlibm's ln2_hi, exact times e, and ln2_lo). Relative
// error a few 1e-16: not libm's bits, which is why gumbel_from_words checks the rounding.
SSLFAST_TARGET_AVX2 __m256d log4(__m256d x) {
  const __m256i bits = _mm256_castpd_si256(x);
  const __m256i mant = _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi64x(0x000FFFFFFFFFFFFFLL)),
                                       _mm256_set1_epi64x(0x3FF0000000000000LL));
  __m256d m = _mm256_castsi256_pd(mant);  // [1, 2)
  // the biased exponent as a double: its bits under 2^52's, minus 2^52
  const __m256i ebits = _mm256_or_si256(_mm256_srli_epi64(bits, 52), _mm256_set1_epi64x(0x4330000000000000LL));
  __m256d e = _mm256_sub_pd(_mm256_castsi256_pd(ebits), _mm256_set1_pd(4503599627370496.0 + 1023.0));
  const __m256d big = _mm256_cmp_pd(m, _mm256_set1_pd(1.4142135623730951), _CMP_GT_OQ);
  m = _mm256_blendv_pd(m, _mm256_mul_pd(m, _mm256_set1_pd(0.5)), big);
  e = _mm256_add_pd(e, _mm256_and_pd(big, _mm256_set1_pd(1.0)));
  const __m256d one = _mm256_set1_pd(1.0);
  const __m256d sv = _mm256_div_pd(_mm256_sub_pd(m, one), _mm256_add_pd(m, one));
  const __m256d s2 = _mm256_mul_pd(sv, sv);
  __m256d poly = _mm256_set1_pd(2.0 / 23.0);
  for (int k = 21; k >= 1; k -= 2) poly = _mm256_fmadd_pd(poly, s2, _mm256_set1_pd(2.0 / k));
  const __m256d logm = _mm256_mul_pd(sv, poly);
  const __m256d lo = _mm256_fmadd_pd(e, _mm256_set1_pd(1.90821492927058770002e-10), logm);
  return _mm256_fmadd_pd(e, _mm256_set1_pd(6.93147180369123816490e-01), lo);
}

// Four words' noise; returns the lanes (bits) log4's error leaves in doubt: where r -+ B round to
// different floats, B = 4e-15 (1 + |r|) bounding log4's error and any libm's (both logs: the inner
// one's relative error becomes the outer one's absolute error).
SSLFAST_TARGET_AVX2 int gumbel4(const uint32_t* words, float* out) {
  const __m128 u = _mm_setr_ps(uint_to_open_uniform(words[0], gq::kULo), uint_to_open_uniform(words[1], gq::kULo),
                               uint_to_open_uniform(words[2], gq::kULo), uint_to_open_uniform(words[3], gq::kULo));
  const __m256d zero = _mm256_setzero_pd();
  const __m256d v = _mm256_sub_pd(zero, log4(_mm256_cvtps_pd(u)));
  const __m256d r = _mm256_sub_pd(zero, log4(v));
  const __m256d absr = _mm256_andnot_pd(_mm256_set1_pd(-0.0), r);
  const __m256d b = _mm256_mul_pd(_mm256_set1_pd(4e-15), _mm256_add_pd(_mm256_set1_pd(1.0), absr));
  const __m128 f = _mm256_cvtpd_ps(r);
  const __m128 same = _mm_and_ps(_mm_cmpeq_ps(_mm256_cvtpd_ps(_mm256_sub_pd(r, b)), f),
                                 _mm_cmpeq_ps(_mm256_cvtpd_ps(_mm256_add_pd(r, b)), f));
  _mm_storeu_ps(out, f);
  return ~_mm_movemask_ps(same) & 0xF;
}
#endif

// out[i] = gq::gumbel_from_word(words[i]), i < count; returns how many took the scalar path for
// lack of precision (tests).
int64_t gumbel_from_words(const uint32_t* words, int64_t count, float* out) {
  int64_t i = 0, slow = 0;
#if SSLFAST_X86_SIMD
  if (cpu_isa() != Isa::scalar)
    for (; i + 4 <= count; i += 4) {
      const int doubt = gumbel4(words + i, out + i);
      for (int j = 0; j < 4; ++j)
        if (doubt >> j & 1) out[i + j] = gq::gumbel_from_word(words[i + j]), ++slow;
    }
#endif
  for (; i < count; ++i) out[i] = gq::gumbel_from_word(words[i]);
  return slow;
}

// Noise G(n, pos0 + i) of logits row n, i < count (gq::gumbel_at's bits): word pos % 4 of Philox
// block (pos / 4, n, Stream::GUMBEL, 0), the blocks drawn in bulk (sslfast/philox_cpu.h).
void gumbel_row(uint64_t seed, int64_t n, int64_t pos0, int64_t count, float* out) {
  constexpr int64_t kQuads = 64;
  uint32_t words[4 * (kQuads + 1)];
  for (int64_t i0 = 0; i0 < count; i0 += 4 * kQuads) {
    const int64_t nb = std::min(4 * kQuads, count - i0);
    const int64_t first = (pos0 + i0) >> 2, last = (pos0 + i0 + nb - 1) >> 2;
    philox_range(static_cast<uint32_t>(first), last - first + 1, static_cast<uint32_t>(n), gq::kStreamGumbel, seed,
                 words);
    gumbel_from_words(words + ((pos0 + i0) & 3), nb, out + i0);
  }
}

// BiRQ: row n's target scores <y, c_v> in t (V floats) become the target logits t_v
// (target_logit) and q its softmax (target_prob from the row's online log-sum-exp).
void target_row(const Problem& p, int64_t h, int64_t n, float* t, float* q) {
  const bool noise = p.noise_scale != 0.0f;
  if (noise) gumbel_row(p.seed, n, h * p.V, p.V, q);  // q holds the noise until the probabilities
  for (int64_t v = 0; v < p.V; ++v) t[v] = target_logit_noise(t[v], p.tgt_scale, p.noise_scale, noise ? q[v] : 0.0f);
  RowState ts = row_init(true);
  lse_update(ts, t, static_cast<int>(p.V));
  const float l_t = row_denominator(ts);
  for (int64_t v = 0; v < p.V; ++v) q[v] = target_prob(t[v], ts.m, l_t);
}

// Phase 1 for chunk c of head h in slot sl.
void chunk_rows(const Problem& p, const Layout& L, MicroFn micro, const Packed& pk, int64_t h, int64_t c,
                const Slot& sl) {
  const int64_t n0 = c * R, nr = std::min(R, p.N - n0);
  const int64_t hx = p.Hx == 1 ? 0 : h, hy = p.Hy == 1 ? 0 : h;
  const bool grad = p.grad != nullptr, birq = p.y != nullptr;
  // X rows of the chunk as fp32, zero padded (rows past N, columns past D).
  load_rows(p.x, p.x_dtype, p.Hx, hx, p.D, L.Dp, n0, nr, sl.xr);
  // S = X W_h^T: B(p = d, j = v) = W[h, v, d].
  auto panel_wt = [&](int64_t p0, int64_t j0) { return pk.wt + ((j0 / NR) * L.Dp + p0) * NR; };
  gemm(micro, R, L.Vs, p.D, sl.xr, L.Dp, panel_wt, sl.S, L.Vs, false);
  if (birq) {  // T = Y C_h^T, the target scores <y, c_v>
    load_rows(p.y, 0, p.Hy, hy, p.Dt, L.Dtp, n0, nr, sl.yr);
    auto panel_ct = [&](int64_t p0, int64_t j0) { return pk.ct + ((j0 / NR) * L.Dtp + p0) * NR; };
    gemm(micro, R, L.Vs, p.Dt, sl.yr, L.Dtp, panel_ct, sl.T, L.Vs, false);
  }

  const float eps_over_v = p.eps / static_cast<float>(p.V);
  const bool soft = p.q != nullptr || birq;
  for (int64_t r = 0; r < R; ++r) {
    float* z = sl.S + r * L.Vs;
    float* tr = birq ? sl.T + r * L.Vs : nullptr;  // BiRQ: the row's target scores
    if (r >= nr) {
      std::fill(z, z + L.Vs, 0.0f);
      if (tr) std::fill(tr, tr + L.Vs, 0.0f);
      continue;
    }
    const int64_t i = (n0 + r) * p.H + h;
    const int64_t t = soft ? -1 : p.targets[i];
    const bool valid = soft || t >= 0;
    for (int64_t v = 0; v < p.V; ++v)
      z[v] = logit(z[v], p.scale, p.bias ? load_float(p.bias, h * p.V + v, p.b_dtype) : 0.0f);
    RowState st = row_init(soft);
    // BiRQ: zbar = st.zbest + dbar (masked_prediction.h, dtarget_logit) and the loss's xent
    float dbar = 0.0f, xent = 0.0f;
    if (soft) {
      if (birq) {
        target_row(p, h, n0 + r, tr, sl.qrow);
        float d = 0.0f, gap = 0.0f, gap_c = 0.0f;
        target_mean_update(st, d, z, sl.qrow, static_cast<int>(p.V));
        lse_update(st, z, static_cast<int>(p.V));
        gap_update(gap, gap_c, -INFINITY, 0.0f, st, z, sl.qrow, static_cast<int>(p.V));
        dbar = target_mean_dbar(st, d);
        xent = row_xent(st, gap, gap_c);
      } else {
        for (int64_t v = 0; v < p.V; ++v) sl.qrow[v] = load_float(p.q, i * p.V + v, p.q_dtype);
        row_update_soft(st, z, sl.qrow, static_cast<int>(p.V));
      }
    } else {
      row_update(st, z, static_cast<int>(p.V), 0, t);
    }
    const float log_l = row_log_l(st);
    if (p.loss)
      p.loss[i] =
          birq ? row_loss_xent(st, xent, p.eps, eps_over_v) : row_loss(st, valid, p.eps, eps_over_v);
    if (p.row_max) p.row_max[i] = st.m;
    if (p.log_l) p.log_l[i] = log_l;
    if (p.top) p.top[i] = row_top(st, valid) ? 1 : 0;
    if (!grad) continue;
    const float g = valid ? p.grad[i] : 0.0f;
    if (g == 0.0f) {
      std::fill(z, z + L.Vs, 0.0f);
      if (tr) std::fill(tr, tr + L.Vs, 0.0f);
      continue;
    }
    const float mass = row_mass(st, p.eps);
    for (int64_t v = 0; v < p.V; ++v) {
      const float qv = soft ? sl.qrow[v] : (v == t ? 1.0f : 0.0f);
      if (p.dq) p.dq[i * p.V + v] = dtarget(z[v], st.m, log_l, g, p.eps);
      // BiRQ: the T row becomes the gradient of <y, c_v>, tgt_scale * g * dloss/dt_v
      if (tr) tr[v] = p.tgt_scale * dtarget_logit(z[v], st.zbest, dbar, g, qv, p.eps);
      z[v] = p.scale * dlogit(z[v], st.m, log_l, g, qv, mass, p.eps, eps_over_v);
    }
    std::fill(z + p.V, z + L.Vs, 0.0f);
    if (tr) std::fill(tr + p.V, tr + L.Vs, 0.0f);
  }
  if (!grad) return;

  // dX = dS W_h: B(p = v, j = d) = W[h, v, d].
  auto panel_w = [&](int64_t p0, int64_t j0) { return pk.w + ((j0 / NR) * L.Vs + p0) * NR; };
  gemm(micro, R, L.Dp, p.V, sl.S, L.Vs, panel_w, sl.dxb, L.Dp, false);
  add_rows(sl.dxb, L.Dp, nr, n0, p.Hx, hx, p.D, p.dx);
  phase2_operands(sl.S, L.Vs, sl.dST, sl.xr, L.Dp, sl.xf);
  if (birq) {  // dY = dT C_h, and dT^T and Y's panels for dC += dT^T Y
    auto panel_c = [&](int64_t p0, int64_t j0) { return pk.c + ((j0 / NR) * L.Vs + p0) * NR; };
    gemm(micro, R, L.Dtp, p.V, sl.T, L.Vs, panel_c, sl.dyb, L.Dtp, false);
    add_rows(sl.dyb, L.Dtp, nr, n0, p.Hy, hy, p.Dt, p.dy);
    phase2_operands(sl.T, L.Vs, sl.dTT, sl.yr, L.Dtp, sl.yf);
  }
}

void run(const Problem& p, float* ws, int64_t slots) {
  const bool grad = p.grad != nullptr;
  const Layout L(p.V, p.D, slots, grad, p.y != nullptr ? p.Dt : 0);
  const MicroFn micro = micro_kernel();
  const int64_t n_chunks = (p.N + R - 1) / R;
  const int64_t n_vblocks = L.Vs / VB;
  float* dw_acc = ws + slots * L.per_slot;
  float* db_acc = dw_acc + L.Vs * L.Dp;
  float* wt_pack = grad ? db_acc + L.Vs : dw_acc;
  float* w_pack = grad ? wt_pack + L.Vs * L.Dp : nullptr;
  // BiRQ's shared part after the weights' (Layout)
  const bool birq = p.y != nullptr;
  float* ct_pack = wt_pack + (grad ? 2 : 1) * L.Vs * L.Dp;
  float* c_pack = birq && grad ? ct_pack + L.Vs * L.Dtp : nullptr;
  float* dc_acc = birq && grad ? c_pack + L.Vs * L.Dtp : nullptr;
  const Packed pk{wt_pack, w_pack, birq ? ct_pack : nullptr, c_pack};
#pragma omp parallel
  {
    for (int64_t h = 0; h < p.H; ++h) {
      // every thread is past the previous head's last barrier: no reads of the panels remain
      pack_head(p.w, p.w_dtype, p.V, p.D, L.Vs, L.Dp, h, wt_pack, w_pack);
      if (birq) pack_head(p.c, 0, p.V, p.Dt, L.Vs, L.Dtp, h, ct_pack, c_pack);
      if (grad) {
#pragma omp for schedule(static)
        for (int64_t v = 0; v < L.Vs; ++v) {
          std::fill(dw_acc + v * L.Dp, dw_acc + (v + 1) * L.Dp, 0.0f);
          db_acc[v] = 0.0f;
          if (dc_acc) std::fill(dc_acc + v * L.Dtp, dc_acc + (v + 1) * L.Dtp, 0.0f);
        }
      }
      for (int64_t c0 = 0; c0 < n_chunks; c0 += slots) {
        const int64_t group = std::min<int64_t>(slots, n_chunks - c0);
#pragma omp for schedule(static, 1)
        for (int64_t s = 0; s < group; ++s) chunk_rows(p, L, micro, pk, h, c0 + s, slot_at(L, ws, s, grad));
        if (!grad) continue;
        // Phase 2: dW[v block] += sum over the group's chunks, in chunk order.
#pragma omp for schedule(static)
        for (int64_t vb = 0; vb < n_vblocks; ++vb) {
          for (int64_t s = 0; s < group; ++s) {
            const Slot sl = slot_at(L, ws, s, grad);
            auto panel = [&](int64_t p0, int64_t j0) -> const float* { return sl.xf + ((j0 / NR) * R + p0) * NR; };
            const float* a = sl.dST + vb * VB * R;
            gemm(micro, VB, L.Dp, R, a, R, panel, dw_acc + vb * VB * L.Dp, L.Dp, true);
            for (int64_t v = 0; v < VB; ++v) {
              float sum = 0.0f;
              for (int64_t r = 0; r < R; ++r) sum += a[v * R + r];
              db_acc[vb * VB + v] += sum;
            }
            if (dc_acc) {  // BiRQ: dC[v block] += dT^T Y
              auto ypanel = [&](int64_t p0, int64_t j0) -> const float* { return sl.yf + ((j0 / NR) * R + p0) * NR; };
              gemm(micro, VB, L.Dtp, R, sl.dTT + vb * VB * R, R, ypanel, dc_acc + vb * VB * L.Dtp, L.Dtp, true);
            }
          }
        }
      }
      if (!grad) continue;
#pragma omp for schedule(static)
      for (int64_t v = 0; v < p.V; ++v) {
        std::memcpy(p.dw + (h * p.V + v) * p.D, dw_acc + v * L.Dp, p.D * sizeof(float));
        // dS carries the scale; the bias enters the logits unscaled.
        if (p.db) p.db[h * p.V + v] = db_acc[v] / p.scale;
        if (dc_acc) std::memcpy(p.dc + (h * p.V + v) * p.Dt, dc_acc + v * L.Dtp, p.Dt * sizeof(float));
      }
    }
  }
}

std::tuple<int64_t, int64_t> layout_cpu(int64_t V, int64_t D, bool grad, int64_t Dt) {
  const int64_t slots = default_slots();
  return {slots, Layout(V, D, slots, grad, Dt).total};
}

void forward_backward_cpu(std::uintptr_t x, int x_dtype, std::uintptr_t w, int w_dtype, std::uintptr_t bias,
                          int b_dtype, std::uintptr_t targets, std::uintptr_t q, int q_dtype, std::uintptr_t grad,
                          int64_t N, int64_t H, int64_t Hx, int64_t V, int64_t D, double scale, double eps,
                          std::uintptr_t loss, std::uintptr_t row_max, std::uintptr_t log_l, std::uintptr_t top,
                          std::uintptr_t dx,
                          std::uintptr_t dw, std::uintptr_t db, std::uintptr_t dq, std::uintptr_t ws, int64_t slots) {
  const Problem p{as_ptr<const void>(x), x_dtype, as_ptr<const void>(w), w_dtype, as_ptr<const void>(bias), b_dtype,
                  as_ptr<const int64_t>(targets), as_ptr<const void>(q), q_dtype, as_ptr<const float>(grad), N, H, Hx,
                  V, D, static_cast<float>(scale), static_cast<float>(eps), as_ptr<float>(loss), as_ptr<float>(row_max),
                  as_ptr<float>(log_l),
                  as_ptr<uint8_t>(top), as_ptr<float>(dx), as_ptr<float>(dw), as_ptr<float>(db),
                  as_ptr<float>(dq)};
  if (N == 0 || H == 0) return;
  py::gil_scoped_release nogil;
  run(p, as_ptr<float>(ws), slots);
}

// BiRQ: the soft targets made on the fly from y (N, Hy, Dt) and c (H, V, Dt) (fp32) and the
// seed; dy (zeroed by the caller) and dc with gradients. No labels, soft targets or dq.
void gumbel_forward_backward_cpu(std::uintptr_t x, int x_dtype, std::uintptr_t w, int w_dtype, std::uintptr_t bias,
                                 int b_dtype, std::uintptr_t y, std::uintptr_t c, int64_t Hy, int64_t Dt,
                                 uint64_t seed, double tgt_scale, double noise_scale, std::uintptr_t grad, int64_t N,
                                 int64_t H, int64_t Hx, int64_t V, int64_t D, double scale, double eps,
                                 std::uintptr_t loss, std::uintptr_t row_max, std::uintptr_t log_l,
                                 std::uintptr_t top, std::uintptr_t dx, std::uintptr_t dw, std::uintptr_t db,
                                 std::uintptr_t dy, std::uintptr_t dc, std::uintptr_t ws, int64_t slots) {
  Problem p{as_ptr<const void>(x), x_dtype, as_ptr<const void>(w), w_dtype, as_ptr<const void>(bias), b_dtype,
            nullptr, nullptr, 0, as_ptr<const float>(grad), N, H, Hx, V, D, static_cast<float>(scale),
            static_cast<float>(eps), as_ptr<float>(loss), as_ptr<float>(row_max), as_ptr<float>(log_l),
            as_ptr<uint8_t>(top), as_ptr<float>(dx), as_ptr<float>(dw), as_ptr<float>(db), nullptr};
  p.y = as_ptr<const float>(y);
  p.c = as_ptr<const float>(c);
  p.Hy = Hy;
  p.Dt = Dt;
  p.seed = seed;
  p.tgt_scale = static_cast<float>(tgt_scale);
  p.noise_scale = static_cast<float>(noise_scale);
  p.dy = as_ptr<float>(dy);
  p.dc = as_ptr<float>(dc);
  if (N == 0 || H == 0) return;
  py::gil_scoped_release nogil;
  run(p, as_ptr<float>(ws), slots);
}

// Tests: gumbel_from_words on `count` words at address `words` into `out` (fp32); returns the
// number of lanes the vector path left to the scalar one.
int64_t gumbel_words_cpu(std::uintptr_t words, int64_t count, std::uintptr_t out) {
  return gumbel_from_words(as_ptr<const uint32_t>(words), count, as_ptr<float>(out));
}

}  // namespace
}  // namespace mpl

void bind_masked_prediction(py::module_& m) {
  m.def("masked_prediction_layout", &mpl::layout_cpu, py::arg("V"), py::arg("D"), py::arg("grad"),
        py::arg("Dt") = 0,
        "(slots, workspace floats) of masked_prediction_forward_backward (Dt = 0) or "
        "masked_prediction_gumbel_forward_backward (Dt: the target features) for this V, D and thread count");
  m.def("masked_prediction_forward_backward", &mpl::forward_backward_cpu, py::arg("x"), py::arg("x_dtype"),
        py::arg("w"), py::arg("w_dtype"), py::arg("bias"), py::arg("b_dtype"), py::arg("targets"), py::arg("q"),
        py::arg("q_dtype"), py::arg("grad"), py::arg("N"), py::arg("H"), py::arg("Hx"), py::arg("V"), py::arg("D"),
        py::arg("scale"), py::arg("eps"), py::arg("loss"), py::arg("row_max"), py::arg("log_l"), py::arg("top"),
        py::arg("dx"),
        py::arg("dw"), py::arg("db"), py::arg("dq"), py::arg("ws"), py::arg("slots"));
  m.def("masked_prediction_gumbel_forward_backward", &mpl::gumbel_forward_backward_cpu, py::arg("x"),
        py::arg("x_dtype"), py::arg("w"), py::arg("w_dtype"), py::arg("bias"), py::arg("b_dtype"), py::arg("y"),
        py::arg("c"), py::arg("Hy"), py::arg("Dt"), py::arg("seed"), py::arg("tgt_scale"), py::arg("noise_scale"),
        py::arg("grad"), py::arg("N"), py::arg("H"), py::arg("Hx"), py::arg("V"), py::arg("D"), py::arg("scale"),
        py::arg("eps"), py::arg("loss"), py::arg("row_max"), py::arg("log_l"), py::arg("top"), py::arg("dx"),
        py::arg("dw"), py::arg("db"), py::arg("dy"), py::arg("dc"), py::arg("ws"), py::arg("slots"),
        "BiRQ's masked-prediction core: soft targets softmax(tgt_scale <y, c> + noise_scale Gumbel) made per row");
  m.def("_masked_prediction_gumbel_words", &mpl::gumbel_words_cpu, py::arg("words"), py::arg("count"),
        py::arg("out"),
        "(tests) Gumbel noise of `count` Philox words (uint32) into fp32 `out` with BiRQ's CPU path; returns how "
        "many lanes fell back to scalar libm logs");
}

}  // namespace sslfast
