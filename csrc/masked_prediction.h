// Masked-prediction loss (HuBERT, BEST-RQ): the per-logit and per-row math shared by the C++
// CPU kernels (csrc/masked_prediction_cpu.cpp) and the CUDA kernels
// (csrc/masked_prediction_cuda.cu).
//
// The problem both solve, per head h: rows x_n (D), class vectors W_v (D), logits
// z_v = scale * <x_n, W_v> + b_v for v < V; target y (y < 0: ignored row). With label
// smoothing eps (torch's cross_entropy definition) the row's loss is
//     lse(z) - (1 - eps) z_y - eps / V * sum_v z_v
// and dloss/dz_v = softmax(z)_v - (1 - eps) [v == y] - eps / V; for a soft target q (N, H, V)
// the one-hot [v == y] becomes q_v (and softmax is scaled by the total mass). The kernels walk V in tiles
// with an online log-sum-exp (never a row of N x V logits in memory); the gradient pass
// recomputes the logits of a tile from the row's statistics (the Cut Cross-Entropy approach).
// Those statistics are lse's two parts, the max m and log l (lse = m + log l), kept apart and
// used as exp((z - m) - log l): their fp32 sum is rounded to ulp(lse) / 2, an error every
// recomputed probability would carry (at logits near 4e3, 1e-4 relative: 250 x the reference's
// gradient error; the same fix as csrc/info_nce.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "sslfast/common.h"
#include "sslfast/dtype.h"
#include "sslfast/launch.h"
#include "gumbel_quantize.h"

