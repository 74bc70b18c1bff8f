// Masked-prediction loss (HuBERT, BEST-RQ): the per-logit and per-row math shared by the C++
// CPU kernels (csrc/masked_prediction_cpu.cpp) and the CUDA kernels
// (csrc/masked_prediction_cuda.cu).
//
// The problem both solve, per head h: rows x_n (D), class vectors W_v (D), logits
// z_v = scale * <x_n, W_v> + b_v for v < V; target y (y < 0: ignored row). With label
// smoothing eps (torch's cross_entropy definition) the row's loss is
//     lse(z) - (1 - eps) z_y - eps / V * sum_v z_v
// and dloss/dz_v = softmax(z)_v - (1 - eps) [v == y] - eps / V. The kernels walk V in tiles
// with an online log-sum-exp (never a row of N x V logits in memory); the gradient pass
// recomputes the logits of a tile from the row's lse (the Cut Cross-Entropy approach).
#pragma once

#include <cmath>
#include <cstdint>

#include "sslfast/common.h"

namespace sslfast {
namespace mpl {

// Online state of one row: running max m and sum l of exp(z - m), the target's logit zy,
// the sum of all logits (label smoothing).
struct RowState {
  float m;
  float l;
  float zy;
  float zsum;
};

SSLFAST_HD RowState row_init() { return RowState{-INFINITY, 0.0f, 0.0f, 0.0f}; }

SSLFAST_HD float logit(float dot, float scale, float bias) { return scale * dot + bias; }

// Folds the logits z[0..n) of classes v0..v0+n into the row state. Two sweeps over the tile
// (max, then sum) rescale the running sum once per tile, not once per class.
SSLFAST_HD void row_update(RowState& st, const float* z, int n, int64_t v0, int64_t target) {
  float tile_max = -INFINITY;
  float tile_sum = 0.0f;
  for (int j = 0; j < n; ++j) {
    tile_max = fmaxf(tile_max, z[j]);
    tile_sum += z[j];
    if (v0 + j == target) st.zy = z[j];
  }
  if (n == 0) return;
  const float m_new = fmaxf(st.m, tile_max);
  float sum = 0.0f;
  for (int j = 0; j < n; ++j) sum += expf(z[j] - m_new);
  st.l = st.l * expf(st.m - m_new) + sum;  // expf(-inf) = 0 on the first tile
  st.m = m_new;
  st.zsum += tile_sum;
}

// Merges the state of another slice of the same row's classes (the GPU kernels split V).
SSLFAST_HD RowState row_merge(const RowState& a, const RowState& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return a;
  return RowState{m, a.l * expf(a.m - m) + b.l * expf(b.m - m), a.zy + b.zy, a.zsum + b.zsum};
}

SSLFAST_HD float row_lse(const RowState& st) { return st.m + logf(st.l); }

// The row's loss; 0 for an ignored row (target < 0).
SSLFAST_HD float row_loss(const RowState& st, int64_t target, float eps, int64_t V) {
  if (target < 0) return 0.0f;
  return row_lse(st) - (1.0f - eps) * st.zy - (eps / static_cast<float>(V)) * st.zsum;
}

// fairseq's `correct`: the target's logit attains the row's maximum (ties favour the target).
SSLFAST_HD bool row_top(const RowState& st, int64_t target) { return target >= 0 && st.zy >= st.m; }

// g * dloss/dz for one logit of a row with log-sum-exp lse; g = 0 for ignored rows.
SSLFAST_HD float dlogit(float z, float lse, float g, bool is_target, float eps, float eps_over_v) {
  return g * (expf(z - lse) - (is_target ? 1.0f - eps : 0.0f) - eps_over_v);
}

}  // namespace mpl
}  // namespace sslfast
