// In-batch InfoNCE / NT-Xent: the per-element and per-row math shared by the C++ CPU kernels
// (csrc/info_nce_cpu.cpp) and the CUDA kernels (csrc/info_nce_cuda.cu).
//
// The problem both solve: rows A (M, D), columns B (C, D), scores s_ij = scale * <A_i, B_j>.
// Row i's positive is column pos(i) = (i + pos_shift) mod pos_mod; with exclude_self the
// column j == i is no candidate (NT-Xent's self-similarity). Loss_i = lse_i - s_i,pos(i).
// Both kernels walk the score matrix tile by tile with an online log-sum-exp, so nothing
// N x N is ever stored; the backward recomputes each tile from the saved per-row statistics
// (flash-attention style): dL/ds_ij = g_i * (exp(s_ij - lse_i) - [j == pos(i)]). The forward
// saves lse_i in two parts, the max m_i and log l_i, and the backward takes
// exp((s_ij - m_i) - log l_i): their fp32 sum would be rounded to ulp(lse) (4.8e-7 at lse ~ 10),
// an error every softmax probability would carry (the key and temperature gradients were
// 7x the reference's error with a MoCo queue).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "sslfast/common.h"
#include "sslfast/dtype.h"

namespace sslfast {
namespace infonce {


SSLFAST_HD int64_t pos_col(int64_t row, int64_t pos_shift, int64_t pos_mod) { return (row + pos_shift) % pos_mod; }

SSLFAST_HD bool excluded(int64_t row, int64_t col, bool exclude_self) { return exclude_self && row == col; }

// Online log-sum-exp state of one row: running max m, running sum l of exp(s - m) with its
// compensation c (add_compensated: the sum is l - c), and the positive's score once its column
// has been seen.
struct RowState {
  float m;
  float l;
  float c;
  float pos;
};

SSLFAST_HD RowState row_init() { return RowState{-INFINITY, 0.0f, 0.0f, 0.0f}; }

// Folds the scores s[0..n) of columns col0..col0+n of `row` into the state. Two sweeps over
// the tile (max, then sum) rescale the running sum once per tile instead of once per column.
SSLFAST_HD void row_update(RowState& st, const float* s, int n, int64_t col0, int64_t row, int64_t pcol,
                           bool exclude_self) {
  float tile_max = -INFINITY;
  for (int j = 0; j < n; ++j) {
    if (excluded(row, col0 + j, exclude_self)) continue;
    tile_max = fmaxf(tile_max, s[j]);
    if (col0 + j == pcol) st.pos = s[j];
  }
  if (tile_max == -INFINITY) return;  // every column of the tile excluded
  const float m_new = fmaxf(st.m, tile_max);
  const float rescale = expf(st.m - m_new);  // expf(-inf) = 0 on the first tile
  st.l *= rescale;
  st.c *= rescale;
  for (int j = 0; j < n; ++j) {
    if (!excluded(row, col0 + j, exclude_self)) add_compensated(st.l, st.c, expf(s[j] - m_new));
  }
  st.m = m_new;
}

// The second part of the saved statistics: log l (lse = m + log l).
SSLFAST_HD float row_log_l(const RowState& st) { return log_denominator(st.l, st.c); }

// Loss_i = lse_i - s_pos, summed as (m - s_pos) + log(l): when the positive is the row's
// maximum the first term is exactly 0, so a loss far below ulp(m) keeps its digits (lse - s_pos
// would round it to a multiple of ulp(m), e.g. 9.5e-7 for 6.2e-7 at m = 1/0.07).
SSLFAST_HD float row_loss(const RowState& st) { return (st.m - st.pos) + log_denominator(st.l, st.c); }

// dL/ds for one score: g * (softmax - onehot(positive)), 0 for an excluded column; m and
// log_l are the row's saved statistics.
SSLFAST_HD float dscore(float s, float m, float log_l, float g, bool is_pos, bool is_excluded) {
  if (is_excluded) return 0.0f;
  return g * (expf((s - m) - log_l) - (is_pos ? 1.0f : 0.0f));
}

}  // namespace infonce
}  // namespace sslfast