namespace sslfast {
namespace mpl {

// Online state of one row: running max m and sum l of exp(z - m), compensated (the sum is
// l - c, add_compensated in sslfast/common.h); zy = sum_v q_v z_v and
// qsum = sum_v q_v for the target distribution q (one-hot for a hard label: zy is the target's
// logit, qsum 1); zsum = sum of all logits (label smoothing); zbest the logit of the target
// (hard) or of the first most probable class (soft), qbest that probability.
struct RowState {
  float m;
  float l;
  float c;
  float zy;
  float zsum;
  float qsum;
  float qbest;
  float zbest;
};

SSLFAST_HD RowState row_init(bool soft) {
  return RowState{-INFINITY, 0.0f, 0.0f, 0.0f, 0.0f, soft ? 0.0f : 1.0f, -INFINITY, 0.0f};
}

SSLFAST_HD float logit(float dot, float scale, float bias) { return scale * dot + bias; }

// The log-sum-exp part of a tile: two sweeps (max, then sum) rescale the running sum once
// per tile, not once per class.
SSLFAST_HD void lse_update(RowState& st, const float* z, int n) {
  if (n == 0) return;
  float tile_max = -INFINITY;
  float tile_sum = 0.0f;
  for (int j = 0; j < n; ++j) {
    tile_max = fmaxf(tile_max, z[j]);
    tile_sum += z[j];
  }
  const float m_new = fmaxf(st.m, tile_max);
  const float rescale = expf(st.m - m_new);  // expf(-inf) = 0 on the first tile
  st.l *= rescale;
  st.c *= rescale;
  for (int j = 0; j < n; ++j) add_compensated(st.l, st.c, expf(z[j] - m_new));
  st.m = m_new;
  st.zsum += tile_sum;
}

// Folds the logits z[0..n) of classes v0..v0+n into the state of a row with hard label target.
SSLFAST_HD void row_update(RowState& st, const float* z, int n, int64_t v0, int64_t target) {
  // a select, not a branch: with the store under a branch ptxas kept zy and zbest in local
  // memory in the CUDA forward kernel (8 bytes of stack, 24 of spill stores on sm_90)
  const bool hit = target >= v0 && target < v0 + n;
  const float zt = z[hit ? target - v0 : 0];
  st.zy = hit ? zt : st.zy;
  st.zbest = hit ? zt : st.zbest;
  lse_update(st, z, n);
}

// The same for a soft target: q[0..n) the target probabilities of those classes.
SSLFAST_HD void row_update_soft(RowState& st, const float* z, const float* q, int n) {
  for (int j = 0; j < n; ++j) {
    st.zy += q[j] * z[j];
    st.qsum += q[j];
    const bool better = q[j] > st.qbest;  // selects, not a branch (row_update)
    st.zbest = better ? z[j] : st.zbest;
    st.qbest = better ? q[j] : st.qbest;
  }
  lse_update(st, z, n);
}

// Merges the state of another slice of the same row's classes (kernels that split V).
SSLFAST_HD RowState row_merge(const RowState& a, const RowState& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return a;
  const bool b_best = b.qbest > a.qbest;
  const float ea = expf(a.m - m), eb = expf(b.m - m);
  float l = a.l * ea, c = a.c * ea;
  add_compensated(l, c, b.l * eb);
  add_compensated(l, c, -b.c * eb);
  return RowState{m, l, c, a.zy + b.zy, a.zsum + b.zsum, a.qsum + b.qsum, b_best ? b.qbest : a.qbest,
                  b_best ? b.zbest : a.zbest};
}

// The second part of the saved statistics: log l (lse = m + log l).
SSLFAST_HD float row_log_l(const RowState& st) { return log_denominator(st.l, st.c); }

// torch's cross_entropy with label smoothing eps: -sum_v ((1 - eps) q_v + eps / V) log p_v;
// 0 for an ignored row.
SSLFAST_HD float row_loss(const RowState& st, bool valid, float eps, float eps_over_v) {
  if (!valid) return 0.0f;
  // lse = m + log(l), expanded so that the max m meets the target logits before log(l) is added:
  // a hard label at the row's maximum gives exactly 0 + log(l), not (m + log(l)) - m rounded to
  // ulp(m) (the same rule as info_nce's and contrastive's row_loss).
  const float lg = log_denominator(st.l, st.c);
  return (1.0f - eps) * ((st.qsum * st.m - st.zy) + st.qsum * lg) + eps * lg + (eps * st.m - eps_over_v * st.zsum);
}

// fairseq's `correct`: the target's (most probable class's) logit attains the row's maximum
// (ties favour the target).
SSLFAST_HD bool row_top(const RowState& st, bool valid) { return valid && st.zbest >= st.m; }

// The total target mass (1 - eps) qsum + eps that multiplies softmax in dloss/dz.
SSLFAST_HD float row_mass(const RowState& st, float eps) { return (1.0f - eps) * st.qsum + eps; }

// g * dloss/dz for one logit of a row with statistics (m, log_l): mass * softmax - (1 - eps) q_v
// - eps / V; q_v the target probability (hard: 1 at the target, 0 elsewhere); g = 0 for
// ignored rows.
SSLFAST_HD float dlogit(float z, float m, float log_l, float g, float q, float mass, float eps, float eps_over_v) {
  return g * (mass * expf((z - m) - log_l) - (1.0f - eps) * q - eps_over_v);
}

// g * dloss/dq_v for a soft target: g (1 - eps) (lse - z), lse - z summed as (m - z) + log l.
SSLFAST_HD float dtarget(float z, float m, float log_l, float g, float eps) {
  return g * (1.0f - eps) * ((m - z) + log_l);
}

// ---- BiRQ: soft targets made on the fly (masked_prediction_loss with GumbelRPQTargets)
// Target logits of row n, head h, class v (y, c already L2-normalised by the op):
//     t_v = tgt_scale * <y_(n, h), c_(h, v)> + noise_scale * G(n, h * V + v)
// G the Gumbel noise of gumbel_vector_quantize's stream for an (N, H * V) logits row (gq::gumbel_at);
// noise_scale = 0 means no noise is drawn (eval). q = softmax(t) over v: a first pass computes
// each row's target statistics (m_t, l_t) with the online log-sum-exp above (RowState with no
// target: lse_update only); every later pass recomputes t tile by tile and takes
// q_v = target_prob(t_v, m_t, l_t). The loss, its statistics and dloss/dz are then those of a
// soft target q. Nothing N x V is stored.
SSLFAST_HD float target_logit_noise(float dot, float tgt_scale, float noise_scale, float gumbel);

SSLFAST_HD float target_logit(float dot, float tgt_scale, float noise_scale, uint64_t seed, int64_t n, int64_t pos) {
  return target_logit_noise(dot, tgt_scale, noise_scale, noise_scale == 0.0f ? 0.0f : gq::gumbel_at(seed, n, pos));
}

// q_v from the row's target statistics: the max m_t and the softmax denominator l_t = l - c (>= 1),
// as exp(t - m_t) / l_t, softmax's own rounding. exp((t - m_t) - log l_t) would carry
// ulp(|t - m_t|) / 2 of absolute error into the exponent: 4x torch's error on a q of 1e-4 at
// t - m_t near -10, and the BiRQ gradients showed it (2-3x the fp32 reference's at tau 1e-3).
SSLFAST_HD float target_prob(float t, float m_t, float l_t) { return expf(t - m_t) / l_t; }

// l_t of a row state: its compensated sum.
SSLFAST_HD float row_denominator(const RowState& st) { return st.l - st.c; }

// BiRQ's target-logit gradient: g * dloss/dt_v through q = softmax(t) is
// q_v (dloss/dq_v - sum_u q_u dloss/dq_u) with dloss/dq_v = (1 - eps) (lse - z_v) (dtarget): lse
// cancels, leaving (1 - eps) q_v (zbar - z_v), zbar = sum_u q_u z_u / sum_u q_u (q normalised).
// zbar is kept as zbest + dbar: zbest the logit at the first argmax of q (RowState::zbest) and
// dbar = sum_u q_u (z_u - zbest) / sum_u q_u, so where q peaks zbar - z_v = (zbest - z_v) + dbar
// is dbar alone, and exactly 0 for a one-hot q (as the reference's). The fp32
// (lse - z_v) - sum_u q_u (lse - z_u) of torch's softmax backward cancels two numbers near
// lse - z_v instead; computed that way the kernels' feature and codebook gradients were 2-26x the
// fp32 reference's error at tau 1e-3. The gradient of <y, c_v> is tgt_scale times it.
SSLFAST_HD float dtarget_logit(float z, float zbest, float dbar, float g, float q, float eps) {
  return g * (1.0f - eps) * q * ((zbest - z) + dbar);
}

// Folds q[0..n), z[0..n) into d = sum_u q_u (z_u - zbest) and the row state's target mass and
// first-argmax (qsum, qbest, zbest: row_update_soft's rule), moving the anchor when zbest changes:
// D += qsum (old - new). BiRQ's rows take this and lse_update in place of row_update_soft (their
// sum_v q_v z_v is not needed: dtarget_logit and row_xent). A plain fp32 sum: its terms are small
// where q peaks, and compensating it spilled forward_kernel<kGumbel> (16 B on sm_80, 8 B on sm_90).
SSLFAST_HD void target_mean_update(RowState& st, float& d, const float* z, const float* q, int n) {
  for (int j = 0; j < n; ++j) {
    const bool better = q[j] > st.qbest;  // selects, not a branch (row_update)
    d += better ? st.qsum * (st.zbest - z[j]) : 0.0f;
    st.zbest = better ? z[j] : st.zbest;
    st.qbest = better ? q[j] : st.qbest;
    d += q[j] * (z[j] - st.zbest);
    st.qsum += q[j];
  }
}

// dbar of a row once every tile is folded (row_update_soft's qsum).
SSLFAST_HD float target_mean_dbar(const RowState& st, float d) { return d / st.qsum; }

// gap - gap_c (compensated) = sum_v q_v (m - z_v) at the running max m, for the loss: after
// the row state folded q[0..n), z[0..n) (its max before was m_old, its target mass qsum_old), the
// sum moves to the new max and takes the tile's terms, every one >= 0 (no cancellation, unlike
// qsum m - sum q z; the shifted-anchor sum of target_mean_update put BiRQ's loss at 1.9x the fp32
// reference's error where this one is at 0.9x).
SSLFAST_HD void gap_update(float& gap, float& gap_c, float m_old, float qsum_old, const RowState& st, const float* z,
                           const float* q, int n) {
  add_compensated(gap, gap_c, m_old == -INFINITY ? 0.0f : qsum_old * (st.m - m_old));
  for (int j = 0; j < n; ++j) add_compensated(gap, gap_c, q[j] * (st.m - z[j]));
}

// The loss's -sum_v q_v log p_v = sum_v q_v (m - z_v) + qsum log l.
SSLFAST_HD float row_xent(const RowState& st, float gap, float gap_c) {
  return (gap - gap_c) + st.qsum * log_denominator(st.l, st.c);
}

// A soft row's loss with its cross-entropy part xent = -sum_v q_v log p_v given (BiRQ: row_xent;
// row_loss's fp32 qsum m - sum_v q_v z_v put the loss at 3x the fp32 reference's error, N = 130,
// V = 130): (1 - eps) xent + eps log l + eps (m - zsum / V).
SSLFAST_HD float row_loss_xent(const RowState& st, float xent, float eps, float eps_over_v) {
  const float lg = log_denominator(st.l, st.c);
  return (1.0f - eps) * xent + eps * lg + (eps * st.m - eps_over_v * st.zsum);
}

// target_logit with the noise G(n, pos) already drawn (gumbel; unused when noise_scale is 0): the
// C++ CPU kernel draws a row's noise four positions per Philox call and its fp64 logs four lanes
// at a time (masked_prediction_cpu.cpp, gumbel_row), the same bits as gq::gumbel_at.
SSLFAST_HD float target_logit_noise(float dot, float tgt_scale, float noise_scale, float gumbel) {
  return noise_scale == 0.0f ? tgt_scale * dot : fmaf(noise_scale, gumbel, tgt_scale * dot);
}

// ---- masked_prediction_cuda.cu's tiles, each function what one thread of a block does
// between two barriers (csrc/testing_cpu.cpp runs them for every thread on the host).
constexpr int BM = masked_prediction_launch::kRows;          // rows of a tile
constexpr int BV = masked_prediction_launch::kClasses;       // classes of a tile
constexpr int BK = 32;                                       // feature slice staged in shared memory
constexpr int BD = masked_prediction_launch::kFeatures;      // gradient features per block
constexpr int THREADS = masked_prediction_launch::kThreads;  // 16 x 16 threads, 2 x 2 logits each

struct Args {
  const void* x;
  int x_dtype;
  const void* w;
  int w_dtype;
  const void* bias;
  int b_dtype;
  const int64_t* targets;  // (N, H) labels, -1 = ignored; null with soft targets
  const void* q;           // (N, H, V) soft targets, or null
  int q_dtype;
  int64_t N, H, Hx, V, D;
  float scale, eps, eps_over_v;  // eps / V from the host: no division in the kernels
};

// BiRQ's targets made on the fly, the kGumbel kernels' extra argument (zeros otherwise): y (N, Hy,
// Dt) and the codewords c (H, V, Dt), fp32, L2-normalised; the Philox key is load_seed(seed_ptr,
// seed) on the device. Not in Args: grown by these fields, Args left dx_kernel<kHard> with 8 bytes
// of stack and 4 of spill stores on sm_90 (ptxas), a separate argument leaves it as it was.
struct Targets {
  const float* y;
  const float* c;
  int64_t Hy, Dt;
  float tgt_scale, noise_scale;
  const int64_t* seed_ptr;
  uint64_t seed;
};

// The kernels' target modes (masked_prediction_cuda.cu's template argument): hard labels, soft
// targets q given, soft targets made from y, c and Gumbel noise (the BiRQ section above).
constexpr int kHard = 0, kSoft = 1, kGumbel = 2;

// What the forward saves per (row, head) for the gradient kernels: lse's two parts (the max m and
// log l, kept apart: the file's header) and, for soft targets, the target mass (hard: null, 1).
struct Saved {
  float* m;
  float* log_l;
  float* mass;
  // kGumbel: the target logits' statistics (max m_t, denominator l_t) and zbar = zbest + dbar
  // per row (dtarget_logit)
  float* m_t;
  float* l_t;
  float* zbest;
  float* dbar;
};

// Args and Saved from the host entry points' addresses: the CUDA launch
// (masked_prediction_cuda.cu) and its host emulation (csrc/testing_cpu.cpp) build them with this
// one function. Soft targets (q given) leave targets null and save the target mass.
inline void host_args(std::uintptr_t x, int x_dtype, std::uintptr_t w, int w_dtype, std::uintptr_t bias,
                      int b_dtype, std::uintptr_t targets, std::uintptr_t q, int q_dtype, int64_t N, int64_t H,
                      int64_t Hx, int64_t V, int64_t D, double scale, double eps, std::uintptr_t row_max,
                      std::uintptr_t log_l, std::uintptr_t mass, Args* a, Saved* sv) {
  const bool soft = q != 0;
  *a = Args{reinterpret_cast<const void*>(x), x_dtype, reinterpret_cast<const void*>(w), w_dtype,
            reinterpret_cast<const void*>(bias), b_dtype,
            soft ? nullptr : reinterpret_cast<const int64_t*>(targets), reinterpret_cast<const void*>(q), q_dtype,
            N, H, Hx, V, D, static_cast<float>(scale), static_cast<float>(eps),
            static_cast<float>(eps / static_cast<double>(V))};
  *sv = Saved{reinterpret_cast<float*>(row_max), reinterpret_cast<float*>(log_l),
              soft ? reinterpret_cast<float*>(mass) : nullptr};
}

// The kGumbel kernels' Targets and the fields of Saved they add, after host_args (called with no
// targets): they save the target mass too.
inline void gumbel_args(std::uintptr_t y, std::uintptr_t c, int64_t Hy, int64_t Dt, double tgt_scale,
                        double noise_scale, std::uintptr_t seed_ptr, std::uintptr_t mass, std::uintptr_t m_t,
                        std::uintptr_t l_t, std::uintptr_t zbest, std::uintptr_t dbar, Targets* t, Saved* sv) {
  *t = Targets{reinterpret_cast<const float*>(y), reinterpret_cast<const float*>(c), Hy, Dt,
               static_cast<float>(tgt_scale), static_cast<float>(noise_scale),
               reinterpret_cast<const int64_t*>(seed_ptr), 0};
  sv->mass = reinterpret_cast<float*>(mass);
  sv->m_t = reinterpret_cast<float*>(m_t);
  sv->l_t = reinterpret_cast<float*>(l_t);
  sv->zbest = reinterpret_cast<float*>(zbest);
  sv->dbar = reinterpret_cast<float*>(dbar);
}

struct Smem {
  float xs[BM][BK + 1];
  float ws[BV][BK + 1];
  float z[BM][BV + 1];
  float q[BM][BV + 1];  // soft targets of the tile (forward_kernel); kGumbel: target logits, then dt
};

// logit_tile, staging: thread tid's elements of the feature slice k0 of rows n0.. (head hx of
// x) and classes v0.. (head h of W), 0 outside N, V or D.
SSLFAST_HD void stage_slice(const Args& a, Smem& s, int64_t h, int64_t hx, int64_t n0, int64_t v0, int64_t k0,
                            unsigned tid) {
  // Not unrolled: unrolled, the four copies of the dtype switch in load_float left ptxas's
  // loop-exit code with 32 bytes of stack and 68 of spill stores in forward_kernel on sm_80
  // (tests/test_compile_cuda.py); the FMA loop below is unrolled in full instead (BK fixed).
#if defined(__CUDACC__)
#pragma unroll 1
#endif
  for (int e = tid; e < BM * BK; e += THREADS) {
    const int r = e / BK, k = e % BK;
    const int64_t n = n0 + r, d = k0 + k;
    s.xs[r][k] = (n < a.N && d < a.D) ? load_float(a.x, (n * a.Hx + hx) * a.D + d, a.x_dtype) : 0.0f;
    const int64_t v = v0 + r;
    s.ws[r][k] = (v < a.V && d < a.D) ? load_float(a.w, (h * a.V + v) * a.D + d, a.w_dtype) : 0.0f;
  }
}

// target_tile (kGumbel), staging: the same for the target logits, from the fp32 slice k0 of y rows
// n0.. (head hy) and codewords v0.. (head h), 0 outside N, V or Dt.
SSLFAST_HD void stage_target_slice(const Args& a, const Targets& t, Smem& s, int64_t h, int64_t hy, int64_t n0,
                                   int64_t v0, int64_t k0, unsigned tid) {
  // not unrolled: as stage_slice (unrolled, ptxas spilled in forward_kernel<kGumbel>)
#if defined(__CUDACC__)
#pragma unroll 1
#endif
  for (int e = tid; e < BM * BK; e += THREADS) {
    const int r = e / BK, k = e % BK;
    const int64_t n = n0 + r, v = v0 + r, d = k0 + k;
    s.xs[r][k] = (n < a.N && d < t.Dt) ? t.y[(n * t.Hy + hy) * t.Dt + d] : 0.0f;
    s.ws[r][k] = (v < a.V && d < t.Dt) ? t.c[(h * a.V + v) * t.Dt + d] : 0.0f;
  }
}

// logit_tile, after the staging barrier: thread tid's 2 x 2 dot products (rows 2 ty.., classes
// 2 tx..) over the staged slice.
SSLFAST_HD void fma_slice(const Smem& s, float (&acc)[2][2], unsigned tid) {
  const int tx = tid % 16, ty = tid / 16;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < BK; ++k) {
    const float x0 = s.xs[ty * 2][k], x1 = s.xs[ty * 2 + 1][k];
    const float w0 = s.ws[tx * 2][k], w1 = s.ws[tx * 2 + 1][k];
    acc[0][0] = fmaf(x0, w0, acc[0][0]);
    acc[0][1] = fmaf(x0, w1, acc[0][1]);
    acc[1][0] = fmaf(x1, w0, acc[1][0]);
    acc[1][1] = fmaf(x1, w1, acc[1][1]);
  }
}

// logit_tile, last: thread tid's 2 x 2 logits (scale, bias) into s.z (0 past V).
SSLFAST_HD void write_tile(const Args& a, Smem& s, const float (&acc)[2][2], int64_t h, int64_t v0, unsigned tid) {
  const int tx = tid % 16, ty = tid / 16;
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      const int64_t v = v0 + tx * 2 + j;
      const float b = (a.bias != nullptr && v < a.V) ? load_float(a.bias, h * a.V + v, a.b_dtype) : 0.0f;
      s.z[ty * 2 + i][tx * 2 + j] = v < a.V ? logit(acc[i][j], a.scale, b) : 0.0f;
    }
}

