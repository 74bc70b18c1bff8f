// CPU instruction-set dispatch for the C++ kernels (never included by CUDA sources).
//
// The extension is compiled for the baseline ISA of the platform (x86-64: SSE2), so the
// wheel or source build runs on any CPU. Hot loops that gain from wider vectors are written
// once more per ISA, in functions marked SSLFAST_TARGET_AVX2 / SSLFAST_TARGET_AVX512 (GCC
// and clang compile those functions alone for that ISA), and chosen at run time by
// cpu_isa(). Every ISA path must return the scalar path's bits; the tests force each path
// with set_cpu_isa() and compare.
//
// cpu_isa() is the best ISA the CPU has, capped by SSLFAST_CPU_ISA=scalar|avx2|avx512
// (read once) or by set_cpu_isa() (the tests' switch, exposed as sslfast._C.set_cpu_isa).
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define SSLFAST_X86_SIMD 1
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12 reports -Wmaybe-uninitialized inside its own AVX-512 headers once their intrinsics
// are inlined (_mm512_undefined_*; GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define SSLFAST_TARGET_AVX2 __attribute__((target("avx2,fma,bmi2")))
#define SSLFAST_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi2")))
#else
#define SSLFAST_X86_SIMD 0
#endif

namespace sslfast {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

inline const char* isa_name(Isa isa) {
  return isa == Isa::avx512 ? "avx512" : (isa == Isa::avx2 ? "avx2" : "scalar");
}

// The best ISA this CPU executes (ignoring any cap).
inline Isa cpu_isa_supported() {
#if SSLFAST_X86_SIMD
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
      return Isa::avx2;
    return Isa::scalar;
  }();
  return best;
#else
  return Isa::scalar;
#endif
}

namespace detail {
inline std::atomic<int>& isa_cap() {
  static std::atomic<int> cap{[] {
    const char* env = std::getenv("SSLFAST_CPU_ISA");
    if (env == nullptr || *env == '\0') return static_cast<int>(Isa::avx512);
    if (std::strcmp(env, "scalar") == 0) return static_cast<int>(Isa::scalar);
    if (std::strcmp(env, "avx2") == 0) return static_cast<int>(Isa::avx2);
    return static_cast<int>(Isa::avx512);
  }()};
  return cap;
}
}  // namespace detail

// The ISA the kernels use now: min(supported, cap).
inline Isa cpu_isa() {
  const int cap = detail::isa_cap().load(std::memory_order_relaxed);
  const int best = static_cast<int>(cpu_isa_supported());
  return static_cast<Isa>(cap < best ? cap : best);
}

// Caps the ISA (tests); returns the ISA now in effect.
inline Isa set_cpu_isa(Isa cap) {
  detail::isa_cap().store(static_cast<int>(cap), std::memory_order_relaxed);
  return cpu_isa();
}

}  // namespace sslfast
