// Philox4x32-10 in bulk on the CPU: many counter blocks per call, with AVX-512 or AVX2 where
// the CPU has them (csrc/philox_cpu.cpp), bit-identical to philox4x32_10 in philox.h.
//
// The samplers draw a few hundred to a few thousand words per row; one block at a time the
// ten dependent multiply rounds leave most of a core idle. Here 16 (AVX-512) or 8 (AVX2)
// blocks go through the rounds together, one per vector lane. CPU only: CUDA runs one block
// per thread already.
#pragma once

#include <cstdint>

#include "philox.h"

namespace sslfast {

// words[4 * j + k] = word k of philox4x32_10(c0[j], c1, c2, 0, seed) for j in [0, n).
void philox_blocks(const uint32_t* c0, int64_t n, uint32_t c1, uint32_t c2, uint64_t seed, uint32_t* words);

// The same for consecutive counters c0 = first + j (wrapping at 2^32): words[i] is then draw
// 4 * first + i of the (c1, c2) stream, the layout every row stream of the samplers uses.
void philox_range(uint32_t first, int64_t n, uint32_t c1, uint32_t c2, uint64_t seed, uint32_t* words);

}  // namespace sslfast