// target_tile (kGumbel), last: thread tid's 2 x 2 target logits (target_logit: the dot products
// scaled, plus the Gumbel noise of position h V + v of row n) into s.q (0 outside N or V).
SSLFAST_HD void write_target_tile(const Args& a, const Targets& t, Smem& s, const float (&acc)[2][2], int64_t h,
                                  int64_t n0, int64_t v0, uint64_t seed, unsigned tid) {
  const int tx = tid % 16, ty = tid / 16;
  // unrolled: with the Philox rounds inside, ptxas kept these loops and put acc in
  // local memory (16 bytes of stack in forward_kernel<kGumbel>)
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < 2; ++i)
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int j = 0; j < 2; ++j) {
      const int64_t n = n0 + ty * 2 + i, v = v0 + tx * 2 + j;
      s.q[ty * 2 + i][tx * 2 + j] =
          (n < a.N && v < a.V) ? target_logit(acc[i][j], t.tgt_scale, t.noise_scale, seed, n, h * a.V + v) : 0.0f;
    }
}

// forward_kernel with soft targets, before the logit tile's barriers: thread tid's elements of the
// target probabilities q[n0.., h, v0..] into s.q (0 outside N or V), one coalesced sweep.
SSLFAST_HD void stage_targets(const Args& a, Smem& s, int64_t h, int64_t n0, int64_t v0, unsigned tid) {
  for (int e = tid; e < BM * BV; e += THREADS) {
    const int r = e / BV, c = e % BV;
    const int64_t n = n0 + r, v = v0 + c;
    s.q[r][c] = (n < a.N && v < a.V) ? load_float(a.q, (n * a.H + h) * a.V + v, a.q_dtype) : 0.0f;
  }
}

