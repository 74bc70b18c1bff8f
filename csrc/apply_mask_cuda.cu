// CUDA kernels of apply_mask, no host sync, capturable in a CUDA graph.
//   forward:  one launch, one thread per (frame, block of 4 channels): masked frames get the
//             embedding or the noise of their Philox block (drawn only there, fill_block of
//             csrc/apply_mask.h), unmasked ones copy x (skipped in place).
//   backward: grad_x and per-chunk fp32 partial sums of grad over masked frames (one pass,
//             a block per (chunk of frames, 256 channels)), then a second launch sums the
//             partials in chunk order: deterministic, no atomics.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "apply_mask.h"
#include "sslfast/bind.h"
#include "sslfast/cuda_check.h"
#include "sslfast/launch_cuda.h"

namespace py = pybind11;

namespace sslfast {
namespace {

using apply_mask::Strides;

template <class S>
__global__ void apply_mask_forward_kernel(const typename S::T* x, Strides sx, typename S::T* out, Strides so,
                                          const uint8_t* mask, const typename S::T* fill, int64_t T, int64_t D,
                                          int64_t work, float std, const int64_t* seed_ptr, uint64_t seed,
                                          bool inplace) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= work) return;
  apply_mask::forward_item<S>(x, sx, out, so, mask, fill, T, D, std, load_seed(seed_ptr, seed), inplace, i);
}

template <class S>
__global__ void apply_mask_backward_kernel(const typename S::T* g, Strides sg, typename S::T* gx,
                                           const uint8_t* mask, int64_t T, int64_t D, int64_t n, float* partial) {
  const int64_t d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t c = blockIdx.x;
  if (d >= D) return;
  apply_mask::backward_item<S>(g, sg, gx, mask, T, D, n, partial, c, d);
}

__global__ void apply_mask_sum_partials_kernel(const float* partial, int64_t chunks, int64_t D, float* gfill) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  gfill[d] = apply_mask::sum_partials(partial, chunks, D, d);
}

template <class S>
void forward_launch(std::uintptr_t x, Strides sx, std::uintptr_t out, Strides so, std::uintptr_t mask,
                    std::uintptr_t fill, int64_t B, int64_t T, int64_t D, float std, uint64_t seed,
                    std::uintptr_t seed_ptr, cudaStream_t stream) {
  using E = typename S::T;
  const int64_t work = B * T * ((D + 3) / 4);
  const Launch l = apply_mask_launch::forward(B, T, D)[0];
  apply_mask_forward_kernel<S><<<grid_of(l), l.threads, l.dyn_smem, stream>>>(
      as_ptr<const E>(x), sx, as_ptr<E>(out), so, as_ptr<const uint8_t>(mask), as_ptr<const E>(fill), T, D, work, std,
      as_ptr<const int64_t>(seed_ptr), seed, x == out);
  SSLFAST_CUDA_CHECK(cudaGetLastError());
}

template <class S>
void backward_launch(std::uintptr_t g, Strides sg, std::uintptr_t gx, std::uintptr_t mask, int64_t B, int64_t T,
                     int64_t D, std::uintptr_t partial, std::uintptr_t gfill, cudaStream_t stream) {
  using E = typename S::T;
  const int64_t n = B * T, chunks = (n + apply_mask::kGradChunk - 1) / apply_mask::kGradChunk;
  const Launches plan = apply_mask_launch::backward(B, T, D, gfill != 0, apply_mask::kGradChunk);
  apply_mask_backward_kernel<S><<<grid_of(plan[0]), plan[0].threads, plan[0].dyn_smem, stream>>>(as_ptr<const E>(g), sg, as_ptr<E>(gx),
                                                               as_ptr<const uint8_t>(mask), T, D, n,
                                                               as_ptr<float>(partial));
  SSLFAST_CUDA_CHECK(cudaGetLastError());
  if (plan.size() < 2) return;
  apply_mask_sum_partials_kernel<<<grid_of(plan[1]), plan[1].threads, plan[1].dyn_smem, stream>>>(
      as_ptr<const float>(partial), chunks, D, as_ptr<float>(gfill));
  SSLFAST_CUDA_CHECK(cudaGetLastError());
}

void apply_mask_forward(std::uintptr_t x, int64_t sxb, int64_t sxt, int64_t sxd, std::uintptr_t out, int64_t sob,
                        int64_t sot, int64_t sod, std::uintptr_t mask, std::uintptr_t fill, int dtype, int64_t B,
                        int64_t T, int64_t D, float std, uint64_t seed, std::uintptr_t seed_ptr,
                        std::uintptr_t stream_handle) {
  if (B == 0 || T == 0 || D == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const Strides sx{sxb, sxt, sxd}, so{sob, sot, sod};
  switch (dtype) {
    case static_cast<int>(DType::f32):
      return forward_launch<F32>(x, sx, out, so, mask, fill, B, T, D, std, seed, seed_ptr, stream);
    case static_cast<int>(DType::f16):
      return forward_launch<F16>(x, sx, out, so, mask, fill, B, T, D, std, seed, seed_ptr, stream);
    case static_cast<int>(DType::bf16):
      return forward_launch<BF16>(x, sx, out, so, mask, fill, B, T, D, std, seed, seed_ptr, stream);
    default: throw std::invalid_argument("apply_mask: dtype code must be 0 (f32), 1 (f16) or 2 (bf16)");
  }
}

void apply_mask_backward(std::uintptr_t g, int64_t sgb, int64_t sgt, int64_t sgd, std::uintptr_t gx,
                         std::uintptr_t mask, int dtype, int64_t B, int64_t T, int64_t D, std::uintptr_t partial,
                         std::uintptr_t gfill, std::uintptr_t stream_handle) {
  if (B == 0 || T == 0 || D == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const Strides sg{sgb, sgt, sgd};
  switch (dtype) {
    case static_cast<int>(DType::f32): return backward_launch<F32>(g, sg, gx, mask, B, T, D, partial, gfill, stream);
    case static_cast<int>(DType::f16): return backward_launch<F16>(g, sg, gx, mask, B, T, D, partial, gfill, stream);
    case static_cast<int>(DType::bf16): return backward_launch<BF16>(g, sg, gx, mask, B, T, D, partial, gfill, stream);
    default: throw std::invalid_argument("apply_mask: dtype code must be 0 (f32), 1 (f16) or 2 (bf16)");
  }
}

}  // namespace

void bind_apply_mask(py::module_& m) {
  m.attr("apply_mask_grad_chunk") = apply_mask::kGradChunk;
  m.def("apply_mask_forward", &apply_mask_forward, py::arg("x"), py::arg("sxb"), py::arg("sxt"), py::arg("sxd"),
        py::arg("out"), py::arg("sob"), py::arg("sot"), py::arg("sod"), py::arg("mask"), py::arg("fill"),
        py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("D"), py::arg("std"), py::arg("seed"),
        py::arg("seed_ptr"), py::arg("cuda_stream"));
  m.def("apply_mask_backward", &apply_mask_backward, py::arg("grad"), py::arg("sgb"), py::arg("sgt"), py::arg("sgd"),
        py::arg("grad_x"), py::arg("mask"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("D"),
        py::arg("partial"), py::arg("grad_fill"), py::arg("cuda_stream"));
}

}  // namespace sslfast
