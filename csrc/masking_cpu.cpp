// CPU kernel of compute_mask_indices: rows in parallel (steps 1-5 of the reference), then the
// cross-row equalisation and dropout (steps 6-7). "The k smallest keys" is a threshold
// partition plus nth_element here (select_smallest); the CUDA kernel ranks keys by counting
// instead: both select the same set.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "masking.h"
#include "sslfast/bind.h"
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

// Reorders keys[0, n) so that keys[0, k) are the k smallest, in no particular order: the
// selection std::nth_element makes, cheaper. Keys are (uniform 32-bit word << kPosBits | pos),
// so a threshold on the word that about k + 4 sqrt(k) + 16 keys pass finds a short prefix
// holding the k smallest (or, for k near n, a short suffix holding the n - k largest), and
// nth_element then runs on that part only. Exact: where too few keys pass, it falls back to
// the whole range.
void select_smallest(uint64_t* keys, int64_t n, int64_t k) {
  if (k <= 0 || k >= n) return;
  const bool low = k <= n / 2;
  const double want = low ? static_cast<double>(k) : static_cast<double>(n - k);
  const double frac = (want + 4.0 * std::sqrt(want) + 16.0) / static_cast<double>(n);
  if (frac < 0.5) {
    const uint64_t w = static_cast<uint64_t>((low ? frac : 1.0 - frac) * 4294967296.0);
    const uint64_t thr = w << masking::kPosBits;
    if (low) {
      uint64_t* mid = std::partition(keys, keys + n, [thr](uint64_t x) { return x < thr; });
      if (mid - keys >= k) {
        std::nth_element(keys, keys + k, mid);
        return;
      }
    } else {
      uint64_t* mid = std::partition(keys, keys + n, [thr](uint64_t x) { return x < thr; });
      if (keys + n - mid >= n - k) {
        std::nth_element(mid, keys + k, keys + n);
        return;
      }
    }
  }
  std::nth_element(keys, keys + k, keys + n);
}

void mask_row(const Params& p, int64_t b, int64_t sz, uint8_t* out, std::vector<int64_t>& lens,
              std::vector<uint64_t>& keys, std::vector<uint32_t>& words) {
  std::fill(out, out + p.T, uint8_t(0));
  const int64_t n = masking::span_count(p, b, sz);
  if (n <= 0) return;
  lens.resize(n);
  int64_t min_len = INT64_MAX;
  bool all_zero = true;
  for (int64_t i = 0; i < n; ++i) {
    lens[i] = masking::span_length(p, b, i);
    all_zero = all_zero && lens[i] == 0;
  }
  if (all_zero) lens[0] = masking::zero_length_fix(p, sz);
  for (int64_t i = 0; i < n; ++i) min_len = std::min(min_len, lens[i]);
  if (p.no_overlap) {
    std::sort(lens.begin(), lens.end(), [](int64_t a, int64_t c) { return a > c; });
    std::vector<int64_t> parts(2 * (n + 1));
    masking::no_overlap_row(p, b, sz, n, lens.data(), min_len, parts.data(), parts.data() + n + 1, out);
    return;
  }
  const int64_t R = masking::start_range(p, sz, n, min_len);
  if (R <= 0) return;
  keys.resize(R);
  row_words(p.seed, b, masking::kStreamStart, R, words);
  for (int64_t s = 0; s < R; ++s) keys[s] = (static_cast<uint64_t>(words[s]) << masking::kPosBits) | static_cast<uint64_t>(s);
  const int64_t take = std::min(n, R);
  select_smallest(keys.data(), R, take);
  if (p.n_thr > 0) std::sort(keys.begin(), keys.begin() + take);  // span i pairs with the i-th smallest key
  for (int64_t i = 0; i < take; ++i) {
    const int64_t s = static_cast<int64_t>(keys[i] & masking::kPosMask);
    const int64_t e = std::min(s + lens[i], sz);
    for (int64_t t = s; t < e; ++t) out[t] = 1;
  }
}

// Keep the `keep` masked frames of a row with the smallest keys of `stream`.
void keep_smallest(const Params& p, int64_t b, uint8_t* out, int64_t keep, uint32_t stream,
                   std::vector<uint64_t>& keys, std::vector<uint32_t>& words) {
  row_words(p.seed, b, stream, p.T, words);
  keys.resize(p.T);
  int64_t n = 0;
  for (int64_t t = 0; t < p.T; ++t) {  // branch-free: about half the frames are masked
    keys[n] = (static_cast<uint64_t>(words[t]) << masking::kPosBits) | static_cast<uint64_t>(t);
    n += out[t] != 0;
  }
  if (n <= keep) return;
  select_smallest(keys.data(), n, keep);
  for (int64_t i = keep; i < n; ++i) out[keys[i] & masking::kPosMask] = 0;
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
#pragma omp parallel if (B * T > 262144)
  {
    std::vector<int64_t> lens;
    std::vector<uint64_t> keys;
    std::vector<uint32_t> words;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      uint8_t* row = out + b * T;
      mask_row(p, b, lengths[b], row, lens, keys, words);
      int64_t c = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (pad && pad[b * T + t]) row[t] = 0;
        c += row[t];
      }
      counts[b] = c;
    }
  }
  if (hf || (!require_same && dropout <= 0.0)) return;
  const int64_t min_count = *std::min_element(counts.begin(), counts.end());
#pragma omp parallel if (B * T > 262144)
  {
    std::vector<uint64_t> keys;
    std::vector<uint32_t> words;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      uint8_t* row = out + b * T;
      int64_t c = counts[b];
      if (require_same && c > min_count) {
        keep_smallest(p, b, row, min_count, masking::kStreamEqualize, keys, words);
        c = min_count;
      }
      if (dropout > 0.0) keep_smallest(p, b, row, masking::dropout_keep(p, c), masking::kStreamDropout, keys, words);
    }
  }
}

}  // namespace

// select_smallest on int64 keys, for the tests of its threshold and fallback paths.
static void select_smallest_py(std::uintptr_t keys_ptr, int64_t n, int64_t k) {
  select_smallest(as_ptr<uint64_t>(keys_ptr), n, k);
}

void bind_masking(py::module_& m) {
  m.def("_select_smallest", &select_smallest_py, py::arg("keys"), py::arg("n"), py::arg("k"));
  m.def("compute_mask_indices", &compute_mask_indices_cpu, py::arg("lengths"), py::arg("padding_mask"),
        py::arg("B"), py::arg("T"), py::arg("mask_prob"), py::arg("mask_length"), py::arg("vmin"),
        py::arg("thresholds"), py::arg("n_thresholds"), py::arg("min_masks"), py::arg("require_same_masks"),
        py::arg("mask_dropout"), py::arg("hf_style"), py::arg("seed"), py::arg("no_overlap"), py::arg("min_space"),
        py::arg("out"),
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace sslfast
