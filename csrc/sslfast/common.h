// Shared definitions for the C++ (CPU) and CUDA halves of the extension.
//
// Per-row and per-tile math lives in headers as SSLFAST_HD functions, so the CPU build
// compiles and tests exactly the logic that the CUDA build runs.
#pragma once

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

}  // namespace sslfast
