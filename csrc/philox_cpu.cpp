// Bulk Philox4x32-10 on the CPU (csrc/sslfast/philox_cpu.h): one counter block per vector
// lane, 16 lanes with AVX-512, 8 with AVX2, one at a time otherwise. Every path returns
// philox4x32_10's bits (tests/test_random.py forces each with sslfast._C.set_cpu_isa).
//
// A Philox round on a vector of blocks: the 32x32 -> 64 products of the even lanes come from
// one unsigned multiply of the 64-bit lanes, those of the odd lanes from a second one after a
// 32-bit shift; a blend puts the high halves back in place, and mullo gives the low halves.
// The four state vectors are then transposed so that block j's words land at 4j..4j+3.
#include "sslfast/philox_cpu.h"

#include "sslfast/cpu_isa.h"

namespace sslfast {
namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

void blocks_scalar(const uint32_t* c0, uint32_t first, bool range, int64_t n, uint32_t c1, uint32_t c2,
                   uint64_t seed, uint32_t* words) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t c = range ? first + static_cast<uint32_t>(j) : c0[j];
    const Philox4 r = philox4x32_10(c, c1, c2, 0u, seed);
    for (int k = 0; k < 4; ++k) words[4 * j + k] = r.w[k];
  }
}

#if SSLFAST_X86_SIMD

SSLFAST_TARGET_AVX512 inline void round16(__m512i& x0, __m512i& x1, __m512i& x2, __m512i& x3, uint32_t k0,
                                          uint32_t k1) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kM0)), m1 = _mm512_set1_epi32(static_cast<int>(kM1));
  const __m512i e0 = _mm512_mul_epu32(x0, m0), o0 = _mm512_mul_epu32(_mm512_srli_epi64(x0, 32), m0);
  const __m512i e2 = _mm512_mul_epu32(x2, m1), o2 = _mm512_mul_epu32(_mm512_srli_epi64(x2, 32), m1);
  const __m512i hi0 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(e0, 32), o0);
  const __m512i hi2 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(e2, 32), o2);
  const __m512i lo0 = _mm512_mullo_epi32(x0, m0), lo2 = _mm512_mullo_epi32(x2, m1);
  // 0x96: a ^ b ^ c
  x0 = _mm512_ternarylogic_epi32(hi2, x1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);
  x2 = _mm512_ternarylogic_epi32(hi0, x3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
  x1 = lo2;
  x3 = lo0;
}

// 16 blocks with counters `c` to words[0, 64).
SSLFAST_TARGET_AVX512 inline void blocks16(__m512i c, uint32_t c1, uint32_t c2, uint64_t seed, uint32_t* words) {
  __m512i x0 = c, x1 = _mm512_set1_epi32(static_cast<int>(c1)), x2 = _mm512_set1_epi32(static_cast<int>(c2));
  __m512i x3 = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r, k0 += kW0, k1 += kW1) round16(x0, x1, x2, x3, k0, k1);
  // Lane 4L + i of x_k is word k of block 4L + i. After the two unpacks, 128-bit lane L of
  // u_i holds block 4L + i whole; the shuffles then order the lanes 0, 1, 2, 3, 4, ...
  const __m512i t0 = _mm512_unpacklo_epi32(x0, x1), t1 = _mm512_unpackhi_epi32(x0, x1);
  const __m512i t2 = _mm512_unpacklo_epi32(x2, x3), t3 = _mm512_unpackhi_epi32(x2, x3);
  const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
  const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
  const __m512i v0 = _mm512_shuffle_i32x4(u0, u1, 0x44), v1 = _mm512_shuffle_i32x4(u2, u3, 0x44);
  const __m512i v2 = _mm512_shuffle_i32x4(u0, u1, 0xEE), v3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
  _mm512_storeu_si512(words, _mm512_shuffle_i32x4(v0, v1, 0x88));
  _mm512_storeu_si512(words + 16, _mm512_shuffle_i32x4(v0, v1, 0xDD));
  _mm512_storeu_si512(words + 32, _mm512_shuffle_i32x4(v2, v3, 0x88));
  _mm512_storeu_si512(words + 48, _mm512_shuffle_i32x4(v2, v3, 0xDD));
}

