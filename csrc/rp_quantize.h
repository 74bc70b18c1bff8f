// Shared math of random-projection quantization (BEST-RQ labels) and nearest-codeword
// (k-means) assignment, used by the CPU kernels (rp_quantize_cpu.cpp) and the CUDA kernels
// (rp_quantize_cuda.cu).
//
// Every backend scores codeword v of head h against the row's (projected) vector y as
//     score_v = dot(y, c_v) * a_v + b_v
// with (a_v, b_v) from codeword_coeffs(|c_v|^2): cosine a = 1 / max(|c_v|, eps), b = 0 (y is
// unit-normalised first), l2 a = 2, b = -|c_v|^2 (argmin |y - c|^2 without the constant |y|^2),
// and keeps the running best with better(): the highest score, ties to the lowest index.
// (The CPU kernel folds a_v into its transposed codeword panels and starts each dot product at
// b_v: the same score up to fp32 rounding, see rp_quantize_cpu.cpp.)
// One formula for both metrics keeps a later soft path (softmax of score / tau over V) on the
// same tiles.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "sslfast/common.h"
#include "sslfast/dtype.h"
#include "sslfast/launch.h"

namespace sslfast {
namespace rpq {

enum Metric : int { kCosine = 0, kL2 = 1 };

// F.normalize's eps: a zero vector stays zero (so an all-zero row scores 0 everywhere and its
// label is 0, the lowest index).
constexpr float kNormEps = 1e-12f;
// torch.nn.LayerNorm's default eps, the one NeMo and lucidrains use.
constexpr float kLayerNormEps = 1e-5f;

// One call's problem as both the CPU and the CUDA kernels read it (from the binding's raw
// arguments): x contiguous (B, T, F) of x_dtype, stacked k frames per row, rows = B * (T // k);
// proj fp32 (F*k, H*d) or null (then y is the row itself: H = 1, d = F*k); codebooks
// contiguous (H, V, d) of cb_dtype; mask uint8 (rows,) or null; out int64 (rows, H).
struct Problem {
  const void* x;
  int x_dtype;
  int64_t B, T, F, k, rows_per_seq, rows, in_dim;
  const float* proj;
  const void* cb;
  int cb_dtype;
  int64_t H, V, d;
  bool layernorm;
  int metric;
  const uint8_t* mask;
  int64_t* out;
  int64_t smem_per_warp;  // CUDA only: floats of shared memory each warp stages
};

inline Problem make_problem(std::uintptr_t x, int x_dtype, int64_t B, int64_t T, int64_t F, int64_t k,
                            std::uintptr_t proj, std::uintptr_t cb, int cb_dtype, int64_t H, int64_t V, int64_t d,
                            bool layernorm, int metric, std::uintptr_t mask, std::uintptr_t out) {
  Problem p;
  p.x = reinterpret_cast<const void*>(x);
  p.x_dtype = x_dtype;
  p.B = B;
  p.T = T;
  p.F = F;
  p.k = k;
  p.rows_per_seq = T / k;
  p.rows = B * p.rows_per_seq;
  p.in_dim = F * k;
  p.proj = proj ? reinterpret_cast<const float*>(proj) : nullptr;
  p.cb = reinterpret_cast<const void*>(cb);
  p.cb_dtype = cb_dtype;
  p.H = H;
  p.V = V;
  p.d = d;
  p.layernorm = layernorm;
  p.metric = metric;
  p.mask = mask ? reinterpret_cast<const uint8_t*>(mask) : nullptr;
  p.out = reinterpret_cast<int64_t*>(out);
  p.smem_per_warp = p.in_dim + (p.proj != nullptr ? H * d : 0);
  return p;
}


// Element offset of stacked row n in a contiguous (B, T, F) input: row n is frames
// t*k .. t*k+k-1 of sequence b (n = b * rows_per_seq + t), which are contiguous, so stacking
// needs no copy; the trailing T - rows_per_seq * k frames of each sequence are never read.
SSLFAST_HD int64_t stacked_row_offset(int64_t n, int64_t rows_per_seq, int64_t T, int64_t F, int64_t k) {
  const int64_t b = n / rows_per_seq;
  const int64_t t = n - b * rows_per_seq;
  return b * T * F + t * k * F;
}

// 1 / sqrt(var + eps) of LayerNorm from the centred sum of squares (biased variance).
SSLFAST_HD float layernorm_rstd(float centred_sumsq, int64_t len, float eps) {
  return 1.0f / sqrtf(centred_sumsq / static_cast<float>(len) + eps);
}

// The factor that unit-normalises a vector with squared norm sumsq, F.normalize style.
SSLFAST_HD float normalize_scale(float sumsq) {
  const float n = sqrtf(sumsq);
  return 1.0f / (n > kNormEps ? n : kNormEps);
}

// (a, b) of score = dot * a + b for a codeword with squared norm cc.
SSLFAST_HD void codeword_coeffs(float cc, int metric, float* a, float* b) {
  if (metric == kCosine) {
    *a = normalize_scale(cc);
    *b = 0.0f;
  } else {
    *a = 2.0f;
    *b = -cc;
  }
}

// Does (score, index) beat the running best? Higher score wins; equal scores go to the lower
// index (torch.argmax / numpy / jax). A NaN score never wins.
SSLFAST_HD bool better(float score, int64_t index, float best, int64_t best_index) {
  return score > best || (score == best && index < best_index);
}

// ---- rp_quantize_cuda.cu's per-lane phases: a warp owns stacked row n, lane `lane` takes
// elements lane, lane + kWarp, ...; the kernel reduces the lanes' results with shuffles between
// the phases (csrc/testing_cpu.cpp runs them for every lane on the host).
constexpr int kWarp = rp_quantize_launch::kWarp;
constexpr int64_t kNoIndex = INT64_MAX;  // no winner yet

// A masked row: label -1 for each head.
SSLFAST_HD void lane_masked_row(const Problem& p, int64_t n, int lane) {
  for (int64_t h = lane; h < p.H; h += kWarp) p.out[n * p.H + h] = -1;
}

// xs[i] = x[off + i] (as fp32) for the row's in_dim elements.
SSLFAST_HD void lane_stage_row(const Problem& p, int64_t off, int lane, float* xs) {
  for (int64_t i = lane; i < p.in_dim; i += kWarp) xs[i] = load_float(p.x, off + i, p.x_dtype);
}

// The lane's share of sum_i v[i] and of sum_i (v[i] - mean)^2.
SSLFAST_HD float lane_sum(const float* v, int64_t len, int lane) {
  float s = 0.0f;
  for (int64_t i = lane; i < len; i += kWarp) s += v[i];
  return s;
}

SSLFAST_HD float lane_centred_sumsq(const float* v, int64_t len, float mean, int lane) {
  float m2 = 0.0f;
  for (int64_t i = lane; i < len; i += kWarp) m2 += (v[i] - mean) * (v[i] - mean);
  return m2;
}

// v[i] = (v[i] - mean) * rstd (LayerNorm without affine).
SSLFAST_HD void lane_layernorm(float* v, int64_t len, float mean, float rstd, int lane) {
  for (int64_t i = lane; i < len; i += kWarp) v[i] = (v[i] - mean) * rstd;
}

// y[c] = sum_i xs[i] proj[i, c] over the lane's output columns c < H*d.
SSLFAST_HD void lane_project(const Problem& p, const float* xs, int lane, float* y) {
  const int64_t hd = p.H * p.d;
  for (int64_t c = lane; c < hd; c += kWarp) {
    float acc = 0.0f;
    for (int64_t i = 0; i < p.in_dim; ++i) acc += xs[i] * p.proj[i * hd + c];
    y[c] = acc;
  }
}

// The lane's share of sum_j v[j]^2, and v[j] *= s.
SSLFAST_HD float lane_sumsq(const float* v, int64_t len, int lane) {
  float ss = 0.0f;
  for (int64_t j = lane; j < len; j += kWarp) ss += v[j] * v[j];
  return ss;
}

SSLFAST_HD void lane_scale(float* v, int64_t len, float s, int lane) {
  for (int64_t j = lane; j < len; j += kWarp) v[j] *= s;
}

// The lane's running best (score, index) over codewords v = lane, lane + kWarp, ... of head h
// against the head's vector yh (score formula and tie rule at the top of this file).
SSLFAST_HD void lane_best_codeword(const Problem& p, const float* yh, int64_t h, int lane, float& best,
                                   int64_t& best_index) {
  const int64_t cb0 = h * p.V * p.d;
  for (int64_t v = lane; v < p.V; v += kWarp) {
    float dot = 0.0f, cc = 0.0f;
    for (int64_t j = 0; j < p.d; ++j) {
      const float c = load_float(p.cb, cb0 + v * p.d + j, p.cb_dtype);
      dot += yh[j] * c;
      cc += c * c;
    }
    float a, b;
    codeword_coeffs(cc, p.metric, &a, &b);
    const float s = dot * a + b;
    if (better(s, v, best, best_index)) {
      best = s;
      best_index = v;
    }
  }
}

// A shuffle step of the kernel's winner reduction: the other lane's (score, index) replaces the
// running best when it is better().
SSLFAST_HD void merge_best(float other, int64_t other_index, float& best, int64_t& best_index) {
  if (better(other, other_index, best, best_index)) {
    best = other;
    best_index = other_index;
  }
}

// The head's label: only NaN scores everywhere leave no winner, label 0 as on the CPU.
SSLFAST_HD int64_t label_of(int64_t best_index) { return best_index == kNoIndex ? 0 : best_index; }

}  // namespace rpq
}  // namespace sslfast
