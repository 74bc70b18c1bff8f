// Negative sampling math shared by the CPU (negatives_cpu.cpp) and CUDA (negatives_cuda.cu)
// kernels. The semantics and the Philox counter layout are specified in
// sslfast/reference/negatives.py; every function here reproduces it bit for bit.
#pragma once

#include "sslfast/common.h"
#include "sslfast/philox.h"

namespace sslfast {
namespace negatives {

// Stream tags of sslfast.random.Stream.
constexpr uint32_t kStreamNegatives = 16;
constexpr uint32_t kStreamCrossNegatives = 17;

// One row's candidate bookkeeping: rank[t] = rank of frame t among the row's candidates,
// mrank[t] = rank among its masked frames (-1 where not masked), pos[r] = frame of the r-th
// candidate. Returns the candidate count in *n_cand and the masked count in *n_mask.
// Candidates: masked frames, or (from_masked_only == 0) every frame that is masked or not padding.
SSLFAST_HD void scan_row(const uint8_t* mask, const uint8_t* pad, int from_masked_only, int64_t T, int32_t* rank,
                         int32_t* mrank, int32_t* pos, int64_t* n_cand, int64_t* n_mask) {
  int32_t nc = 0, nm = 0;
  for (int64_t t = 0; t < T; ++t) {
    const bool m = mask[t] != 0;
    const bool c = m || (!from_masked_only && (pad == nullptr || pad[t] == 0));
    rank[t] = c ? nc : -1;
    mrank[t] = m ? nm : -1;
    if (c) pos[nc++] = static_cast<int32_t>(t);
    if (m) ++nm;
  }
  *n_cand = nc;
  *n_mask = nm;
}

// Uniform over [0, n) without `own` (the shift of fairseq / HF); `own` when n <= 1.
SSLFAST_HD int64_t shifted_draw(uint32_t word, int64_t n, int64_t own) {
  if (n <= 1) return own;
  const int64_t d = static_cast<int64_t>((static_cast<uint64_t>(word) * static_cast<uint64_t>(n - 1)) >> 32);
  return d + (d >= own ? 1 : 0);
}

// First row whose exclusive end passes global candidate rank g (row_end is inclusive prefix).
SSLFAST_HD int64_t row_of(const int64_t* row_end, int64_t B, int64_t g) {
  int64_t lo = 0, hi = B - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (row_end[mid] > g) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// The packed-layout index of one draw `w` for a positive of candidate rank `own` in a row
// whose candidates are the packed ranks [row_start, row_start + n_row) of `total`: within the
// row (cross = 0) or across the batch (cross = 1). Needs no candidate table, only counts.
SSLFAST_HD int64_t packed_index(int64_t row_start, int64_t n_row, int64_t total, int64_t own, int cross,
                                uint32_t w) {
  if (!cross) return row_start + shifted_draw(w, n_row, own);
  return shifted_draw(w, total, row_start + own);
}

// The four Philox words of counter block q of positive (b, t) in stream `cross`, for `count`
// draws per positive (the layout of sslfast/reference/negatives.py).
SSLFAST_HD Philox4 draw_words(uint64_t seed, int64_t count, int64_t b, int64_t t, int cross, int64_t q) {
  const int64_t blocks = (count + 3) / 4;
  return philox4x32_10(static_cast<uint32_t>(t * blocks + q), static_cast<uint32_t>(b),
                       cross ? kStreamCrossNegatives : kStreamNegatives, 0u, seed);
}

struct Batch {
  int64_t B, T, K, Kc;
  int hf_layout;
  uint64_t seed;
  const int32_t* pos;      // (B, T) candidate frames per row
  const int64_t* counts;   // (B,) candidates per row
  const int64_t* row_end;  // (B,) inclusive prefix of counts
  int64_t total;           // candidates in the batch
};

// The index of one draw `w` for positive (b, t) whose candidate rank is `own`: within the
// row (cross = 0) or across the batch (cross = 1), in the packed or the hf layout.
SSLFAST_HD int64_t negative_index(const Batch& p, int64_t b, int64_t own, int cross, uint32_t w) {
  const int64_t start = p.row_end[b] - p.counts[b];
  if (!p.hf_layout) return packed_index(start, p.counts[b], p.total, own, cross, w);
  if (!cross) return b * p.T + p.pos[b * p.T + shifted_draw(w, p.counts[b], own)];
  const int64_t g = shifted_draw(w, p.total, start + own);
  const int64_t b2 = row_of(p.row_end, p.B, g);
  return b2 * p.T + p.pos[b2 * p.T + (g - (p.row_end[b2] - p.counts[b2]))];
}

// The negatives of one counter block of one positive (b, t): draws j in [4q, 4q + 4) of
// stream `cross` (0: within-utterance, K of them; 1: cross-sample, Kc of them), written to
// out[j] (out points at the positive's first within-utterance entry for cross = 0 and at its
// first cross-sample entry for cross = 1).
SSLFAST_HD void draw_block(const Batch& p, int64_t b, int64_t t, int64_t own, int cross, int64_t q, int64_t* out) {
  const int64_t count = cross ? p.Kc : p.K;
  const Philox4 r = draw_words(p.seed, count, b, t, cross, q);
  for (int k = 0; k < 4; ++k) {
    const int64_t j = 4 * q + k;
    if (j >= count) break;
    out[j] = negative_index(p, b, own, cross, r.w[k]);
  }
}

// draw_block of the packed layout from the row's counts alone (no Batch, no candidate table):
// what the single-launch CUDA kernel calls, each block having derived the counts itself.
SSLFAST_HD void draw_block_packed(uint64_t seed, int64_t K, int64_t Kc, int64_t b, int64_t t, int64_t row_start,
                                  int64_t n_row, int64_t total, int64_t own, int cross, int64_t q, int64_t* out) {
  const int64_t count = cross ? Kc : K;
  const Philox4 r = draw_words(seed, count, b, t, cross, q);
  for (int k = 0; k < 4; ++k) {
    const int64_t j = 4 * q + k;
    if (j >= count) break;
    out[j] = packed_index(row_start, n_row, total, own, cross, r.w[k]);
  }
}

// draw_block of the hf layout for within-row draws (cross = 0) given the row's own
// rank -> frame table `row_pos` (T entries): frame indices b * T + row_pos[rank].
SSLFAST_HD void draw_block_hf_within(uint64_t seed, int64_t K, int64_t T, int64_t b, int64_t t, int64_t n_row,
                                     int64_t own, const int32_t* row_pos, int64_t q, int64_t* out) {
  const Philox4 r = draw_words(seed, K, b, t, 0, q);
  for (int k = 0; k < 4; ++k) {
    const int64_t j = 4 * q + k;
    if (j >= K) break;
    out[j] = b * T + row_pos[shifted_draw(r.w[k], n_row, own)];
  }
}

}  // namespace negatives
}  // namespace sslfast