// forward_kernel, thread r < BM after a logit tile: folds row r's logits (and soft targets) in.
SSLFAST_HD void fold_tile(const Smem& s, RowState& st, int r, int64_t v0, int64_t V, int64_t t, bool soft) {
  const int nv = static_cast<int>(V - v0 < BV ? V - v0 : BV);
  if (soft)
    row_update_soft(st, s.z[r], s.q[r], nv);
  else
    row_update(st, s.z[r], nv, v0, t);
}

// forward_kernel (kGumbel), first sweep, thread r < BM after a target tile: row r's target logits
// into its target statistics (m_t, l_t: the log-sum-exp part of RowState only).
SSLFAST_HD void fold_target_stats(const Smem& s, RowState& st, int r, int64_t v0, int64_t V) {
  lse_update(st, s.q[r], static_cast<int>(V - v0 < BV ? V - v0 : BV));
}

// forward_kernel (kGumbel), second sweep, thread r < BM after the target and logit tiles: row r's
// target logits in s.q become q = target_prob(t, m_t, l_t) and fold in as a soft target (without
// sum q z: target_mean_update and lse_update), with
// acc = {d, gap, gap_c}: sum_v q_v (z_v - zbest) (target_mean_update) and sum_v q_v (m - z_v)
// (gap_update) beside it.
SSLFAST_HD void fold_tile_gumbel(Smem& s, RowState& st, float (&acc)[3], int r, int64_t v0, int64_t V, float m_t,
                                 float l_t) {
  const int nv = static_cast<int>(V - v0 < BV ? V - v0 : BV);
  for (int j = 0; j < nv; ++j) s.q[r][j] = target_prob(s.q[r][j], m_t, l_t);
  const float m_old = st.m, qsum_old = st.qsum;
  target_mean_update(st, acc[0], s.z[r], s.q[r], nv);
  lse_update(st, s.z[r], nv);
  gap_update(acc[1], acc[2], m_old, qsum_old, st, s.z[r], s.q[r], nv);
}

