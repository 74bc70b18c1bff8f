// Negative sampling math shared by the CPU (negatives_cpu.cpp) and CUDA (negatives_cuda.cu)
// kernels. The semantics and the Philox counter layout are specified in
// sslfast/reference/negatives.py; every function here reproduces it bit for bit.
#pragma once

#include <cstring>

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

// ---- Pieces of the CUDA kernels (negatives_cuda.cu) that the host can run too: the
// one-pass kernel's mask counting and its draws, and the two-launch path's draw kernel, each
// as what one thread `tid` of `nt` does (sslfast._C._testing runs them for every tid).

SSLFAST_HD int popc32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

// 0x01 in every byte of x that is nonzero (mask bytes are bools, normally 0 or 1 already).
SSLFAST_HD uint32_t bytes_nonzero(uint32_t x) { return (((x & 0x7f7f7f7fu) + 0x7f7f7f7fu) | x) >> 7 & 0x01010101u; }

// scan_row's candidate rule on four frames at once (0x01 per candidate byte).
SSLFAST_HD uint32_t candidates4(uint32_t m, uint32_t p, int from_masked_only, bool has_pad) {
  if (from_masked_only) return m;
  return has_pad ? (m | (p ^ 0x01010101u)) : 0x01010101u;
}

// scan_row's candidate rule on flat frame f: 1 or 0.
SSLFAST_HD uint32_t candidate1(const uint8_t* mask, const uint8_t* pad, int from_masked_only, int64_t f) {
  const bool m = mask[f] != 0;
  return (m || (!from_masked_only && (pad == nullptr || pad[f] == 0))) ? 1u : 0u;
}

// Of the four 0x01/0x00 bytes of x, at flat frames [f, f + 4), how many lie below thr.
SSLFAST_HD int count_below(uint32_t x, int64_t f, int64_t thr) {
  if (f + 4 <= thr) return popc32(x);
  if (f >= thr) return 0;
  return popc32(x & ((1u << (8 * (thr - f))) - 1u));
}

// The prefix counts of one block: masked frames before `first`, candidates before `first`,
// before row b, before the end of row b, and in [0, end).
struct Prefix {
  int m_first, c_first, c_row, c_end, c_all;
};

SSLFAST_HD void add_frames(Prefix& a, uint32_t m, uint32_t c, int64_t f, int64_t first, int64_t row_base,
                           int64_t row_end) {
  a.m_first += count_below(m, f, first);
  a.c_first += count_below(c, f, first);
  a.c_row += count_below(c, f, row_base);
  a.c_end += count_below(c, f, row_end);
  a.c_all += popc32(c);
}

// The four 32-bit words of 16-byte word i of p (16-aligned): one vector load on the device.
SSLFAST_HD void load16(const uint8_t* p, int64_t i, uint32_t w[4]) {
#if defined(__CUDA_ARCH__)
  const uint4 x = reinterpret_cast<const uint4*>(p)[i];
  w[0] = x.x;
  w[1] = x.y;
  w[2] = x.z;
  w[3] = x.w;
#else
  std::memcpy(w, p + 16 * i, 16);
#endif
}

// Thread tid's share (of nt) of a block's Prefix over the flat frames [0, end): 16-byte
// loads over the aligned body, bytes over the rest (and everywhere when a pointer is not
// 16-aligned). The block's Prefix is the sum over its threads.
SSLFAST_HD Prefix count_prefix(const uint8_t* mask, const uint8_t* pad, int from_masked_only, int64_t end,
                               int64_t first, int64_t row_base, int64_t row_end, int64_t tid, int64_t nt) {
  Prefix a{0, 0, 0, 0, 0};
  const bool has_pad = pad != nullptr && !from_masked_only;
  const bool vec = (reinterpret_cast<uintptr_t>(mask) % 16 == 0) && (!has_pad || reinterpret_cast<uintptr_t>(pad) % 16 == 0);
  const int64_t body = vec ? end / 16 : 0;  // in 16-byte words
  for (int64_t i = tid; i < body; i += nt) {
    uint32_t ms[4], ps[4] = {0u, 0u, 0u, 0u};
    load16(mask, i, ms);
    if (has_pad) load16(pad, i, ps);
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int k = 0; k < 4; ++k) {
      const uint32_t m = bytes_nonzero(ms[k]);
      const uint32_t c = candidates4(m, has_pad ? bytes_nonzero(ps[k]) : 0u, from_masked_only, has_pad);
      add_frames(a, m, c, 16 * i + 4 * k, first, row_base, row_end);
    }
  }
  for (int64_t f = 16 * body + tid; f < end; f += nt) {
    const uint32_t m = mask[f] != 0;
    const uint32_t c = candidates4(m, has_pad ? (pad[f] != 0) : 0u, from_masked_only, has_pad) & 1u;
    add_frames(a, m, c, f, first, row_base, row_end);  // one frame: bytes 1..3 are 0
  }
  return a;
}

