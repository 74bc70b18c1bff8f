// CPU kernels of sample_negatives: a per-row scan, a serial prefix over rows, then the draws
// of every positive, all in one call. The math is csrc/negatives.h, shared with CUDA.
#include <pybind11/pybind11.h>

#include <vector>

#include "negatives.h"
#include "sslfast/bind.h"

namespace py = pybind11;

namespace sslfast {

static void sample_negatives_cpu(std::uintptr_t mask_ptr, std::uintptr_t pad_ptr, int64_t B, int64_t T, int64_t K,
                                 int64_t Kc, int from_masked_only, int hf_layout, uint64_t seed,
                                 std::uintptr_t out_ptr) {
  if (B == 0 || T == 0) return;
  const uint8_t* mask = as_ptr<const uint8_t>(mask_ptr);
  const uint8_t* pad = as_ptr<const uint8_t>(pad_ptr);
  int64_t* out = as_ptr<int64_t>(out_ptr);
  std::vector<int32_t> rank(B * T), mrank(B * T), pos(B * T);
  std::vector<int64_t> counts(B), mcounts(B), row_end(B), mstart(B);
#pragma omp parallel for schedule(static) if (B * T > 262144)
  for (int64_t b = 0; b < B; ++b) {
    negatives::scan_row(mask + b * T, pad ? pad + b * T : nullptr, from_masked_only, T, &rank[b * T], &mrank[b * T],
                        &pos[b * T], &counts[b], &mcounts[b]);
  }
  int64_t total = 0, masked = 0;
  for (int64_t b = 0; b < B; ++b) {
    mstart[b] = masked;
    masked += mcounts[b];
    total += counts[b];
    row_end[b] = total;
  }
  const negatives::Batch p{B, T, K, Kc, hf_layout, seed, pos.data(), counts.data(), row_end.data(), total};
  const int64_t width = K + Kc;
  const int64_t kb = (K + 3) / 4, kcb = (Kc + 3) / 4;
#pragma omp parallel for schedule(dynamic, 1) if (masked * width > 1048576)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t m = mrank[b * T + t];
      int64_t* row_out = out + (hf_layout ? (b * T + t) : (mstart[b] + m)) * width;
      if (m < 0) {
        if (hf_layout)
          for (int64_t j = 0; j < width; ++j) row_out[j] = -1;
        continue;
      }
      const int64_t own = rank[b * T + t];
      for (int64_t q = 0; q < kb; ++q) negatives::draw_block(p, b, t, own, 0, q, row_out);
      for (int64_t q = 0; q < kcb; ++q) negatives::draw_block(p, b, t, own, 1, q, row_out + K);
    }
  }
}

void bind_negatives(py::module_& m) {
  m.def("sample_negatives", &sample_negatives_cpu, py::arg("mask"), py::arg("padding_mask"), py::arg("B"),
        py::arg("T"), py::arg("K"), py::arg("Kc"), py::arg("from_masked_only"), py::arg("hf_layout"),
        py::arg("seed"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace sslfast