// forward_kernel (kGumbel), thread r < BM at the end: row n's loss (row_xent), saved statistics of
// the logits and of the target logits, zbest and dbar, top flag.
SSLFAST_HD void gumbel_row_out(const Args& a, const RowState& st, const float (&acc)[3], float m_t, float l_t,
                               int64_t n, int64_t h, float* loss, const Saved& sv, uint8_t* top) {
  const int64_t i = n * a.H + h;
  const float dbar = target_mean_dbar(st, acc[0]);
  loss[i] = row_loss_xent(st, row_xent(st, acc[1], acc[2]), a.eps, a.eps_over_v);
  sv.m[i] = st.m;
  sv.log_l[i] = row_log_l(st);
  sv.mass[i] = row_mass(st, a.eps);
  sv.m_t[i] = m_t;
  sv.l_t[i] = l_t;
  sv.zbest[i] = st.zbest;
  sv.dbar[i] = dbar;
  top[i] = row_top(st, true) ? 1 : 0;
}

// dlogit_tile (kGumbel), after the target and logit tiles: s.z -> scale * g * dloss/dz and s.q (the
// target logits t) -> tgt_scale * g * dloss/dt (dtarget_logit: the gradient of <y, c_v>) in place
// for thread tid's elements, q recomputed from the saved target statistics; 0 outside N or V.
SSLFAST_HD void dlogit_items_gumbel(const Args& a, const Targets& t, Smem& s, int64_t h, int64_t n0, int64_t v0,
                                    const Saved& sv, const float* grad, unsigned tid) {
  for (int e = tid; e < BM * BV; e += THREADS) {
    const int r = e / BV, c = e % BV;
    const int64_t n = n0 + r, v = v0 + c;
    float ds = 0.0f, dt = 0.0f;
    if (n < a.N && v < a.V) {
      const int64_t i = n * a.H + h;
      const float z = s.z[r][c], m = sv.m[i], log_l = sv.log_l[i], g = grad[i];
      const float q = target_prob(s.q[r][c], sv.m_t[i], sv.l_t[i]);
      ds = dlogit(z, m, log_l, g, q, sv.mass[i], a.eps, a.eps_over_v);
      dt = dtarget_logit(z, sv.zbest[i], sv.dbar[i], g, q, a.eps);
    }
    s.z[r][c] = a.scale * ds;
    s.q[r][c] = t.tgt_scale * dt;
  }
}

