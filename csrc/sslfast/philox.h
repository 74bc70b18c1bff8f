// Philox4x32-10 (Salmon et al., SC'11), the counter-based generator behind every random op.
//
// The bit layout matches Triton's `tl.philox(seed, c0, c1, c2, c3)` (kernels/philox.py) and
// the PyTorch implementation in sslfast/random.py: key = (seed & 0xffffffff, seed >> 32),
// counter = (c0, c1, c2, c3), 10 rounds, round multipliers 0xD2511F53 / 0xCD9E8D57, key
// increments 0x9E3779B9 / 0xBB67AE85. Because the three agree bit for bit, one seed gives
// the same masks, negatives and noise on every backend.
//
// Counter convention (see sslfast/random.py): c0 = position inside the row, c1 = row,
// c2 = stream tag (which draw of which op), c3 = 0.
#pragma once

#include "common.h"

namespace sslfast {

struct Philox4 {
  uint32_t w[4];
};

SSLFAST_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

SSLFAST_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                 uint64_t seed) {
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffu);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t a = c0, b = c2;
    c0 = mulhi32(0xCD9E8D57u, b) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, a) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * b;
    c3 = 0xD2511F53u * a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The key a kernel draws with: the seed tensor's 64 bits when the caller passed one
// (`seed_ptr`, read on the device when the kernel runs, so a captured CUDA graph replays with
// the tensor's current value and no host ever reads it), else the value argument. Host-side
// Python: `sslfast.random.seed_args` gives (value, pointer). Every kernel that draws takes
// both and calls this once, before its first draw.
SSLFAST_HD uint64_t load_seed(const int64_t* seed_ptr, uint64_t seed) {
  return seed_ptr != nullptr ? static_cast<uint64_t>(*seed_ptr) : seed;
}

// Word k (0..3) of r. Selects instead of indexing: a runtime index into r.w would put r in
// local memory (a stack frame) in CUDA kernels.
SSLFAST_HD uint32_t philox_word(const Philox4& r, int64_t k) {
  return k == 0 ? r.w[0] : (k == 1 ? r.w[1] : (k == 2 ? r.w[2] : r.w[3]));
}

// A 32-bit word to a float in [0, 1), the way Triton's tl.rand does it: reinterpret as
// int32, complement negatives, scale by 4.6566127342e-10. The result can be exactly 0.
SSLFAST_HD float uint_to_uniform(uint32_t x) {
  int32_t i = static_cast<int32_t>(x);
  i = i < 0 ? ~i : i;
  return static_cast<float>(i) * 4.6566127342e-10f;
}

// Uniform in [lo, 1 - lo]: for -log(-log(u)) and log(u), which must never see 0 or 1.
SSLFAST_HD float uint_to_open_uniform(uint32_t x, float lo) {
  const float u = uint_to_uniform(x);
  return u < lo ? lo : (u > 1.0f - lo ? 1.0f - lo : u);
}

// Unbiased-enough integer in [0, n) for n < 2^32: the high word of a 32x32 product
// (Lemire's multiply-shift without the rejection step; bias below n / 2^32).
SSLFAST_HD uint32_t uint_below(uint32_t x, uint32_t n) { return mulhi32(x, n); }

}  // namespace sslfast
