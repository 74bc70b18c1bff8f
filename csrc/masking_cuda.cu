// CUDA kernels of compute_mask_indices: one block per row, no host sync.
//   1. mask_rows_kernel: steps 1-5 of the reference (csrc/masking.h); "the n smallest keys"
//      by counting each key's rank in the row (O(R^2 / threads) per row: R = 781 is ~2.4k
//      comparisons a thread), which selects the same set as the CPU's nth_element.
//   2. mask_equalize_kernel (fairseq style with require_same_masks or mask_dropout only):
//      the cross-row minimum, then the same rank selection on the masked frames.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include "masking.h"
#include "sslfast/bind.h"
#include "sslfast/cuda_check.h"

namespace py = pybind11;

namespace sslfast {
namespace {

using masking::Params;
constexpr int kThreads = 256;
constexpr uint64_t kFar = ~uint64_t(0);

// Rank of keys[i] among keys[0, n) (keys distinct, kFar entries rank last).
__device__ int64_t rank_in(const uint64_t* keys, int64_t n, int64_t i) {
  const uint64_t k = keys[i];
  int64_t r = 0;
  for (int64_t j = 0; j < n; ++j) r += keys[j] < k ? 1 : 0;
  return r;
}

__global__ void mask_rows_kernel(Params p, const int64_t* lengths, const uint8_t* pad, int64_t n_cap, int64_t r_cap,
                                 int64_t* lens_ws, uint64_t* keys_ws, int64_t* counts, uint8_t* out) {
  const int64_t b = blockIdx.x;
  const int64_t T = p.T;
  uint8_t* row = out + b * T;
  int64_t* lens = lens_ws + b * n_cap;
  uint64_t* keys = keys_ws + b * r_cap;
  __shared__ int64_t s_n, s_R, s_sz;
  __shared__ unsigned long long s_count;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) row[t] = 0;
  __syncthreads();  // no_overlap paints the row from thread 0 below
  if (threadIdx.x == 0) {
    const int64_t sz = lengths[b];
    const int64_t n = masking::span_count(p, b, sz);
    int64_t min_len = INT64_MAX;
    bool all_zero = true;
    for (int64_t i = 0; i < n; ++i) {
      lens[i] = masking::span_length(p, b, i);
      all_zero = all_zero && lens[i] == 0;
    }
    if (n > 0 && all_zero) lens[0] = masking::zero_length_fix(p, sz);
    for (int64_t i = 0; i < n; ++i) min_len = lens[i] < min_len ? lens[i] : min_len;
    s_n = n;
    s_sz = sz;
    s_R = n > 0 ? masking::start_range(p, sz, n, min_len) : 0;
    if (p.no_overlap) {  // sequential by nature (fairseq's interval list): one thread per row
      masking::sort_desc(lens, n);
      int64_t* parts = reinterpret_cast<int64_t*>(keys);
      masking::no_overlap_row(p, b, sz, n, lens, min_len, parts, parts + n + 1, row);
      s_R = 0;
    }
    s_count = 0;
  }
  __syncthreads();
  const int64_t n = s_n, R = s_R, sz = s_sz;
  for (int64_t s = threadIdx.x; s < R; s += blockDim.x) keys[s] = masking::rank_key(p.seed, b, s, masking::kStreamStart);
  __syncthreads();
  for (int64_t s = threadIdx.x; s < R; s += blockDim.x) {
    const int64_t r = rank_in(keys, R, s);
    if (r < n) {
      const int64_t e = s + lens[r] < sz ? s + lens[r] : sz;
      for (int64_t t = s; t < e; ++t) row[t] = 1;  // overlapping spans write the same byte
    }
  }
  __syncthreads();
  unsigned long long c = 0;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    if (pad && pad[b * T + t]) row[t] = 0;
    c += row[t];
  }
  atomicAdd(&s_count, c);
  __syncthreads();
  if (threadIdx.x == 0) counts[b] = static_cast<int64_t>(s_count);
}