SSLFAST_TARGET_AVX512 void blocks_avx512(const uint32_t* c0, uint32_t first, bool range, int64_t n, uint32_t c1,
                                         uint32_t c2, uint64_t seed, uint32_t* words) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i c = range ? _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first + static_cast<uint32_t>(j))), iota)
                            : _mm512_loadu_si512(c0 + j);
    blocks16(c, c1, c2, seed, words + 4 * j);
  }
  if (j < n) {  // the tail: a masked load of counters, a bounce buffer for the words
    const __mmask16 live = static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512i c = range ? _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first + static_cast<uint32_t>(j))), iota)
                            : _mm512_maskz_loadu_epi32(live, c0 + j);
    alignas(64) uint32_t tmp[64];
    blocks16(c, c1, c2, seed, tmp);
    for (int64_t i = 0; i < 4 * (n - j); ++i) words[4 * j + i] = tmp[i];
  }
}

SSLFAST_TARGET_AVX2 inline __m256i mulhi8(__m256i x, __m256i m) {
  const __m256i e = _mm256_mul_epu32(x, m), o = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  return _mm256_blend_epi32(_mm256_srli_epi64(e, 32), o, 0xAA);
}

// 8 blocks with counters `c` to words[0, 32).
SSLFAST_TARGET_AVX2 inline void blocks8(__m256i c, uint32_t c1, uint32_t c2, uint64_t seed, uint32_t* words) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kM0)), m1 = _mm256_set1_epi32(static_cast<int>(kM1));
  __m256i x0 = c, x1 = _mm256_set1_epi32(static_cast<int>(c1)), x2 = _mm256_set1_epi32(static_cast<int>(c2));
  __m256i x3 = _mm256_setzero_si256();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r, k0 += kW0, k1 += kW1) {
    const __m256i hi0 = mulhi8(x0, m0), hi2 = mulhi8(x2, m1);
    const __m256i lo0 = _mm256_mullo_epi32(x0, m0), lo2 = _mm256_mullo_epi32(x2, m1);
    x0 = _mm256_xor_si256(_mm256_xor_si256(hi2, x1), _mm256_set1_epi32(static_cast<int>(k0)));
    x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), _mm256_set1_epi32(static_cast<int>(k1)));
    x1 = lo2;
    x3 = lo0;
  }
  const __m256i t0 = _mm256_unpacklo_epi32(x0, x1), t1 = _mm256_unpackhi_epi32(x0, x1);
  const __m256i t2 = _mm256_unpacklo_epi32(x2, x3), t3 = _mm256_unpackhi_epi32(x2, x3);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  auto* out = reinterpret_cast<__m256i*>(words);
  _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
  _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
  _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
  _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
}

SSLFAST_TARGET_AVX2 void blocks_avx2(const uint32_t* c0, uint32_t first, bool range, int64_t n, uint32_t c1,
                                     uint32_t c2, uint64_t seed, uint32_t* words) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i c = range ? _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first + static_cast<uint32_t>(j))), iota)
                            : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0 + j));
    blocks8(c, c1, c2, seed, words + 4 * j);
  }
  if (j < n) {
    alignas(32) uint32_t cs[8] = {0, 0, 0, 0, 0, 0, 0, 0}, tmp[32];
    for (int64_t i = 0; i < n - j; ++i) cs[i] = range ? first + static_cast<uint32_t>(j + i) : c0[j + i];
    blocks8(_mm256_load_si256(reinterpret_cast<const __m256i*>(cs)), c1, c2, seed, tmp);
    for (int64_t i = 0; i < 4 * (n - j); ++i) words[4 * j + i] = tmp[i];
  }
}

#endif  // SSLFAST_X86_SIMD

void blocks(const uint32_t* c0, uint32_t first, bool range, int64_t n, uint32_t c1, uint32_t c2, uint64_t seed,
            uint32_t* words) {
  if (n <= 0) return;
#if SSLFAST_X86_SIMD
  switch (cpu_isa()) {
    case Isa::avx512:
      return blocks_avx512(c0, first, range, n, c1, c2, seed, words);
    case Isa::avx2:
      return blocks_avx2(c0, first, range, n, c1, c2, seed, words);
    default:
      break;
  }
#endif
  blocks_scalar(c0, first, range, n, c1, c2, seed, words);
}

}  // namespace

void philox_blocks(const uint32_t* c0, int64_t n, uint32_t c1, uint32_t c2, uint64_t seed, uint32_t* words) {
  blocks(c0, 0u, false, n, c1, c2, seed, words);
}

void philox_range(uint32_t first, int64_t n, uint32_t c1, uint32_t c2, uint64_t seed, uint32_t* words) {
  blocks(nullptr, first, true, n, c1, c2, seed, words);
}

}  // namespace sslfast
