// CPU kernel of compute_mask_indices: rows in parallel (steps 1-5 of the reference), then the
// cross-row equalisation and dropout (steps 6-7). "The k smallest keys" is a threshold
// filter plus nth_element here (select_extreme); the CUDA kernel ranks keys by counting
// instead: both select the same set.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "masking.h"
#include "sslfast/bind.h"
#include "sslfast/cpu_isa.h"
#include "sslfast/parallel.h"
#include "sslfast/philox_cpu.h"

namespace py = pybind11;

namespace sslfast {
namespace {

using masking::Params;

// Words [0, n) of a row's stream (word c is word c % 4 of block c / 4): one bulk Philox call.
void row_words(uint64_t seed, int64_t b, uint32_t stream, int64_t n, std::vector<uint32_t>& words) {
  const int64_t blocks = (n + 3) / 4;
  words.resize(4 * blocks);
  philox_range(0u, blocks, static_cast<uint32_t>(b), stream, seed, words.data());
}

using masking::key_of;

// Writes to out the keys of the live positions in [first, n) whose word is below `thr`
// (below = true) or at least `thr` (below = false); returns how many. live == nullptr: all
// live. out needs room for n - first + 16 keys.
int64_t filter_keys(const uint32_t* words, const uint8_t* live, int64_t first, int64_t n, uint32_t thr, bool below,
                    uint64_t* out) {
  int64_t m = 0;
  for (int64_t pos = first; pos < n; ++pos) {  // branch-free
    const bool pass = (below ? words[pos] < thr : words[pos] >= thr) && (live == nullptr || live[pos] != 0);
    out[m] = key_of(words[pos], pos);
    m += pass;
  }
  return m;
}

#if SSLFAST_X86_SIMD
// filter_keys 16 positions at a time: compare, widen, compress.
SSLFAST_TARGET_AVX512 int64_t filter_keys_avx512(const uint32_t* words, const uint8_t* live, int64_t first, int64_t n,
                                                 uint32_t thr, bool below, uint64_t* out) {
  const __m512i t = _mm512_set1_epi32(static_cast<int>(thr));
  const __m512i lanes_lo = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i lanes_hi = _mm512_setr_epi64(8, 9, 10, 11, 12, 13, 14, 15);
  int64_t m = 0, pos = first;
  for (; pos + 16 <= n; pos += 16) {
    const __m512i w = _mm512_loadu_si512(words + pos);
    __mmask16 pass = below ? _mm512_cmplt_epu32_mask(w, t) : _mm512_cmpge_epu32_mask(w, t);
    if (live != nullptr) {
      const __m128i l = _mm_loadu_si128(reinterpret_cast<const __m128i*>(live + pos));
      pass &= _mm_test_epi8_mask(l, l);
    }
    if (pass == 0) continue;
    const __m512i base = _mm512_set1_epi64(pos);
    const __m512i lo = _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(w)),
                                                         masking::kPosBits),
                                       _mm512_add_epi64(base, lanes_lo));
    const __m512i hi = _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(w, 1)),
                                                         masking::kPosBits),
                                       _mm512_add_epi64(base, lanes_hi));
    const __mmask8 p_lo = static_cast<__mmask8>(pass), p_hi = static_cast<__mmask8>(pass >> 8);
    _mm512_storeu_si512(out + m, _mm512_maskz_compress_epi64(p_lo, lo));
    m += __builtin_popcount(p_lo);
    _mm512_storeu_si512(out + m, _mm512_maskz_compress_epi64(p_hi, hi));
    m += __builtin_popcount(p_hi);
  }
  return m + filter_keys(words, live, pos, n, thr, below, out + m);
}
#endif