// Keep the `keep` masked frames of the row with the smallest keys of `stream`.
__device__ void keep_smallest(const Params& p, int64_t b, uint8_t* row, uint64_t* keys, int64_t keep,
                              uint32_t stream) {
  for (int64_t t = threadIdx.x; t < p.T; t += blockDim.x)
    keys[t] = row[t] ? masking::rank_key(p.seed, b, t, stream) : kFar;
  __syncthreads();
  for (int64_t t = threadIdx.x; t < p.T; t += blockDim.x)
    if (keys[t] != kFar && rank_in(keys, p.T, t) >= keep) row[t] = 0;
  __syncthreads();
}

__global__ void mask_equalize_kernel(Params p, const int64_t* counts, int64_t r_cap, uint64_t* keys_ws, uint8_t* out) {
  const int64_t b = blockIdx.x;
  uint8_t* row = out + b * p.T;
  uint64_t* keys = keys_ws + b * r_cap;
  __shared__ int64_t s_min;
  if (threadIdx.x == 0) {
    int64_t m = counts[0];
    for (int64_t i = 1; i < p.B; ++i) m = counts[i] < m ? counts[i] : m;
    s_min = m;
  }
  __syncthreads();
  int64_t c = counts[b];
  if (p.require_same && c > s_min) {
    keep_smallest(p, b, row, keys, s_min, masking::kStreamEqualize);
    c = s_min;
  }
  if (p.dropout > 0.0) keep_smallest(p, b, row, keys, masking::dropout_keep(p, c), masking::kStreamDropout);
}

void compute_mask_indices_cuda(std::uintptr_t lengths_ptr, std::uintptr_t pad_ptr, int64_t B, int64_t T,
                               double mask_prob, int64_t L, int64_t vmin, std::uintptr_t thr_ptr, int64_t n_thr,
                               int64_t min_masks, int require_same, double dropout, int hf, uint64_t seed,
                               int no_overlap, int64_t min_space, int64_t n_cap, int64_t r_cap, std::uintptr_t lens_ws, std::uintptr_t keys_ws,
                               std::uintptr_t counts_ws, std::uintptr_t out_ptr, std::uintptr_t stream_handle) {
  if (B == 0 || T == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const Params p{B, T, mask_prob, L, vmin, as_ptr<const int64_t>(thr_ptr), n_thr, min_masks, require_same,
                 dropout, hf, seed, no_overlap, min_space};
  mask_rows_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
      p, as_ptr<const int64_t>(lengths_ptr), as_ptr<const uint8_t>(pad_ptr), n_cap, r_cap, as_ptr<int64_t>(lens_ws),
      as_ptr<uint64_t>(keys_ws), as_ptr<int64_t>(counts_ws), as_ptr<uint8_t>(out_ptr));
  SSLFAST_CUDA_CHECK(cudaGetLastError());
  if (hf || (!require_same && dropout <= 0.0)) return;
  mask_equalize_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
      p, as_ptr<const int64_t>(counts_ws), r_cap, as_ptr<uint64_t>(keys_ws), as_ptr<uint8_t>(out_ptr));
  SSLFAST_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void bind_masking(py::module_& m) {
  m.def("compute_mask_indices", &compute_mask_indices_cuda, py::arg("lengths"), py::arg("padding_mask"),
        py::arg("B"), py::arg("T"), py::arg("mask_prob"), py::arg("mask_length"), py::arg("vmin"),
        py::arg("thresholds"), py::arg("n_thresholds"), py::arg("min_masks"), py::arg("require_same_masks"),
        py::arg("mask_dropout"), py::arg("hf_style"), py::arg("seed"), py::arg("no_overlap"),
        py::arg("min_space"), py::arg("n_cap"), py::arg("r_cap"),
        py::arg("lens_ws"), py::arg("keys_ws"), py::arg("counts_ws"), py::arg("out"), py::arg("cuda_stream"));
}

}  // namespace sslfast
