// CPU kernels of sample_negatives: a per-row scan, a serial prefix over rows, then the draws
// of every positive, rows in parallel. The math is csrc/negatives.h, shared with CUDA; the
// Philox words of many positives come from one bulk call (csrc/sslfast/philox_cpu.h).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <vector>

#include "negatives.h"
#include "sslfast/parallel.h"
#include "sslfast/bind.h"
#include "sslfast/cpu_isa.h"
#include "sslfast/philox_cpu.h"

namespace py = pybind11;

namespace sslfast {
namespace {

struct Positive {
  int64_t t, own;  // frame, and its rank among the row's candidates
  int64_t* out;    // its output row (K + Kc entries)
};

// The within-row draws of the packed layout (negatives.h's packed_index with cross = 0, i.e.
// start + shifted_draw(w[j], n, own)) for j in [0, count): the bulk of the work.
void map_within(const uint32_t* w, int64_t count, int64_t n, int64_t own, int64_t start, int64_t* out) {
  for (int64_t j = 0; j < count; ++j) out[j] = negatives::packed_index(start, n, 0, own, 0, w[j]);
}

#if SSLFAST_X86_SIMD
// map_within, 16 draws per step: the high words of w * (n - 1) (n < 2^31 here), plus one
// where they reach `own`, widened to int64.
SSLFAST_TARGET_AVX512 void map_within_avx512(const uint32_t* w, int64_t count, int64_t n, int64_t own, int64_t start,
                                             int64_t* out) {
  if (n <= 1) return map_within(w, count, n, own, start, out);
  const __m512i m = _mm512_set1_epi32(static_cast<int>(n - 1)), o = _mm512_set1_epi32(static_cast<int>(own));
  const __m512i one = _mm512_set1_epi32(1), base = _mm512_set1_epi64(start);
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) {
    const __m512i x = _mm512_loadu_si512(w + j);
    const __m512i e = _mm512_mul_epu32(x, m), od = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
    __m512i d = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(e, 32), od);
    d = _mm512_mask_add_epi32(d, _mm512_cmpge_epu32_mask(d, o), d, one);
    _mm512_storeu_si512(out + j, _mm512_add_epi64(base, _mm512_cvtepu32_epi64(_mm512_castsi512_si256(d))));
    _mm512_storeu_si512(out + j + 8, _mm512_add_epi64(base, _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(d, 1))));
  }
  map_within(w + j, count - j, n, own, start, out + j);
}
#endif

// All draws of stream `cross` for the positives `pos[0, n)` of row b. Counter block q of
// positive t is t * blocks + q (negatives.h's draw_block); the counters of about 512 blocks
// go to philox_blocks at once, then each word becomes an index.
void draw_row(const negatives::Batch& p, int64_t b, const Positive* pos, int64_t n, int cross,
              std::vector<uint32_t>& c0, std::vector<uint32_t>& words) {
  const int64_t count = cross ? p.Kc : p.K;
  if (count == 0 || n == 0) return;
  const int64_t blocks = (count + 3) / 4;
  const int64_t chunk = std::max<int64_t>(1, 512 / blocks);
  const uint32_t stream = cross ? negatives::kStreamCrossNegatives : negatives::kStreamNegatives;
  const int64_t n_row = p.counts[b], start = p.row_end[b] - n_row;
#if SSLFAST_X86_SIMD
  const bool avx512 = cpu_isa() == Isa::avx512;
#endif
  c0.resize(chunk * blocks);
  words.resize(4 * chunk * blocks);
  for (int64_t f0 = 0; f0 < n; f0 += chunk) {
    const int64_t nf = std::min(chunk, n - f0);
    for (int64_t f = 0; f < nf; ++f)
      for (int64_t q = 0; q < blocks; ++q) c0[f * blocks + q] = static_cast<uint32_t>(pos[f0 + f].t * blocks + q);
    philox_blocks(c0.data(), nf * blocks, static_cast<uint32_t>(b), stream, p.seed, words.data());
    for (int64_t f = 0; f < nf; ++f) {
      const uint32_t* w = words.data() + 4 * blocks * f;
      const int64_t own = pos[f0 + f].own;
      int64_t* out = pos[f0 + f].out + (cross ? p.K : 0);
      if (!cross && !p.hf_layout) {
#if SSLFAST_X86_SIMD
        if (avx512) {
          map_within_avx512(w, count, n_row, own, start, out);
          continue;
        }
#endif
        map_within(w, count, n_row, own, start, out);
      } else {
        for (int64_t j = 0; j < count; ++j) out[j] = negatives::negative_index(p, b, own, cross, w[j]);
      }
    }
  }
}

