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
#include "sslfast/philox.h"

namespace sslfast {
namespace gq {

constexpr uint32_t kStreamGumbel = 32;  // sslfast.random.Stream.GUMBEL
// 2^-24: excludes u == 0 (tl.rand's mapping returns it) and u == 1; 1 - 2^-24 is the
// largest float below 1, so the clamp is exact in every language.
constexpr float kULo = 5.9604644775390625e-08f;

template <typename To, typename From>
SSLFAST_HD void memcpy_bits(To* dst, const From* src) {
  static_assert(sizeof(To) == sizeof(From), "bit copy between types of one size");
  memcpy(dst, src, sizeof(To));
}

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
  return gumbel_from_word(r.w[pos & 3]);
}

// Storage <-> fp32. Bit manipulation instead of intrinsics so the host build needs no
// CUDA headers; round-to-nearest-even on the way down, like torch's casts.
SSLFAST_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal half: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  memcpy_bits(&f, &bits);
  return f;
}

SSLFAST_HD float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  memcpy_bits(&f, &bits);
  return f;
}

SSLFAST_HD float load_as_float(const void* base, int64_t i, int dtype) {
  if (dtype == 0) return static_cast<const float*>(base)[i];
  const uint16_t h = static_cast<const uint16_t*>(base)[i];
  return dtype == 1 ? half_to_float(h) : bf16_to_float(h);
}

SSLFAST_HD uint16_t float_to_bf16(float f) {
  uint32_t bits;
  memcpy_bits(&bits, &f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

SSLFAST_HD uint16_t float_to_half(float f) {
  uint32_t bits;
  memcpy_bits(&bits, &f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (abs < 0x33000000u) return sign;  // below half of the smallest subnormal
    const uint32_t e = abs >> 23;
    const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // x / 2^-24 = m * 2^(e - 126)
    const uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    const uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = abs - 0x38000000u;  // rebias 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

SSLFAST_HD void store_from_float(void* base, int64_t i, int dtype, float v) {
  if (dtype == 0) {
    static_cast<float*>(base)[i] = v;
  } else if (dtype == 1) {
    static_cast<uint16_t*>(base)[i] = float_to_half(v);
  } else {
    static_cast<uint16_t*>(base)[i] = float_to_bf16(v);
  }
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

}  // namespace gq
}  // namespace sslfast
