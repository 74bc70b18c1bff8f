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
#include "sslfast/launch_cuda.h"

namespace py = pybind11;

namespace sslfast {
namespace {

using masking::Params;

// One block per row; the phases are csrc/masking.h's, separated by barriers. Both kernels
// take the key as p.seed or, when seed_ptr is set, from the seed tensor (load_seed).
__global__ void mask_rows_kernel(Params p, const int64_t* seed_ptr, const int64_t* lengths, const uint8_t* pad,
                                 int64_t n_cap, int64_t r_cap, int64_t* lens_ws, uint64_t* keys_ws, int64_t* counts,
                                 uint8_t* out) {
  p.seed = load_seed(seed_ptr, p.seed);
  const int64_t b = blockIdx.x;
  const int64_t T = p.T;
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  uint8_t* row = out + b * T;
  int64_t* lens = lens_ws + b * n_cap;
  uint64_t* keys = keys_ws + b * r_cap;
  __shared__ masking::RowPlan s_plan;
  __shared__ unsigned long long s_count;
  for (int64_t t = tid; t < T; t += nt) row[t] = 0;
  __syncthreads();  // no_overlap paints the row from thread 0 below
  if (tid == 0) {
    s_plan = masking::row_plan(p, b, lengths[b], lens, reinterpret_cast<int64_t*>(keys), row);
    s_count = 0;
  }
  __syncthreads();
  const masking::RowPlan plan = s_plan;
  masking::row_keys(p, b, plan.R, keys, tid, nt);
  __syncthreads();
  masking::row_paint(plan, keys, lens, row, tid, nt);
  __syncthreads();
  atomicAdd(&s_count, static_cast<unsigned long long>(masking::row_unpad_count(row, pad ? pad + b * T : nullptr, T, tid, nt)));
  __syncthreads();
  if (tid == 0) counts[b] = static_cast<int64_t>(s_count);
}

// Keep the `keep` masked frames of the row with the smallest keys of `stream`.
__device__ void keep_smallest(const Params& p, int64_t b, uint8_t* row, uint64_t* keys, int64_t keep,
                              uint32_t stream) {
  masking::keep_keys(p, b, row, keys, stream, threadIdx.x, blockDim.x);
  __syncthreads();
  masking::keep_drop(p, keys, keep, row, threadIdx.x, blockDim.x);
  __syncthreads();
}

__global__ void mask_equalize_kernel(Params p, const int64_t* seed_ptr, const int64_t* counts, int64_t r_cap,
                                     uint64_t* keys_ws, uint8_t* out) {
  p.seed = load_seed(seed_ptr, p.seed);
  const int64_t b = blockIdx.x;
  uint8_t* row = out + b * p.T;
  uint64_t* keys = keys_ws + b * r_cap;
  __shared__ int64_t s_min;
  if (threadIdx.x == 0) s_min = masking::min_count(counts, p.B);
  __syncthreads();
  const masking::KeepPlan k = masking::keep_plan(p, counts[b], s_min);
  if (k.equalize >= 0) keep_smallest(p, b, row, keys, k.equalize, masking::kStreamEqualize);
  if (k.dropout >= 0) keep_smallest(p, b, row, keys, k.dropout, masking::kStreamDropout);
}

void compute_mask_indices_cuda(std::uintptr_t lengths_ptr, std::uintptr_t pad_ptr, int64_t B, int64_t T,
                               double mask_prob, int64_t L, int64_t vmin, std::uintptr_t thr_ptr, int64_t n_thr,
                               int64_t min_masks, int require_same, double dropout, int hf, uint64_t seed,
                               std::uintptr_t seed_ptr, int no_overlap, int64_t min_space, int64_t n_cap, int64_t r_cap,
                               std::uintptr_t lens_ws, std::uintptr_t keys_ws, std::uintptr_t counts_ws,
                               std::uintptr_t out_ptr, std::uintptr_t stream_handle) {
  if (B == 0 || T == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const Params p{B, T, mask_prob, L, vmin, as_ptr<const int64_t>(thr_ptr), n_thr, min_masks, require_same,
                 dropout, hf, seed, no_overlap, min_space};
  const Launches plan = masking_launch::plan(B, T, hf, require_same, dropout);
  mask_rows_kernel<<<grid_of(plan[0]), plan[0].threads, plan[0].dyn_smem, stream>>>(
      p, as_ptr<const int64_t>(seed_ptr), as_ptr<const int64_t>(lengths_ptr), as_ptr<const uint8_t>(pad_ptr), n_cap,
      r_cap, as_ptr<int64_t>(lens_ws), as_ptr<uint64_t>(keys_ws), as_ptr<int64_t>(counts_ws), as_ptr<uint8_t>(out_ptr));
  SSLFAST_CUDA_CHECK(cudaGetLastError());
  if (plan.size() < 2) return;
  mask_equalize_kernel<<<grid_of(plan[1]), plan[1].threads, plan[1].dyn_smem, stream>>>(
      p, as_ptr<const int64_t>(seed_ptr), as_ptr<const int64_t>(counts_ws), r_cap, as_ptr<uint64_t>(keys_ws),
      as_ptr<uint8_t>(out_ptr));
  SSLFAST_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void bind_masking(py::module_& m) {
  m.def("compute_mask_indices", &compute_mask_indices_cuda, py::arg("lengths"), py::arg("padding_mask"),
        py::arg("B"), py::arg("T"), py::arg("mask_prob"), py::arg("mask_length"), py::arg("vmin"),
        py::arg("thresholds"), py::arg("n_thresholds"), py::arg("min_masks"), py::arg("require_same_masks"),
        py::arg("mask_dropout"), py::arg("hf_style"), py::arg("seed"), py::arg("seed_ptr"),
        py::arg("no_overlap"), py::arg("min_space"), py::arg("n_cap"), py::arg("r_cap"),
        py::arg("lens_ws"), py::arg("keys_ws"), py::arg("counts_ws"), py::arg("out"), py::arg("cuda_stream"));
}

}  // namespace sslfast
