// fp16 / bf16 storage <-> fp32 math, shared by every family's CPU and CUDA kernels.
//
// The conversions are exact (to fp32) or round to nearest even (from fp32), matching
// torch's .float(), .half() and .bfloat16() bit for bit; tests/test_dtype.py checks every
// fp16 and bf16 bit pattern and the rounding of a sweep of floats. The host versions use
// selects and bit arithmetic so loops over a row vectorise; the device versions use the
// CUDA intrinsics, which compute the same values.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace sslfast {

SSLFAST_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

SSLFAST_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// IEEE binary16 bits -> fp32, exact for every input (subnormals, inf, NaN).
SSLFAST_HD float half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  const float sub = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24
  const uint32_t normal = sign | ((exp + 112u) << 23) | (mant << 13);
  const uint32_t special = sign | 0x7f800000u | (mant << 13);
  const float out = exp == 0 ? (sign ? -sub : sub) : bits_to_float(exp == 31 ? special : normal);
  return out;
#endif
}

// fp32 -> IEEE binary16 bits, round to nearest even; NaN stays NaN (quiet), overflow -> inf.
SSLFAST_HD uint16_t float_to_half(float v) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(v));
#else
  uint32_t u = float_to_bits(v);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t out;
  if (u >= (127u + 16u) << 23) {  // overflows half, or inf / nan
    out = u > (255u << 23) ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {  // half subnormal or zero: let the fp32 adder round
    const float magic = bits_to_float(((127u - 15u) + (23u - 10u) + 1u) << 23);
    out = static_cast<uint16_t>(float_to_bits(bits_to_float(u) + magic) - float_to_bits(magic));
  } else {
    const uint32_t odd = (u >> 13) & 1u;
    u += ((15u - 127u) << 23) + 0xfffu + odd;
    out = static_cast<uint16_t>(u >> 13);
  }
  return static_cast<uint16_t>(out | (sign >> 16));
#endif
}

SSLFAST_HD float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// fp32 -> bfloat16 bits, round to nearest even; NaN stays NaN (quiet).
SSLFAST_HD uint16_t float_to_bf16(float v) {
  const uint32_t u = float_to_bits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Element i of a buffer stored as DType code `dtype` (0 f32, 1 f16, 2 bf16), as fp32.
SSLFAST_HD float load_float(const void* base, int64_t i, int dtype) {
  if (dtype == static_cast<int>(DType::f32)) return static_cast<const float*>(base)[i];
  const uint16_t bits = static_cast<const uint16_t*>(base)[i];
  return dtype == static_cast<int>(DType::f16) ? half_to_float(bits) : bf16_to_float(bits);
}

// Store fp32 v as element i of a buffer of DType code `dtype`, rounding to nearest even.
SSLFAST_HD void store_float(void* base, int64_t i, int dtype, float v) {
  if (dtype == static_cast<int>(DType::f32)) {
    static_cast<float*>(base)[i] = v;
  } else {
    static_cast<uint16_t*>(base)[i] = dtype == static_cast<int>(DType::f16) ? float_to_half(v) : float_to_bf16(v);
  }
}

// Storage formats as types, for loops specialised per dtype (no per-element switch).
struct F32 {
  using T = float;
  static constexpr DType code = DType::f32;
  static SSLFAST_HD float load(T v) { return v; }
  static SSLFAST_HD T store(float v) { return v; }
  static SSLFAST_HD float round(float v) { return v; }
};
struct F16 {
  using T = uint16_t;
  static constexpr DType code = DType::f16;
  static SSLFAST_HD float load(T v) { return half_to_float(v); }
  static SSLFAST_HD T store(float v) { return float_to_half(v); }
  static SSLFAST_HD float round(float v) { return half_to_float(float_to_half(v)); }
};
struct BF16 {
  using T = uint16_t;
  static constexpr DType code = DType::bf16;
  static SSLFAST_HD float load(T v) { return bf16_to_float(v); }
  static SSLFAST_HD T store(float v) { return float_to_bf16(v); }
  static SSLFAST_HD float round(float v) { return bf16_to_float(float_to_bf16(v)); }
};

}  // namespace sslfast
