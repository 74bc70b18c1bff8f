// Shared math of the wav2vec 2.0 contrastive loss (csrc/contrastive_cpu.cpp and
// csrc/contrastive_cuda.cu). The spec is sslfast/reference/contrastive.py.
//
// Per prediction row i the candidates are t_0 = y[pos_i] and t_k = y[neg_{i,k-1}]. The kernels
// never build the (N, K+1, D) candidates: the forward streams them, keeps an online
// log-sum-exp and saves only lse_i's two parts (RowStats); the backward recomputes each logit from (dot, norms) and
// turns it into two coefficients per (row, candidate):
//
//   grad t_k += alpha_k * x + beta_k * t_k,   grad x = sum_k alpha_k t_k - [|x| >= eps] (sum_k g_k c_k / nx^2) x
//
// so grad y can be accumulated either with atomics (GPU, fast) or, deterministically, by a
// segmented sum over the candidates of each target row (CPU always, GPU on request).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "sslfast/common.h"
#include "sslfast/dtype.h"
#include "sslfast/launch.h"


namespace sslfast {
namespace contrastive {

// PyTorch's cosine eps: each norm is clamped separately.
constexpr float kNormEps = 1e-8f;

enum NegMode : int { kNegNone = 0, kNegVector = 1, kNegIndex = 2 };
enum Precision : int { kFairseq = 0, kHF = 1 };

SSLFAST_HD float neg_inf() { return -INFINITY; }


// One call's problem: x (N, D), y (M, D) in storage S, negatives (N, K), positives (N,) or
// null (row i's positive is y[i]).
template <class S>
struct Args {
  const typename S::T* x;
  const typename S::T* y;
  const void* neg;
  int neg_itype;
  const void* pos;
  int pos_itype;
  int64_t N, M, D, K;
  float temperature;
  int neg_mode;
  int precision;
};

template <class S>
inline Args<S> make_args(std::uintptr_t x, std::uintptr_t y, std::uintptr_t neg, int neg_itype, std::uintptr_t pos,
                         int pos_itype, int64_t N, int64_t M, int64_t D, int64_t K, double temperature, int neg_mode,
                         int precision) {
  using T = typename S::T;
  return Args<S>{reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(y), reinterpret_cast<const void*>(neg),
                 neg_itype, pos ? reinterpret_cast<const void*>(pos) : nullptr, pos_itype, N, M, D, K,
                 static_cast<float>(temperature), neg_mode, precision};
}

// Calls f(F32{}), f(F16{}) or f(BF16{}) for a DType code.
template <class F>
inline void by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case static_cast<int>(DType::f32): f(F32{}); break;
    case static_cast<int>(DType::f16): f(F16{}); break;
    case static_cast<int>(DType::bf16): f(BF16{}); break;
    default: throw std::invalid_argument("sslfast contrastive: unknown dtype code " + std::to_string(dtype));
  }
}