// dlogit_tile: s.z -> scale * g * dloss/dz in place for thread tid's elements, from each row's
// saved statistics and gradient weight (0 when ignored); for soft targets also g * dloss/dq
// into dq when dq is not null (dx_kernel's blocks of the first feature block).
SSLFAST_HD void dlogit_items(const Args& a, Smem& s, int64_t h, int64_t n0, int64_t v0, const Saved& sv,
                             const float* grad, float* dq, unsigned tid, bool soft) {
  for (int e = tid; e < BM * BV; e += THREADS) {
    const int r = e / BV, c = e % BV;
    const int64_t n = n0 + r, v = v0 + c;
    float ds = 0.0f;
    if (n < a.N && v < a.V) {
      const int64_t i = n * a.H + h;
      const float z = s.z[r][c], m = sv.m[i], log_l = sv.log_l[i];
      if (soft) {
        const float g = grad[i];
        if (dq != nullptr) dq[i * a.V + v] = dtarget(z, m, log_l, g, a.eps);
        ds = dlogit(z, m, log_l, g, load_float(a.q, i * a.V + v, a.q_dtype), sv.mass[i], a.eps, a.eps_over_v);
      } else {
        const int64_t t = a.targets[i];
        const float g = t < 0 ? 0.0f : grad[i];
        ds = dlogit(z, m, log_l, g, v == t ? 1.0f : 0.0f, 1.0f, a.eps, a.eps_over_v);
      }
    }
    s.z[r][c] = a.scale * ds;
  }
}

