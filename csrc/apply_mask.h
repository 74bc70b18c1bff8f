// Mask-filling math shared by the CPU (apply_mask_cpu.cpp) and CUDA (apply_mask_cuda.cu)
// kernels. The semantics and the noise layout are specified in sslfast/reference/apply_mask.py:
// frame (b, t) owns Philox blocks t * ceil(D / 4) + q of philox(., b, MASK_NOISE, 0); block q
// gives channels 4q .. 4q + 3 by Box-Muller in fp32.
#pragma once

#include <cmath>

#include "sslfast/common.h"
#include "sslfast/dtype.h"
#include "sslfast/philox.h"

namespace sslfast {
namespace apply_mask {

constexpr uint32_t kStreamMaskNoise = 24;  // sslfast.random.Stream.MASK_NOISE
constexpr float kTwoPi = 6.28318530717958647692f;  // fp32(2 pi), as the reference multiplies
constexpr float kOpenLo = 2.3283064365386962890625e-10f;  // 2^-32: log(u) stays finite

// Frames per partial sum of the embedding gradient. Fixed (not per thread) so that the
// reduction order, hence the bits, do not depend on the thread count.
constexpr int64_t kGradChunk = 64;

// One Box-Muller pair from a radius word and an angle word: (r cos a, r sin a).
SSLFAST_HD void box_muller(uint32_t w_radius, uint32_t w_angle, float* c, float* s) {
  const float u = uint_to_open_uniform(w_radius, kOpenLo);
  const float r = sqrtf(-2.0f * logf(u));
  float sn, cs;
#if defined(__CUDA_ARCH__)
  // sincospif of the angle in half turns: no large-argument reduction, whose local array
  // gave the kernels a stack frame (sincosf cannot know the angle is below 2 pi)
  sincospif(2.0f * uint_to_uniform(w_angle), &sn, &cs);
#else
  const float a = uint_to_uniform(w_angle) * kTwoPi;
  sn = std::sin(a);
  cs = std::cos(a);
#endif
  *c = r * cs;
  *s = r * sn;
}

// The four N(0, 1) values of one Philox block's words w[0..3] (channels 4q .. 4q + 3 of the
// block's frame).
SSLFAST_HD void normal4_from(const uint32_t w[4], float z[4]) {
  box_muller(w[0], w[1], &z[0], &z[1]);
  box_muller(w[2], w[3], &z[2], &z[3]);
}

// The words of Philox block q of frame (b, t).
SSLFAST_HD Philox4 noise_block(uint64_t seed, int64_t b, int64_t t, int64_t blocks_per_frame, int64_t q) {
  return philox4x32_10(static_cast<uint32_t>(t * blocks_per_frame + q), static_cast<uint32_t>(b), kStreamMaskNoise,
                       0u, seed);
}

// Channels [4q, min(4q + 4, D)) of one masked frame from the block's words: noise std * z.
// `row` points at the frame's channel 0, channels `stride` elements apart.
template <class S>
SSLFAST_HD void noise_block_store(typename S::T* row, int64_t stride, int64_t D, int64_t q, const uint32_t w[4],
                                  float std) {
  const int64_t d0 = 4 * q;
  const int n = D - d0 < 4 ? static_cast<int>(D - d0) : 4;
  float z[4];
  normal4_from(w, z);
  // a fixed trip count, unrolled: z stays in registers (a runtime bound put it on the stack)
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < 4; ++k)
    if (k < n) row[(d0 + k) * stride] = S::store(z[k] * std);
}

// Channels [4q, min(4q + 4, D)) of one masked frame: noise std * z (fill == nullptr) or the
// embedding (already in x's dtype, so a copy).
template <class S>
SSLFAST_HD void fill_block(typename S::T* row, int64_t stride, int64_t D, int64_t q, const typename S::T* fill,
                           float std, uint64_t seed, int64_t b, int64_t t) {
  if (fill != nullptr) {
    const int64_t d0 = 4 * q;
    const int n = D - d0 < 4 ? static_cast<int>(D - d0) : 4;
    for (int k = 0; k < n; ++k) row[(d0 + k) * stride] = fill[d0 + k];
    return;
  }
  const Philox4 r = noise_block(seed, b, t, (D + 3) / 4, q);
  noise_block_store<S>(row, stride, D, q, r.w, std);
}

// Strides of a (B, T, D) tensor in elements.
struct Strides {
  int64_t b, t, d;
};

// ---- apply_mask_cuda.cu's threads (csrc/testing_cpu.cpp runs them on the host).

// Forward, work item i = (frame f, channel block q of 4): a masked frame's block gets the fill
// or the noise, an unmasked frame's block is copied from x (nothing to do in place).
template <class S>
SSLFAST_HD void forward_item(const typename S::T* x, Strides sx, typename S::T* out, Strides so, const uint8_t* mask,
                             const typename S::T* fill, int64_t T, int64_t D, float std, uint64_t seed, bool inplace,
                             int64_t i) {
  const int64_t qb = (D + 3) / 4;
  const int64_t f = i / qb, q = i % qb;
  const int64_t b = f / T, t = f % T;
  typename S::T* o = out + b * so.b + t * so.t;
  if (mask[f]) {
    fill_block<S>(o, so.d, D, q, fill, std, seed, b, t);
  } else if (!inplace) {
    const typename S::T* xi = x + b * sx.b + t * sx.t;
    const int64_t d_end = 4 * q + 4 < D ? 4 * q + 4 : D;
    for (int64_t d = 4 * q; d < d_end; ++d) o[d * so.d] = xi[d * sx.d];
  }
}

// Backward, channel d of chunk c (frames [c kGradChunk, ...) of the n = B T): grad_x (zero on
// masked frames, grad elsewhere) and, with `partial`, the chunk's fp32 sum of grad over the
// masked frames in frame order.
template <class S>
SSLFAST_HD void backward_item(const typename S::T* g, Strides sg, typename S::T* gx, const uint8_t* mask, int64_t T,
                              int64_t D, int64_t n, float* partial, int64_t c, int64_t d) {
  const int64_t f0 = c * kGradChunk;
  const int64_t f1 = f0 + kGradChunk < n ? f0 + kGradChunk : n;
  float acc = 0.0f;
  for (int64_t f = f0; f < f1; ++f) {
    const int64_t b = f / T, t = f % T;
    const bool m = mask[f] != 0;
    if (m) {
      if (partial) acc += S::load(g[b * sg.b + t * sg.t + d * sg.d]);
      if (gx) gx[f * D + d] = S::store(0.0f);
    } else if (gx) {
      gx[f * D + d] = g[b * sg.b + t * sg.t + d * sg.d];
    }
  }
  if (partial) partial[c * D + d] = acc;
}

// Channel d of the embedding gradient: the chunks' partials added in chunk order.
SSLFAST_HD float sum_partials(const float* partial, int64_t chunks, int64_t D, int64_t d) {
  float s = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * D + d];
  return s;
}

}  // namespace apply_mask
}  // namespace sslfast