SSLFAST_HD int64_t load_index(const void* p, int64_t i, int itype) {
  return itype == static_cast<int>(IType::i64) ? static_cast<const int64_t*>(p)[i]
                                               : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// Candidate k of row i: the positive (k == 0, the row itself when no positives are given) or
// negative k-1. Indices were range-checked in Python; the clamp only keeps a caller that
// skipped the check (torch.compile) from reading outside y.
SSLFAST_HD int64_t candidate_index(const void* neg, int neg_itype, const void* pos, int pos_itype, int64_t i,
                                   int64_t k, int64_t K, int64_t M) {
  int64_t j = k == 0 ? (pos ? load_index(pos, i, pos_itype) : i) : load_index(neg, i * K + (k - 1), neg_itype);
  return j < 0 ? 0 : (j >= M ? M - 1 : j);
}

SSLFAST_HD float clamped_norm(float sq) {
  const float n = sqrtf(sq);
  return n > kNormEps ? n : kNormEps;
}

// The norm's gradient flows only where the clamp is inactive (torch's clamp_min: self >= min).
SSLFAST_HD bool norm_active(float sq) { return sqrtf(sq) >= kNormEps; }

SSLFAST_HD float cosine(float dot, float nx, float nt) { return dot / (nx * nt); }

// fairseq divides in fp32 and casts once; Hugging Face casts, then divides in the storage dtype.
template <class S>
SSLFAST_HD float logit_from_cosine(float cos, float temperature, int precision) {
  if (precision == kFairseq) return S::round(cos / temperature);
  return S::round(S::round(cos) / temperature);
}

// Online log-sum-exp over one row's logits plus fairseq's accuracy bookkeeping.
struct RowState {
  float m;        // running max of finite logits
  float s;        // sum of exp(logit - m), compensated: the sum is s - c (add_compensated)
  float c;
  float logit0;   // the positive's logit
  float max_neg;  // max / min over the negatives' logits (masked ones are -inf)
  float min_neg;
};

SSLFAST_HD RowState row_init() { return RowState{neg_inf(), 0.0f, 0.0f, 0.0f, neg_inf(), INFINITY}; }

SSLFAST_HD void row_push(RowState& st, int64_t k, float logit) {
  if (k == 0) {
    st.logit0 = logit;
  } else {
    st.max_neg = logit > st.max_neg ? logit : st.max_neg;
    st.min_neg = logit < st.min_neg ? logit : st.min_neg;
  }
  if (logit == neg_inf()) return;
  if (logit > st.m) {
    const float rescale = expf(st.m - logit);  // 0 for the first finite logit
    st.s *= rescale;
    st.c *= rescale;
    add_compensated(st.s, st.c, 1.0f);
    st.m = logit;
  } else {
    add_compensated(st.s, st.c, expf(logit - st.m));
  }
}

// Merge two partial states over disjoint candidate sets (k == 0 in at most one of them).
SSLFAST_HD RowState row_merge(RowState a, const RowState& b, bool b_has_positive) {
  if (b_has_positive) a.logit0 = b.logit0;
  a.max_neg = b.max_neg > a.max_neg ? b.max_neg : a.max_neg;
  a.min_neg = b.min_neg < a.min_neg ? b.min_neg : a.min_neg;
  if (b.s == 0.0f) return a;
  if (a.s == 0.0f) {
    a.m = b.m;
    a.s = b.s;
    a.c = b.c;
    return a;
  }
  const float m = a.m > b.m ? a.m : b.m;
  const float ea = expf(a.m - m), eb = expf(b.m - m);
  a.s *= ea;
  a.c *= ea;
  add_compensated(a.s, a.c, b.s * eb);
  add_compensated(a.s, a.c, -b.c * eb);
  a.m = m;
  return a;
}

// What the forward saves per row for the backward: lse's two parts, the max m (stats[i]) and
// log s (stats[N + i]), kept apart and used as exp((logit - m) - log s). Their fp32 sum would
// round lse to ulp(lse) / 2, an error every recomputed probability carries (at logits near 30,
// 5x the reference's gradient error; the same fix as csrc/info_nce.h and
// csrc/masked_prediction.h).
struct RowStats {
  float m;
  float log_s;
};

SSLFAST_HD void save_row_stats(const RowState& st, float* stats, int64_t i, int64_t N) {
  stats[i] = st.m;
  stats[N + i] = log_denominator(st.s, st.c);
}

SSLFAST_HD RowStats load_row_stats(const float* stats, int64_t i, int64_t N) { return RowStats{stats[i], stats[N + i]}; }

// Cross-entropy with class 0, summed as (m - logit0) + log(s): exact 0 + log(s) when the positive
// is the maximum, so a loss far below ulp(m) is not rounded to a multiple of it (lse - logit0
// would be). A row with only -inf negatives gives m == logit0, s == 1: loss 0.
SSLFAST_HD float row_loss(const RowState& st) { return (st.m - st.logit0) + log_denominator(st.s, st.c); }

// argmax == 0 (torch returns the first maximum) and not argmin == 0 (first minimum).
SSLFAST_HD bool row_correct(const RowState& st) { return st.logit0 >= st.max_neg && st.min_neg < st.logit0; }

// Backward coefficients of candidate k (see the top of this file). g = dL/dcos_k.
struct CandidateGrad {
  float alpha;  // grad t_k += alpha * x; grad x += alpha * t_k
  float beta;   // grad t_k += beta * t_k (the candidate's own norm)
  float gc;     // g * cos, summed over k for the x-norm term
};

SSLFAST_HD CandidateGrad candidate_grad(float logit, RowStats rs, bool positive, float grad_row, float temperature,
                                        float cos, float nx, float nt_sq) {
  const float p = logit == neg_inf() ? 0.0f : expf((logit - rs.m) - rs.log_s);
  // d logit / d cos is 1 / temperature in both precision orders (the casts pass gradients through).
  const float g = grad_row * (p - (positive ? 1.0f : 0.0f)) / temperature;
  const float nt = clamped_norm(nt_sq);
  CandidateGrad out;
  out.alpha = g / (nx * nt);
  out.beta = norm_active(nt_sq) ? -g * cos / (nt * nt) : 0.0f;
  out.gc = g * cos;
  return out;
}

// Coefficient of x in grad x: only where |x| is above the clamp.
SSLFAST_HD float x_self_coefficient(float sum_gc, float nx_sq) {
  if (!norm_active(nx_sq)) return 0.0f;
  const float nx = clamped_norm(nx_sq);
  return -sum_gc / (nx * nx);
}

// ---- contrastive_cuda.cu's per-lane phases: a warp owns prediction row i (or target row j),
// lane `lane` takes columns d = lane, lane + kWarp, ...; the kernels reduce the lanes' results
// with shuffles between the phases (csrc/testing_cpu.cpp runs them for every lane on the host).
constexpr int kWarp = contrastive_launch::kWarp;

// The lane's share of dot(x_row, t) and |t|^2.
template <class S>
SSLFAST_HD void lane_dot_sq(const typename S::T* xr, const typename S::T* t, int64_t D, int lane, float& dot,
                            float& sq) {
  float a = 0.0f, b = 0.0f;
  for (int64_t d = lane; d < D; d += kWarp) {
    const float tv = S::load(t[d]);
    a += S::load(xr[d]) * tv;
    b += tv * tv;
  }
  dot = a;
  sq = b;
}

// The lane's share of |x_row|^2.
template <class S>
SSLFAST_HD float lane_sq(const typename S::T* xr, int64_t D, int lane) {
  float s = 0.0f;
  for (int64_t d = lane; d < D; d += kWarp) {
    const float v = S::load(xr[d]);
    s += v * v;
  }
  return s;
}

// Whether rows a and b differ in one of the lane's columns.
template <class S>
SSLFAST_HD int lane_rows_differ(const typename S::T* a, const typename S::T* b, int64_t D, int lane) {
  int differ = 0;
  for (int64_t d = lane; d < D; d += kWarp) differ |= S::load(a[d]) != S::load(b[d]);
  return differ;
}

// Forward: candidate k's logit (-inf when masked as a copy of the positive) pushed into the
// row's state, from its warp-reduced dot with x and squared norm; nx = |x| clamped.
template <class S>
SSLFAST_HD void push_candidate(const Args<S>& a, RowState& st, int64_t k, bool masked, float dot, float sq, float nx) {
  float logit = neg_inf();
  if (!masked) logit = logit_from_cosine<S>(cosine(dot, nx, clamped_norm(sq)), a.temperature, a.precision);
  row_push(st, k, logit);
}

// Backward: candidate k's (alpha, beta), 0 when masked; its g * cos added to sum_gc.
template <class S>
SSLFAST_HD void candidate_coeffs(const Args<S>& a, int64_t k, bool masked, float dot, float sq, float nx, RowStats rs,
                                 float grad_row, float& al, float& be, float& sum_gc) {
  al = 0.0f;
  be = 0.0f;
  if (!masked) {
    const float cos = cosine(dot, nx, clamped_norm(sq));
    const float logit = logit_from_cosine<S>(cos, a.temperature, a.precision);
    const CandidateGrad cg = candidate_grad(logit, rs, k == 0, grad_row, a.temperature, cos, nx, sq);
    al = cg.alpha;
    be = cg.beta;
    sum_gc += cg.gc;
  }
}

// grad x[i, d] = sum_k alpha[i, k] y[j_k, d] + cx x[i, d] over the lane's columns (candidates
// with alpha 0, masked or without weight, skipped).
template <class S>
SSLFAST_HD void lane_grad_x(const Args<S>& a, int64_t i, const float* __restrict__ alpha, float cx, int lane,
                            typename S::T* __restrict__ grad_x) {
  const int64_t D = a.D, K1 = a.K + 1;
  const typename S::T* xr = a.x + i * D;
  for (int64_t d = lane; d < D; d += kWarp) {
    float acc = 0.0f;
    for (int64_t k = 0; k < K1; ++k) {
      const float al = alpha[i * K1 + k];
      if (al == 0.0f) continue;
      const int64_t j = candidate_index(a.neg, a.neg_itype, a.pos, a.pos_itype, i, k, a.K, a.M);
      acc += al * S::load(a.y[j * D + d]);
    }
    grad_x[i * D + d] = S::store(acc + cx * S::load(xr[d]));
  }
}

// Deterministic grad y: the betas of target row j's CSR segment [start, end) of candidate
// entries (order: entries i * K1 + k sorted by target row), in order ...
SSLFAST_HD float segment_beta_sum(const float* __restrict__ beta, const int64_t* __restrict__ order, int64_t start,
                                  int64_t end) {
  float bsum = 0.0f;
  for (int64_t e = start; e < end; ++e) bsum += beta[order[e]];
  return bsum;
}

// ... and grad y[j, d] = sum_e alpha_e x[i_e, d] + bsum y[j, d] over the lane's columns.
template <class S>
SSLFAST_HD void lane_segment_grad(const typename S::T* __restrict__ x, const typename S::T* __restrict__ y,
                                  const float* __restrict__ alpha, const int64_t* __restrict__ order, int64_t start,
                                  int64_t end, int64_t j, int64_t D, int64_t K1, float bsum, int lane,
                                  typename S::T* __restrict__ grad_y) {
  for (int64_t d = lane; d < D; d += kWarp) {
    float acc = 0.0f;
    for (int64_t e = start; e < end; ++e) {
      const int64_t ent = order[e];
      const float al = alpha[ent];
      if (al != 0.0f) acc += al * S::load(x[(ent / K1) * D + d]);
    }
    grad_y[j * D + d] = S::store(acc + bsum * S::load(y[j * D + d]));
  }
}

}  // namespace contrastive
}  // namespace sslfast
