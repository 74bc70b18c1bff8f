// CUDA kernels of sample_negatives: two launches per call, no host sync.
//   1. negatives_scan_kernel (one block): per-row candidate ranks, masked ranks and the
//      candidate-position table (scan_row of csrc/negatives.h), then the row prefixes.
//   2. negatives_draw_kernel: one thread per (positive frame, Philox block of 4 negatives).
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include "negatives.h"
#include "sslfast/bind.h"
#include "sslfast/cuda_check.h"

namespace py = pybind11;

namespace sslfast {
namespace {

// ws64 layout: counts[B], mcounts[B], row_end[B], mstart[B], total[1].
__global__ void negatives_scan_kernel(const uint8_t* mask, const uint8_t* pad, int from_masked_only, int64_t B,
                                      int64_t T, int32_t* rank, int32_t* mrank, int32_t* pos, int64_t* ws64) {
  int64_t* counts = ws64;
  int64_t* mcounts = ws64 + B;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    negatives::scan_row(mask + b * T, pad ? pad + b * T : nullptr, from_masked_only, T, rank + b * T, mrank + b * T,
                        pos + b * T, &counts[b], &mcounts[b]);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0, masked = 0;
    for (int64_t b = 0; b < B; ++b) {
      ws64[3 * B + b] = masked;
      masked += mcounts[b];
      total += counts[b];
      ws64[2 * B + b] = total;
    }
    ws64[4 * B] = total;
  }
}

__global__ void negatives_draw_kernel(int64_t B, int64_t T, int64_t K, int64_t Kc, int hf_layout, uint64_t seed,
                                      const int32_t* rank, const int32_t* mrank, const int32_t* pos,
                                      const int64_t* ws64, int64_t n_rows, int64_t* out) {
  const int64_t kb = (K + 3) / 4, kcb = (Kc + 3) / 4, per_frame = kb + kcb;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * T * per_frame) return;
  const int64_t frame = i / per_frame, q = i % per_frame;
  const int64_t b = frame / T, t = frame % T;
  const int64_t width = K + Kc;
  const int64_t m = mrank[frame];
  if (m < 0) {
    if (hf_layout) {
      const int64_t j0 = q < kb ? 4 * q : K + 4 * (q - kb);
      const int64_t j1 = q < kb ? (4 * q + 4 < K ? 4 * q + 4 : K) : (K + 4 * (q - kb) + 4 < width ? K + 4 * (q - kb) + 4 : width);
      for (int64_t j = j0; j < j1; ++j) out[frame * width + j] = -1;
    }
    return;
  }
  const int64_t row = hf_layout ? frame : ws64[3 * B + b] + m;
  if (row >= n_rows) return;  // a caller's num_masked below mask.sum(): never write past the output
  const negatives::Batch p{B, T, K, Kc, hf_layout, seed, pos, ws64, ws64 + 2 * B, ws64[4 * B]};
  int64_t* row_out = out + row * width;
  if (q < kb) negatives::draw_block(p, b, t, rank[frame], 0, q, row_out);
  else negatives::draw_block(p, b, t, rank[frame], 1, q - kb, row_out + K);
}

void sample_negatives_cuda(std::uintptr_t mask_ptr, std::uintptr_t pad_ptr, int64_t B, int64_t T, int64_t K,
                           int64_t Kc, int from_masked_only, int hf_layout, uint64_t seed, std::uintptr_t ws32_ptr,
                           std::uintptr_t ws64_ptr, int64_t n_rows, std::uintptr_t out_ptr,
                           std::uintptr_t stream_handle) {
  if (B == 0 || T == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  int32_t* ws32 = as_ptr<int32_t>(ws32_ptr);
  int64_t* ws64 = as_ptr<int64_t>(ws64_ptr);
  const int threads_scan = B < 1024 ? static_cast<int>(((B + 31) / 32) * 32) : 1024;
  negatives_scan_kernel<<<1, threads_scan, 0, stream>>>(as_ptr<const uint8_t>(mask_ptr),
                                                         as_ptr<const uint8_t>(pad_ptr), from_masked_only, B, T,
                                                         ws32, ws32 + B * T, ws32 + 2 * B * T, ws64);
  SSLFAST_CUDA_CHECK(cudaGetLastError());
  const int64_t work = B * T * ((K + 3) / 4 + (Kc + 3) / 4);
  if (work == 0) return;
  const int threads = 256;
  negatives_draw_kernel<<<static_cast<unsigned>((work + threads - 1) / threads), threads, 0, stream>>>(
      B, T, K, Kc, hf_layout, seed, ws32, ws32 + B * T, ws32 + 2 * B * T, ws64, n_rows, as_ptr<int64_t>(out_ptr));
  SSLFAST_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void bind_negatives(py::module_& m) {
  m.def("sample_negatives", &sample_negatives_cuda, py::arg("mask"), py::arg("padding_mask"), py::arg("B"),
        py::arg("T"), py::arg("K"), py::arg("Kc"), py::arg("from_masked_only"), py::arg("hf_layout"),
        py::arg("seed"), py::arg("ws32"), py::arg("ws64"), py::arg("n_rows"), py::arg("out"),
        py::arg("cuda_stream"));
}

}  // namespace sslfast
