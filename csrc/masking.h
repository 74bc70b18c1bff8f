// Span-masking math shared by the CPU (masking_cpu.cpp) and CUDA (masking_cuda.cu) kernels.
// The algorithm and its Philox counter layout are specified in sslfast/reference/masking.py;
// each function here is one step of it, so both backends return the reference's bits.
#pragma once

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
};

// Word c % 4 of philox(c / 4, row, stream): draw number c of a row's stream.
SSLFAST_HD uint32_t word_at(uint64_t seed, int64_t row, int64_t c, uint32_t stream) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(c >> 2), static_cast<uint32_t>(row), stream, 0u, seed);
  return r.w[c & 3];
}

// Sort key of position `pos` for "the k smallest keys" selections: (word, position).
SSLFAST_HD uint64_t rank_key(uint64_t seed, int64_t row, int64_t pos, uint32_t stream) {
  return (static_cast<uint64_t>(word_at(seed, row, pos, stream)) << kPosBits) | static_cast<uint64_t>(pos);
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

}  // namespace masking
}  // namespace sslfast
