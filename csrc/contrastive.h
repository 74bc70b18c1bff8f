// Shared math of the wav2vec 2.0 contrastive loss (csrc/contrastive_cpu.cpp and
// csrc/contrastive_cuda.cu). The spec is sslfast/reference/contrastive.py.
//
// Per prediction row i the candidates are t_0 = y[pos_i] and t_k = y[neg_{i,k-1}]. The kernels
// never build the (N, K+1, D) candidates: the forward streams them, keeps an online
// log-sum-exp and saves only lse_i; the backward recomputes each logit from (dot, norms) and
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

SSLFAST_HD float row_lse(const RowState& st) { return st.m + log_denominator(st.s, st.c); }

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

SSLFAST_HD CandidateGrad candidate_grad(float logit, float lse, bool positive, float grad_row, float temperature,
                                        float cos, float nx, float nt_sq) {
  const float p = logit == neg_inf() ? 0.0f : expf(logit - lse);
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

}  // namespace contrastive
}  // namespace sslfast