// The 8 features of a thread in a BD-wide gradient block: d0 + k + 8 j.
SSLFAST_HD void axpy_features(float (&acc)[BD / 8], float ds, const void* src, int dtype, int64_t row, int64_t d0,
                              int k, int64_t D) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int j = 0; j < BD / 8; ++j) {
    const int64_t d = d0 + k + 8 * j;
    if (d < D) acc[j] = fmaf(ds, load_float(src, row + d, dtype), acc[j]);
  }
}

SSLFAST_HD void store_features(const float (&acc)[BD / 8], float* dst, int64_t row, int64_t d0, int k, int64_t D) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int j = 0; j < BD / 8; ++j) {
    const int64_t d = d0 + k + 8 * j;
    if (d < D) dst[row + d] = acc[j];
  }
}

// forward_kernel, thread r < BM at the end: row n = n0 + r's loss, saved statistics and top-1
// flag (valid: a soft row, or a hard label not ignored).
SSLFAST_HD void forward_row_out(const Args& a, const RowState& st, int64_t n, int64_t h, bool valid, float* loss,
                                const Saved& sv, uint8_t* top) {
  const int64_t i = n * a.H + h;
  loss[i] = row_loss(st, valid, a.eps, a.eps_over_v);
  sv.m[i] = st.m;
  sv.log_l[i] = row_log_l(st);
  if (sv.mass != nullptr) sv.mass[i] = row_mass(st, a.eps);
  top[i] = row_top(st, valid) ? 1 : 0;
}

