// Span-masking math shared by the CPU (masking_cpu.cpp) and CUDA (masking_cuda.cu) kernels.
// The algorithm and its Philox counter layout are specified in sslfast/reference/masking.py;
// each function here is one step of it, so both backends return the reference's bits.
#pragma once

#include <cmath>

#include "sslfast/common.h"
#include "sslfast/philox.h"

namespace sslfast {
namespace masking {

// Stream tags of sslfast.random.Stream.
constexpr uint32_t kStreamCount = 1;
constexpr uint32_t kStreamLength = 2;
constexpr uint32_t kStreamStart = 3;
constexpr uint32_t kStreamEqualize = 4;
constexpr uint32_t kStreamDropout = 5;
constexpr uint64_t kPosBits = 31;
constexpr uint64_t kPosMask = (uint64_t(1) << kPosBits) - 1;

struct Params {
  int64_t B, T;
  double mask_prob;
  int64_t L;
  int64_t vmin;        // span length = vmin + #{k : thr[k] <= word}
  const int64_t* thr;  // n_thr uint32 thresholds of the length CDF (none for static spans)
  int64_t n_thr;
  int64_t min_masks;
  int require_same;
  double dropout;
  int hf;  // style: 0 fairseq, 1 Hugging Face
  uint64_t seed;
  int no_overlap;
  int64_t min_space;
};

// Word c % 4 of philox(c / 4, row, stream): draw number c of a row's stream.
SSLFAST_HD uint32_t word_at(uint64_t seed, int64_t row, int64_t c, uint32_t stream) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(c >> 2), static_cast<uint32_t>(row), stream, 0u, seed);
  return philox_word(r, c & 3);
}

// Sort key of position `pos` with Philox word `w`: smaller keys are picked first, positions
// break ties in the word.
SSLFAST_HD uint64_t key_of(uint32_t w, int64_t pos) {
  return (static_cast<uint64_t>(w) << kPosBits) | static_cast<uint64_t>(pos);
}

// Sort key of position `pos` for "the k smallest keys" selections: (word, position).
SSLFAST_HD uint64_t rank_key(uint64_t seed, int64_t row, int64_t pos, uint32_t stream) {
  return key_of(word_at(seed, row, pos, stream), pos);
}

// Rank of keys[i] among keys[0, n) (keys distinct; ~0 entries, the CUDA kernel's "not a
// candidate", rank last): the CUDA kernels select "the k smallest" by counting.
SSLFAST_HD int64_t rank_in(const uint64_t* keys, int64_t n, int64_t i) {
  const uint64_t k = keys[i];
  int64_t r = 0;
  for (int64_t j = 0; j < n; ++j) r += keys[j] < k ? 1 : 0;
  return r;
}

// Step 1: the row's span count (probabilistic rounding in fp64, then min_masks and HF's caps).
SSLFAST_HD int64_t span_count(const Params& p, int64_t b, int64_t sz) {
  const uint32_t w = philox4x32_10(0u, static_cast<uint32_t>(p.hf ? 0 : b), kStreamCount, 0u, p.seed).w[0];
  const double u = static_cast<double>(w) * (1.0 / 4294967296.0);
  int64_t n = static_cast<int64_t>(floor(p.mask_prob * static_cast<double>(sz) / static_cast<double>(p.L) + u));
  if (n < p.min_masks) n = p.min_masks;
  if (p.hf) {
    if (n * p.L > p.T) n = p.T / p.L;
    const int64_t room = sz - (p.L - 1) > 0 ? sz - (p.L - 1) : 0;
    if (n > room) n = room;
  }
  return n;
}

// Step 2: length of span i by inversion of the tabulated CDF.
SSLFAST_HD int64_t span_length(const Params& p, int64_t b, int64_t i) {
  if (p.n_thr == 0) return p.vmin;
  const int64_t w = word_at(p.seed, b, i, kStreamLength);
  int64_t v = p.vmin;
  for (int64_t k = 0; k < p.n_thr; ++k) v += (p.thr[k] <= w) ? 1 : 0;
  return v;
}

// fairseq: if every span has length 0, span 0 gets min(L, sz - 1).
SSLFAST_HD int64_t zero_length_fix(const Params& p, int64_t sz) { return p.L < sz - 1 ? p.L : sz - 1; }