void sample_negatives_cpu(std::uintptr_t mask_ptr, std::uintptr_t pad_ptr, int64_t B, int64_t T, int64_t K,
                          int64_t Kc, int from_masked_only, int hf_layout, uint64_t seed, std::uintptr_t out_ptr) {
  if (B == 0 || T == 0) return;
  const uint8_t* mask = as_ptr<const uint8_t>(mask_ptr);
  const uint8_t* pad = as_ptr<const uint8_t>(pad_ptr);
  int64_t* out = as_ptr<int64_t>(out_ptr);
  std::vector<int32_t> rank(B * T), mrank(B * T), pos(B * T);
  std::vector<int64_t> counts(B), mcounts(B), row_end(B), mstart(B);
  parallel::parallel_for(B, parallel::threads_for(B * T, parallel::kMinNegativeScanFrames, B), 1,
                         [&](int64_t b0, int64_t b1, int) {
    for (int64_t b = b0; b < b1; ++b)
      negatives::scan_row(mask + b * T, pad ? pad + b * T : nullptr, from_masked_only, T, &rank[b * T],
                          &mrank[b * T], &pos[b * T], &counts[b], &mcounts[b]);
  });
  int64_t total = 0, masked = 0;
  for (int64_t b = 0; b < B; ++b) {
    mstart[b] = masked;
    masked += mcounts[b];
    total += counts[b];
    row_end[b] = total;
  }
  const negatives::Batch p{B, T, K, Kc, hf_layout, seed, pos.data(), counts.data(), row_end.data(), total};
  const int64_t width = K + Kc;
  // Rows handed out one at a time (sslfast/parallel.h: a descheduled worker's rows go to the
  // others); scratch per worker.
  const int threads = parallel::threads_for(masked * width, parallel::kMinNegativeDraws, B);
  struct Scratch {
    std::vector<Positive> positives;
    std::vector<uint32_t> c0, words;
  };
  std::vector<Scratch> scratch(threads);
  parallel::parallel_for(B, threads, 1, [&](int64_t b0, int64_t b1, int worker) {
    std::vector<Positive>& positives = scratch[worker].positives;
    std::vector<uint32_t>& c0 = scratch[worker].c0;
    std::vector<uint32_t>& words = scratch[worker].words;
    for (int64_t b = b0; b < b1; ++b) {
      positives.clear();
      for (int64_t t = 0; t < T; ++t) {
        const int64_t m = mrank[b * T + t];
        int64_t* row_out = out + (hf_layout ? (b * T + t) : (mstart[b] + m)) * width;
        if (m >= 0) {
          positives.push_back(Positive{t, rank[b * T + t], row_out});
        } else if (hf_layout) {
          std::fill(row_out, row_out + width, int64_t(-1));
        }
      }
      const int64_t n = static_cast<int64_t>(positives.size());
      draw_row(p, b, positives.data(), n, 0, c0, words);
      draw_row(p, b, positives.data(), n, 1, c0, words);
    }
  });
}

}  // namespace

void bind_negatives(py::module_& m) {
  m.def("sample_negatives", &sample_negatives_cpu, py::arg("mask"), py::arg("padding_mask"), py::arg("B"),
        py::arg("T"), py::arg("K"), py::arg("Kc"), py::arg("from_masked_only"), py::arg("hf_layout"),
        py::arg("seed"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace sslfast
