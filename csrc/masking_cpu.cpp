// CPU kernel of compute_mask_indices: rows in parallel (steps 1-5 of the reference), then the
// cross-row equalisation and dropout (steps 6-7). "The k smallest keys" is nth_element here;
// the CUDA kernel ranks keys by counting instead: both select the same set.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "masking.h"
#include "sslfast/bind.h"

namespace py = pybind11;

namespace sslfast {
namespace {

using masking::Params;

void mask_row(const Params& p, int64_t b, int64_t sz, uint8_t* out, std::vector<int64_t>& lens,
              std::vector<uint64_t>& keys) {
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
  const int64_t R = masking::start_range(p, sz, n, min_len);
  if (R <= 0) return;
  keys.resize(R);
  for (int64_t s = 0; s < R; s += 4) {
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(s >> 2), static_cast<uint32_t>(b), masking::kStreamStart,
                                    0u, p.seed);
    for (int64_t k = 0; k < 4 && s + k < R; ++k)
      keys[s + k] = (static_cast<uint64_t>(r.w[k]) << masking::kPosBits) | static_cast<uint64_t>(s + k);
  }
  const int64_t take = std::min(n, R);
  if (take < R) std::nth_element(keys.begin(), keys.begin() + take, keys.end());
  if (p.n_thr > 0) std::sort(keys.begin(), keys.begin() + take);  // span i pairs with the i-th smallest key
  for (int64_t i = 0; i < take; ++i) {
    const int64_t s = static_cast<int64_t>(keys[i] & masking::kPosMask);
    const int64_t e = std::min(s + lens[i], sz);
    for (int64_t t = s; t < e; ++t) out[t] = 1;
  }
}

// Keep the `keep` masked frames of a row with the smallest keys of `stream`.
void keep_smallest(const Params& p, int64_t b, uint8_t* out, int64_t keep, uint32_t stream,
                   std::vector<uint64_t>& keys) {
  keys.clear();
  for (int64_t t0 = 0; t0 < p.T; t0 += 4) {
    const int64_t t1 = std::min(t0 + 4, p.T);
    bool any = false;
    for (int64_t t = t0; t < t1; ++t) any = any || out[t];
    if (!any) continue;
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(t0 >> 2), static_cast<uint32_t>(b), stream, 0u, p.seed);
    for (int64_t t = t0; t < t1; ++t)
      if (out[t]) keys.push_back((static_cast<uint64_t>(r.w[t - t0]) << masking::kPosBits) | static_cast<uint64_t>(t));
  }
  if (static_cast<int64_t>(keys.size()) <= keep) return;
  std::nth_element(keys.begin(), keys.begin() + keep, keys.end());
  for (size_t i = keep; i < keys.size(); ++i) out[keys[i] & masking::kPosMask] = 0;
}

void compute_mask_indices_cpu(std::uintptr_t lengths_ptr, std::uintptr_t pad_ptr, int64_t B, int64_t T,
                              double mask_prob, int64_t L, int64_t vmin, std::uintptr_t thr_ptr, int64_t n_thr,
                              int64_t min_masks, int require_same, double dropout, int hf, uint64_t seed,
                              std::uintptr_t out_ptr) {
  if (B == 0 || T == 0) return;
  const Params p{B, T, mask_prob, L, vmin, as_ptr<const int64_t>(thr_ptr), n_thr, min_masks, require_same,
                 dropout, hf, seed};
  const int64_t* lengths = as_ptr<const int64_t>(lengths_ptr);
  const uint8_t* pad = as_ptr<const uint8_t>(pad_ptr);
  uint8_t* out = as_ptr<uint8_t>(out_ptr);
  std::vector<int64_t> counts(B);
#pragma omp parallel if (B * T > 262144)
  {
    std::vector<int64_t> lens;
    std::vector<uint64_t> keys;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      uint8_t* row = out + b * T;
      mask_row(p, b, lengths[b], row, lens, keys);
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
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      uint8_t* row = out + b * T;
      int64_t c = counts[b];
      if (require_same && c > min_count) {
        keep_smallest(p, b, row, min_count, masking::kStreamEqualize, keys);
        c = min_count;
      }
      if (dropout > 0.0) keep_smallest(p, b, row, masking::dropout_keep(p, c), masking::kStreamDropout, keys);
    }
  }
}

}  // namespace

void bind_masking(py::module_& m) {
  m.def("compute_mask_indices", &compute_mask_indices_cpu, py::arg("lengths"), py::arg("padding_mask"),
        py::arg("B"), py::arg("T"), py::arg("mask_prob"), py::arg("mask_length"), py::arg("vmin"),
        py::arg("thresholds"), py::arg("n_thresholds"), py::arg("min_masks"), py::arg("require_same_masks"),
        py::arg("mask_dropout"), py::arg("hf_style"), py::arg("seed"), py::arg("out"),
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace sslfast