// sel := the keys of the k smallest (smallest = true) or the k largest keys among the live
// positions of [0, n) (n_live of them; live == nullptr: all), in no particular order: what
// std::nth_element selects, cheaper. The words are uniform, so a threshold that about
// k + 4 sqrt(k) + 16 of them pass keeps a short list holding the k wanted, and nth_element
// runs on that list only. Exact: where fewer than k pass, every live key is taken instead.
void select_extreme(const uint32_t* words, const uint8_t* live, int64_t n, int64_t n_live, int64_t k, bool smallest,
                    std::vector<uint64_t>& sel) {
  if (k <= 0) return sel.clear();
  sel.resize(n + 16);
#if SSLFAST_X86_SIMD
  auto filter = cpu_isa() == Isa::avx512 ? filter_keys_avx512 : filter_keys;
#else
  auto filter = filter_keys;
#endif
  int64_t m = 0;
  if (k < n_live) {
    const double want = static_cast<double>(k);
    const double frac = (want + 4.0 * std::sqrt(want) + 16.0) / static_cast<double>(n_live);
    if (frac < 0.5) {
      const uint32_t thr = static_cast<uint32_t>((smallest ? frac : 1.0 - frac) * 4294967296.0);
      m = filter(words, live, 0, n, thr, smallest, sel.data());
    }
  }
  if (m < k) m = filter(words, live, 0, n, 0u, false, sel.data());  // every live key (word >= 0)
  if (k < m) {
    if (smallest)
      std::nth_element(sel.begin(), sel.begin() + k, sel.begin() + m);
    else
      std::nth_element(sel.begin(), sel.begin() + k, sel.begin() + m, std::greater<uint64_t>());
  }
  sel.resize(k < m ? k : m);
}

void mask_row(const Params& p, int64_t b, int64_t sz, uint8_t* out, std::vector<int64_t>& lens,
              std::vector<uint32_t>& words, std::vector<uint64_t>& sel) {
  std::fill(out, out + p.T, uint8_t(0));
  const int64_t n = masking::span_count(p, b, sz);
  if (n <= 0) return;
  lens.resize(n);
  const int64_t min_len = masking::span_lengths(p, b, sz, n, lens.data());
  if (p.no_overlap) {
    masking::sort_desc(lens.data(), n);  // the CUDA kernel's sort (n is a few dozen)
    std::vector<int64_t> parts(2 * (n + 1));
    masking::no_overlap_row(p, b, sz, n, lens.data(), min_len, parts.data(), parts.data() + n + 1, out);
    return;
  }
  const int64_t R = masking::start_range(p, sz, n, min_len);
  if (R <= 0) return;
  row_words(p.seed, b, masking::kStreamStart, R, words);
  const int64_t take = std::min(n, R);
  select_extreme(words.data(), nullptr, R, R, take, true, sel);
  if (p.n_thr > 0) std::sort(sel.begin(), sel.end());  // span i pairs with the i-th smallest key
  for (int64_t i = 0; i < take; ++i) {
    const int64_t s = static_cast<int64_t>(sel[i] & masking::kPosMask);
    const int64_t e = std::min(s + lens[i], sz);
    for (int64_t t = s; t < e; ++t) out[t] = 1;
  }
}

// Keep the `keep` masked frames of a row (`count` of them) with the smallest keys of `stream`.
void keep_smallest(const Params& p, int64_t b, uint8_t* out, int64_t count, int64_t keep, uint32_t stream,
                   std::vector<uint32_t>& words, std::vector<uint64_t>& sel) {
  if (count <= keep) return;
  row_words(p.seed, b, stream, p.T, words);
  if (keep >= count - keep) {  // drop the count - keep largest
    select_extreme(words.data(), out, p.T, count, count - keep, false, sel);
    for (const uint64_t key : sel) out[key & masking::kPosMask] = 0;
  } else {  // unmask all, then mark the keep smallest again
    select_extreme(words.data(), out, p.T, count, keep, true, sel);
    std::fill(out, out + p.T, uint8_t(0));
    for (const uint64_t key : sel) out[key & masking::kPosMask] = 1;
  }
}