// The one-pass kernel's draws for frames [t0, t0 + chunk) of row b, thread tid of nt (nt is
// the chunk): own[f] = candidate rank of frame t0 + f, out_row[f] = its output row (-1: not a
// positive); hf: row_pos is row b's rank -> frame table and unmasked frames get -1 rows.
SSLFAST_HD void one_pass_draws(bool hf, uint64_t seed, int64_t T, int64_t K, int64_t Kc, int64_t b, int64_t t0,
                               int64_t row_start, int64_t n_row, int64_t total, const int32_t* own,
                               const int64_t* out_row, const int32_t* row_pos, int64_t* out, int64_t tid, int64_t nt) {
  const int64_t frames = T - t0 < nt ? T - t0 : nt;
  const int64_t width = K + Kc, kb = (K + 3) / 4, per_frame = kb + (Kc + 3) / 4;
  if (hf) {
    for (int64_t i = tid; i < frames * width; i += nt)
      if (out_row[i / width] < 0) out[(b * T + t0) * width + i] = -1;
  }
  for (int64_t i = tid; i < frames * per_frame; i += nt) {
    const int64_t f = i / per_frame, q = i % per_frame;
    const int64_t r = out_row[f];
    if (r < 0) continue;
    int64_t* row_out = out + r * width;
    if (hf)
      draw_block_hf_within(seed, K, T, b, t0 + f, n_row, own[f], row_pos, q, row_out);
    else if (q < kb)
      draw_block_packed(seed, K, Kc, b, t0 + f, row_start, n_row, total, own[f], 0, q, row_out);
    else
      draw_block_packed(seed, K, Kc, b, t0 + f, row_start, n_row, total, own[f], 1, q - kb, row_out + K);
  }
}

// Item i of the two-launch path's draw kernel: counter block q of frame i / per_frame, after
// negatives_scan_kernel (rank, mrank, pos: scan_row's tables of every row; ws64: counts[B],
// mcounts[B], row_end[B], mstart[B], total).
SSLFAST_HD void draw_item(int64_t B, int64_t T, int64_t K, int64_t Kc, int hf_layout, uint64_t seed,
                          const int32_t* rank, const int32_t* mrank, const int32_t* pos, const int64_t* ws64,
                          int64_t n_rows, int64_t* out, int64_t i) {
  const int64_t kb = (K + 3) / 4, kcb = (Kc + 3) / 4, per_frame = kb + kcb;
  if (i >= B * T * per_frame) return;
  const int64_t frame = i / per_frame, q = i % per_frame;
  const int64_t b = frame / T, t = frame % T;
  const int64_t width = K + Kc;
  const int64_t m = mrank[frame];
  if (m < 0) {
    if (hf_layout) {
      const int64_t j0 = q < kb ? 4 * q : K + 4 * (q - kb);
      const int64_t j1 =
          q < kb ? (4 * q + 4 < K ? 4 * q + 4 : K) : (K + 4 * (q - kb) + 4 < width ? K + 4 * (q - kb) + 4 : width);
      for (int64_t j = j0; j < j1; ++j) out[frame * width + j] = -1;
    }
    return;
  }
  const int64_t row = hf_layout ? frame : ws64[3 * B + b] + m;
  if (row >= n_rows) return;  // a caller's num_masked below mask.sum(): never write past the output
  const Batch p{B, T, K, Kc, hf_layout, seed, pos, ws64, ws64 + 2 * B, ws64[4 * B]};
  int64_t* row_out = out + row * width;
  if (q < kb)
    draw_block(p, b, t, rank[frame], 0, q, row_out);
  else
    draw_block(p, b, t, rank[frame], 1, q - kb, row_out + K);
}

// The row prefixes of negatives_scan_kernel (thread 0), after scan_row of every row:
// ws64[3B + b] = masked frames before row b, ws64[2B + b] = candidates up to row b
// (inclusive), ws64[4B] = all candidates.
SSLFAST_HD void scan_prefixes(int64_t B, int64_t* ws64) {
  const int64_t* counts = ws64;
  const int64_t* mcounts = ws64 + B;
  int64_t total = 0, masked = 0;
  for (int64_t b = 0; b < B; ++b) {
    ws64[3 * B + b] = masked;
    masked += mcounts[b];
    total += counts[b];
    ws64[2 * B + b] = total;
  }
  ws64[4 * B] = total;
}

}  // namespace negatives
}  // namespace sslfast
