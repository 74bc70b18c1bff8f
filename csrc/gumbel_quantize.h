// Gumbel-softmax vector quantizer: the per-element and per-row math shared by the C++ CPU
// kernels (gumbel_quantize_cpu.cpp) and the CUDA kernels (gumbel_quantize_cuda.cu).
//
// Layout: logits (N, G*V), codebook (G*V, d), row (n, g) = logits[n, g*V:(g+1)*V].
// The Gumbel noise of logits element (n, pos) is word pos % 4 of
// philox(c0 = pos / 4, c1 = n, c2 = Stream::GUMBEL, c3 = 0): one Philox call serves four
// consecutive positions, on every backend (sslfast/reference/gumbel_quantize.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "sslfast/common.h"
#include "sslfast/dtype.h"
#include "sslfast/philox.h"

namespace sslfast {
namespace gq {

constexpr uint32_t kStreamGumbel = 32;  // sslfast.random.Stream.GUMBEL
// 2^-24: excludes u == 0 (tl.rand's mapping returns it) and u == 1; 1 - 2^-24 is the
// largest float below 1, so the clamp is exact in every language.
constexpr float kULo = 5.9604644775390625e-08f;

// Gumbel(0, 1) from one Philox word. The two logs run in double and round once to float:
// float log implementations differ by an ulp between glibc, CUDA, Triton and torch, and a
// different ulp in the noise could flip an argmax between near-equal candidates.
SSLFAST_HD float gumbel_from_word(uint32_t w) {
  const double u = static_cast<double>(uint_to_open_uniform(w, kULo));
  return static_cast<float>(-log(-log(u)));
}

SSLFAST_HD float gumbel_at(uint64_t seed, int64_t row, int64_t pos) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(pos >> 2), static_cast<uint32_t>(row), kStreamGumbel, 0u,
                                  seed);
  return gumbel_from_word(philox_word(r, pos & 3));
}

// Running (max, first argmax) of a row: a later equal value never replaces the first.
struct MaxArg {
  float m;
  int64_t i;
};

SSLFAST_HD void maxarg_update(MaxArg& acc, float v, int64_t i) {
  if (v > acc.m || (v == acc.m && i < acc.i)) {
    acc.m = v;
    acc.i = i;
  }
}

// Gradient of one logit through softmax(y), y = x / scale_div: s * (a - sum(s a)) / scale_div.
SSLFAST_HD float softmax_grad(float s, float a, float sa, float scale_div) { return s * (a - sa) / scale_div; }

// Soft quantization (hard=False): one unnormalised weight of softmax((l + g) / tau) given the
// row maximum ym of l + g. Subtracting the max before the division keeps it finite for tiny
// tau and logits near the fp32 limit (the reference does the same).
SSLFAST_HD float tempered_weight(float y, float ym, float tau) { return expf((y - ym) / tau); }

// Soft codebook gradient plan: grad_codebook[g*V + v] = sum_n p[n, g, v] grad_q[n, g] is summed
// over fixed chunks of frames, each chunk into its own (G*V, d) fp32 partial, and the partials
// are added in chunk order. The chunks depend on N only (not on threads or blocks), so the
// sum is deterministic; at most kSoftMaxChunks partials bound the extra memory, and a chunk
// is a multiple of `align` frames (the kernel's row tile).
constexpr int64_t kSoftMinChunkRows = 64;
constexpr int64_t kSoftMaxChunks = 32;

SSLFAST_HD int64_t soft_chunk_rows(int64_t N, int64_t align) {
  int64_t rows = (N + kSoftMaxChunks - 1) / kSoftMaxChunks;
  rows = rows < kSoftMinChunkRows ? kSoftMinChunkRows : rows;
  return (rows + align - 1) / align * align;
}

SSLFAST_HD int64_t soft_num_chunks(int64_t N, int64_t align) {
  const int64_t rows = soft_chunk_rows(N, align);
  return (N + rows - 1) / rows;
}

}  // namespace gq
}  // namespace sslfast