// Step 2 for a whole row of n > 0 spans: lens[0, n) (span_length, then zero_length_fix when
// every span has length 0); returns the shortest.
SSLFAST_HD int64_t span_lengths(const Params& p, int64_t b, int64_t sz, int64_t n, int64_t* lens) {
  bool all_zero = true;
  for (int64_t i = 0; i < n; ++i) {
    lens[i] = span_length(p, b, i);
    all_zero = all_zero && lens[i] == 0;
  }
  if (n > 0 && all_zero) lens[0] = zero_length_fix(p, sz);
  int64_t min_len = INT64_MAX;
  for (int64_t i = 0; i < n; ++i) min_len = lens[i] < min_len ? lens[i] : min_len;
  return min_len;
}

// Step 3: the number R of candidate starts [0, R) given the shortest span `min_len`.
SSLFAST_HD int64_t start_range(const Params& p, int64_t sz, int64_t n, int64_t min_len) {
  if (n <= 0) return 0;
  if (p.hf) return sz - p.L + 1;
  if (sz - min_len <= n) min_len = sz - n - 1;
  return sz - min_len;
}

// Step 7: frames a row keeps under mask_dropout (numpy's rint: half to even).
SSLFAST_HD int64_t dropout_keep(const Params& p, int64_t count) {
  return count - static_cast<int64_t>(rint(static_cast<double>(count) * p.dropout));
}

// Integer in [0, n) from draw number c of the row's stream (n < 2^32).
SSLFAST_HD int64_t draw_below(uint64_t seed, int64_t row, int64_t c, uint32_t stream, int64_t n) {
  return static_cast<int64_t>((static_cast<uint64_t>(word_at(seed, row, c, stream)) * static_cast<uint64_t>(n)) >> 32);
}

// fairseq's no_overlap placement for one row (steps 3-5 when no_overlap): spans, longest
// first (`lens_desc`), go into free intervals chosen with probability proportional to their
// length among those with room for length + min_space; a start uniform in the interval;
// the interval's left part is kept if start - s - min_space >= min_len and its right part
// if e - start - length - min_space > min_len (fairseq's corrected condition); stop at the
// first span that fits nowhere. The interval list keeps fairseq's order (pop, then append
// left, right). Span i draws words 2i (interval) and 2i + 1 (start) of MASK_START. Where an
// interval fits the span exactly, numpy's randint(s, s) raises; here the start is s.
// `ps`, `pe` hold n + 1 intervals. Paints out[0, sz).
SSLFAST_HD void no_overlap_row(const Params& p, int64_t b, int64_t sz, int64_t n, const int64_t* lens_desc,
                               int64_t min_len, int64_t* ps, int64_t* pe, uint8_t* out) {
  int64_t parts = 1;
  ps[0] = 0;
  pe[0] = sz;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = lens_desc[i];
    int64_t total = 0;
    for (int64_t k = 0; k < parts; ++k) {
      const int64_t w = pe[k] - ps[k];
      if (w >= len + p.min_space) total += w;
    }
    if (total == 0) break;
    const int64_t x = draw_below(p.seed, b, 2 * i, kStreamStart, total);
    int64_t c = 0, acc = 0;
    for (int64_t k = 0; k < parts; ++k) {
      const int64_t w = pe[k] - ps[k];
      acc += (w >= len + p.min_space) ? w : 0;
      if (acc > x) {
        c = k;
        break;
      }
    }
    const int64_t s = ps[c], e = pe[c];
    for (int64_t k = c; k + 1 < parts; ++k) {
      ps[k] = ps[k + 1];
      pe[k] = pe[k + 1];
    }
    --parts;
    const int64_t room = e - len - s;
    const int64_t start = s + (room > 0 ? draw_below(p.seed, b, 2 * i + 1, kStreamStart, room) : 0);
    for (int64_t t = start; t < start + len && t < sz; ++t) out[t] = 1;
    if (start - s - p.min_space >= min_len) {
      ps[parts] = s;
      pe[parts] = start - p.min_space + 1;
      ++parts;
    }
    if (e - start - len - p.min_space > min_len) {
      ps[parts] = start + len + p.min_space;
      pe[parts] = e;
      ++parts;
    }
  }
}

// Insertion sort, descending (span lengths, longest first: n is a few dozen).
SSLFAST_HD void sort_desc(int64_t* a, int64_t n) {
  for (int64_t i = 1; i < n; ++i) {
    const int64_t v = a[i];
    int64_t j = i - 1;
    while (j >= 0 && a[j] < v) {
      a[j + 1] = a[j];
      --j;
    }
    a[j + 1] = v;
  }
}

