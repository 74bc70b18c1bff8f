// Shared definitions for the C++ (CPU) and CUDA halves of the extension.
//
// Per-row and per-tile math lives in headers as SSLFAST_HD functions, so the CPU build
// compiles and tests exactly the logic that the CUDA build runs.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SSLFAST_HD __host__ __device__ __forceinline__
#define SSLFAST_DEVICE __device__ __forceinline__
#else
#define SSLFAST_HD inline
#define SSLFAST_DEVICE inline
#endif

namespace sslfast {

// Float storage formats the kernels accept; math is always fp32.
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// Index formats the kernels accept.
enum class IType : int { i32 = 0, i64 = 1 };

// Compensated (Kahan) addition: sum += x, with comp keeping the low-order part that the
// addition rounded away; the sum is then (sum - comp). A softmax denominator is one term of 1
// (the row's max) and many far smaller ones: added in order, each addition rounds at ulp(1) and
// for equal terms always the same way (1 + 47 x 6.1e-6 came out 22 ulp high, 1% of that row's
// loss). Compensated, the error stays about 1 ulp whatever the order and count, in every
// backend alike. Needs IEEE evaluation: no -ffast-math (it would fold comp away); contraction
// into fma cannot touch it (there are no products).
SSLFAST_HD void add_compensated(float& sum, float& comp, float x) {
  const float y = x - comp;
  const float t = sum + y;
  comp = (t - sum) - y;
  sum = t;
}

// log(sum - comp) of a compensated softmax denominator whose max term is 1 (so sum >= 1, or
// 0 for an empty row), as log1p((sum - 1) - comp): sum - 1 is exact for sum <= 2 (Sterbenz),
// so a denominator 1 + x keeps x's relative precision, and so does a confident row's loss,
// about x (log of the fp32 1 + x is off by up to ulp(1) / 2 = 6e-8 whatever x is).
SSLFAST_HD float log_denominator(float sum, float comp) { return log1pf((sum - 1.0f) - comp); }

}  // namespace sslfast