void compute_mask_indices_cpu(std::uintptr_t lengths_ptr, std::uintptr_t pad_ptr, int64_t B, int64_t T,
                              double mask_prob, int64_t L, int64_t vmin, std::uintptr_t thr_ptr, int64_t n_thr,
                              int64_t min_masks, int require_same, double dropout, int hf, uint64_t seed,
                              int no_overlap, int64_t min_space, std::uintptr_t out_ptr) {
  if (B == 0 || T == 0) return;
  const Params p{B, T, mask_prob, L, vmin, as_ptr<const int64_t>(thr_ptr), n_thr, min_masks, require_same,
                 dropout, hf, seed, no_overlap, min_space};
  const int64_t* lengths = as_ptr<const int64_t>(lengths_ptr);
  const uint8_t* pad = as_ptr<const uint8_t>(pad_ptr);
  uint8_t* out = as_ptr<uint8_t>(out_ptr);
  std::vector<int64_t> counts(B);
  // Rows in parallel above the threshold (sslfast/parallel.h), scratch per worker.
  const int threads = parallel::threads_for(B * T, parallel::kMinMaskFrames, B);
  struct Scratch {
    std::vector<int64_t> lens;
    std::vector<uint32_t> words;
    std::vector<uint64_t> sel;
  };
  std::vector<Scratch> scratch(threads);
  parallel::parallel_for(B, threads, 1, [&](int64_t b0, int64_t b1, int worker) {
    Scratch& s = scratch[worker];
    for (int64_t b = b0; b < b1; ++b) {
      uint8_t* row = out + b * T;
      mask_row(p, b, lengths[b], row, s.lens, s.words, s.sel);
      int64_t c = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (pad && pad[b * T + t]) row[t] = 0;
        c += row[t];
      }
      counts[b] = c;
    }
  });
  if (hf || (!require_same && dropout <= 0.0)) return;
  const int64_t min_count = *std::min_element(counts.begin(), counts.end());
  parallel::parallel_for(B, threads, 1, [&](int64_t b0, int64_t b1, int worker) {
    Scratch& s = scratch[worker];
    for (int64_t b = b0; b < b1; ++b) {
      uint8_t* row = out + b * T;
      int64_t c = counts[b];
      if (require_same && c > min_count) {
        keep_smallest(p, b, row, c, min_count, masking::kStreamEqualize, s.words, s.sel);
        c = min_count;
      }
      if (dropout > 0.0)
        keep_smallest(p, b, row, c, masking::dropout_keep(p, c), masking::kStreamDropout, s.words, s.sel);
    }
  });
}

}  // namespace

// select_extreme for the tests of its threshold and fallback paths: words (n uint32), live
// (n bytes, or 0 for all), the k selected keys to out.
static void select_extreme_py(std::uintptr_t words_ptr, std::uintptr_t live_ptr, int64_t n, int64_t k, bool smallest,
                              std::uintptr_t out_ptr) {
  const uint32_t* words = as_ptr<const uint32_t>(words_ptr);
  const uint8_t* live = as_ptr<const uint8_t>(live_ptr);
  int64_t n_live = 0;
  for (int64_t i = 0; i < n; ++i) n_live += live == nullptr || live[i] != 0;
  std::vector<uint64_t> sel;
  select_extreme(words, live, n, n_live, k, smallest, sel);
  std::copy(sel.begin(), sel.end(), as_ptr<uint64_t>(out_ptr));
}

void bind_masking(py::module_& m) {
  m.def("_select_extreme", &select_extreme_py, py::arg("words"), py::arg("live"), py::arg("n"), py::arg("k"),
        py::arg("smallest"), py::arg("out"));
  m.def("compute_mask_indices", &compute_mask_indices_cpu, py::arg("lengths"), py::arg("padding_mask"),
        py::arg("B"), py::arg("T"), py::arg("mask_prob"), py::arg("mask_length"), py::arg("vmin"),
        py::arg("thresholds"), py::arg("n_thresholds"), py::arg("min_masks"), py::arg("require_same_masks"),
        py::arg("mask_dropout"), py::arg("hf_style"), py::arg("seed"), py::arg("no_overlap"), py::arg("min_space"),
        py::arg("out"),
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace sslfast