// ---- The CUDA kernels' phases (masking_cuda.cu), one block per row: each phase is what one
// thread `tid` of `nt` does between two barriers, so the host can run a block by calling a
// phase for every tid in turn (sslfast._C._testing runs them against the reference).

constexpr uint64_t kFar = ~uint64_t(0);  // "not a candidate" key: ranks last

// What thread 0 of mask_rows_kernel decides for row b of length sz: the span count n, the
// span lengths lens[0, n), and the range R of candidate starts, or, with no_overlap, the
// painted row (R = 0). `scratch` holds 2 (n + 1) intervals.
struct RowPlan {
  int64_t n, R, sz;
};

SSLFAST_HD RowPlan row_plan(const Params& p, int64_t b, int64_t sz, int64_t* lens, int64_t* scratch, uint8_t* row) {
  const int64_t n = span_count(p, b, sz);
  const int64_t min_len = span_lengths(p, b, sz, n, lens);
  RowPlan plan{n, n > 0 ? start_range(p, sz, n, min_len) : 0, sz};
  if (p.no_overlap) {  // sequential by nature (fairseq's interval list): one thread per row
    sort_desc(lens, n);
    no_overlap_row(p, b, sz, n, lens, min_len, scratch, scratch + n + 1, row);
    plan.R = 0;
  }
  return plan;
}

// keys[s] = rank_key of every candidate start s < R of this thread.
SSLFAST_HD void row_keys(const Params& p, int64_t b, int64_t R, uint64_t* keys, int64_t tid, int64_t nt) {
  for (int64_t s = tid; s < R; s += nt) keys[s] = rank_key(p.seed, b, s, kStreamStart);
}

// Paints the span of every start of this thread whose key ranks among the n smallest (span
// i of the i-th smallest key); overlapping spans write the same byte.
SSLFAST_HD void row_paint(const RowPlan& plan, const uint64_t* keys, const int64_t* lens, uint8_t* row, int64_t tid,
                          int64_t nt) {
  for (int64_t s = tid; s < plan.R; s += nt) {
    const int64_t r = rank_in(keys, plan.R, s);
    if (r < plan.n) {
      const int64_t e = s + lens[r] < plan.sz ? s + lens[r] : plan.sz;
      for (int64_t t = s; t < e; ++t) row[t] = 1;
    }
  }
}

// Clears the padded frames of this thread (pad_row may be null) and returns how many of its
// frames stay masked.
SSLFAST_HD int64_t row_unpad_count(uint8_t* row, const uint8_t* pad_row, int64_t T, int64_t tid, int64_t nt) {
  int64_t c = 0;
  for (int64_t t = tid; t < T; t += nt) {
    if (pad_row && pad_row[t]) row[t] = 0;
    c += row[t];
  }
  return c;
}

// Smallest of the B row counts (thread 0 of mask_equalize_kernel).
SSLFAST_HD int64_t min_count(const int64_t* counts, int64_t B) {
  int64_t m = counts[0];
  for (int64_t i = 1; i < B; ++i) m = counts[i] < m ? counts[i] : m;
  return m;
}

// keep_smallest, phase 1: the keys of this thread's masked frames (kFar elsewhere).
SSLFAST_HD void keep_keys(const Params& p, int64_t b, const uint8_t* row, uint64_t* keys, uint32_t stream, int64_t tid,
                          int64_t nt) {
  for (int64_t t = tid; t < p.T; t += nt) keys[t] = row[t] ? rank_key(p.seed, b, t, stream) : kFar;
}

// keep_smallest, phase 2: unmask this thread's frames whose key is not among the `keep` smallest.
SSLFAST_HD void keep_drop(const Params& p, const uint64_t* keys, int64_t keep, uint8_t* row, int64_t tid, int64_t nt) {
  for (int64_t t = tid; t < p.T; t += nt)
    if (keys[t] != kFar && rank_in(keys, p.T, t) >= keep) row[t] = 0;
}

// The `keep` values of mask_equalize_kernel for a row of `count` masked frames given the
// batch minimum: the equalise step (require_same_masks; -1: none), then mask_dropout's (-1: none).
struct KeepPlan {
  int64_t equalize, dropout;
};

SSLFAST_HD KeepPlan keep_plan(const Params& p, int64_t count, int64_t batch_min) {
  KeepPlan k{-1, -1};
  if (p.require_same && count > batch_min) {
    k.equalize = batch_min;
    count = batch_min;
  }
  if (p.dropout > 0.0) k.dropout = dropout_keep(p, count);
  return k;
}

}  // namespace masking
}  // namespace sslfast