// dx_kernel, one dS tile: thread (row r, k)'s 8 features of dX += dS[r, :] W[h, v0.., :].
SSLFAST_HD void dx_tile(const Args& a, const Smem& s, float (&acc)[BD / 8], int64_t h, int64_t v0, int64_t d0, int r,
                        int k) {
  const int nv = static_cast<int>(a.V - v0 < BV ? a.V - v0 : BV);
  for (int c = 0; c < nv; ++c) axpy_features(acc, s.z[r][c], a.w, a.w_dtype, (h * a.V + v0 + c) * a.D, d0, k, a.D);
}

// dw_kernel, one dS tile: thread (class c, k)'s 8 features of dW += dS[:, c]^T X[n0.., hx, :]
// and its bias gradient.
SSLFAST_HD void dw_tile(const Args& a, const Smem& s, float (&acc)[BD / 8], float& dbias, int64_t hx, int64_t n0,
                        int64_t d0, int c, int k) {
  const int nr = static_cast<int>(a.N - n0 < BM ? a.N - n0 : BM);
  for (int r = 0; r < nr; ++r) {
    dbias += s.z[r][c];
    axpy_features(acc, s.z[r][c], a.x, a.x_dtype, ((n0 + r) * a.Hx + hx) * a.D, d0, k, a.D);
  }
}

// dx_kernel (kGumbel), blocks of the first feature block, thread (row r, k) of row n < N after
// dlogit_items_gumbel: dy_h[n, h, k + 8 j] += sum_c dt[r][c] c[h, v0 + c, k + 8 j] (dy per head,
// (N, H, Dt): the host sums the heads when y has one). Each element has one thread: no atomics.
SSLFAST_HD void dy_tile(const Args& a, const Targets& t, const Smem& s, float* dyh, int64_t h, int64_t v0, int64_t n,
                        int r, int k) {
  const int nv = static_cast<int>(a.V - v0 < BV ? a.V - v0 : BV);
  const float* cw = t.c + (h * a.V + v0) * t.Dt;
  float* out = dyh + (n * a.H + h) * t.Dt;
  for (int64_t f = k; f < t.Dt; f += 8) {
    float acc = 0.0f;
    for (int c = 0; c < nv; ++c) acc = fmaf(s.q[r][c], cw[c * t.Dt + f], acc);
    out[f] += acc;
  }
}

// dw_kernel (kGumbel), blocks of the first feature block, thread (class c, k) of class v < V:
// dc[h, v, k + 8 j] += sum_r dt[r][c] y[n0 + r, hy, k + 8 j].
SSLFAST_HD void dc_tile(const Args& a, const Targets& t, const Smem& s, float* dc, int64_t h, int64_t hy, int64_t n0,
                        int64_t v, int c, int k) {
  const int nr = static_cast<int>(a.N - n0 < BM ? a.N - n0 : BM);
  const float* yr = t.y + (n0 * t.Hy + hy) * t.Dt;
  const int64_t stride = t.Hy * t.Dt;
  float* out = dc + (h * a.V + v) * t.Dt;
  for (int64_t f = k; f < t.Dt; f += 8) {
    float acc = 0.0f;
    for (int r = 0; r < nr; ++r) acc = fmaf(s.q[r][c], yr[r * stride + f], acc);
    out[f] += acc;
  }
}

}  // namespace mpl
}  // namespace sslfast
