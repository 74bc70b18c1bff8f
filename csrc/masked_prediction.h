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
// recomputes the logits of a tile from the row's lse (the Cut Cross-Entropy approach).
#pragma once

#include <cmath>
#include <cstdint>

#include "sslfast/common.h"

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
    if (q[j] > st.qbest) st.qbest = q[j], st.zbest = z[j];
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

SSLFAST_HD float row_lse(const RowState& st) { return st.m + log_denominator(st.l, st.c); }

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

// g * dloss/dz for one logit of a row with log-sum-exp lse: mass * softmax - (1 - eps) q_v
// - eps / V; q_v the target probability (hard: 1 at the target, 0 elsewhere); g = 0 for
// ignored rows.
SSLFAST_HD float dlogit(float z, float lse, float g, float q, float mass, float eps, float eps_over_v) {
  return g * (mass * expf(z - lse) - (1.0f - eps) * q - eps_over_v);
}

// g * dloss/dq_v for a soft target.
SSLFAST_HD float dtarget(float z, float lse, float g, float eps) { return g * (1.0f - eps) * (lse - z); }

}  // namespace mpl
}  // namespace sslfast
