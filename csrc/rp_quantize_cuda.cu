// CUDA kernels of random-projection quantization and nearest-codeword assignment.
//
// One warp per stacked row: the warp stages the row in shared memory (read straight from
// the (B, T, F) input, no stacked copy), LayerNorms it, projects it (lanes over output
// columns, so the projection's rows are read coalesced), unit-normalises each head, then
// for each head its lanes take codewords v = lane, lane + 32, ... with a running best and
// a shuffle reduction picks the winner (ties to the lowest index, rp_quantize.h's better()).
// No (rows, V) tensor exists. The scoring formula and the tie rule are the ones the CPU
// kernels use (rp_quantize.h).
//
// Limits: the row and its projection live in shared memory, so F*k + H*d <= kMaxSmemFloats
// (sslfast/ops/rp_quantize.py checks it and points at the triton backend beyond it). Each
// row streams the whole codebook of a head from L1/L2; a block-tiled version that stages
// codebook tiles in shared memory for many rows is the next step for large batches.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cmath>

#include "rp_quantize.h"
#include "sslfast/bind.h"
#include "sslfast/cuda_check.h"
#include "sslfast/launch_cuda.h"

namespace py = pybind11;

namespace sslfast {
namespace rpq {
namespace {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__global__ void rp_quantize_kernel(Problem p) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * warps + warp;
  if (n >= p.rows) return;  // warp-uniform
  if (p.mask != nullptr && p.mask[n] == 0) {
    lane_masked_row(p, n, lane);
    return;
  }
  float* xs = smem + warp * p.smem_per_warp;
  float* y = p.proj != nullptr ? xs + p.in_dim : xs;
  const int64_t off = stacked_row_offset(n, p.rows_per_seq, p.T, p.F, p.k);
  lane_stage_row(p, off, lane, xs);
  __syncwarp();
  if (p.layernorm) {
    const float mean = warp_sum(lane_sum(xs, p.in_dim, lane)) / static_cast<float>(p.in_dim);
    const float rstd = layernorm_rstd(warp_sum(lane_centred_sumsq(xs, p.in_dim, mean, lane)), p.in_dim, kLayerNormEps);
    lane_layernorm(xs, p.in_dim, mean, rstd, lane);
    __syncwarp();
  }
  if (p.proj != nullptr) {
    lane_project(p, xs, lane, y);
    __syncwarp();
  }
  for (int64_t h = 0; h < p.H; ++h) {
    float* yh = y + h * p.d;
    if (p.metric == kCosine) {
      const float scale = normalize_scale(warp_sum(lane_sumsq(yh, p.d, lane)));
      __syncwarp();
      lane_scale(yh, p.d, scale, lane);
      __syncwarp();
    }
    float best = -INFINITY;
    int64_t best_index = kNoIndex;
    lane_best_codeword(p, yh, h, lane, best, best_index);
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, best_index, o);
      merge_best(ob, oi, best, best_index);
    }
    if (lane == 0) p.out[n * p.H + h] = label_of(best_index);
  }
}

void rp_quantize_cuda(std::uintptr_t x, int x_dtype, int64_t B, int64_t T, int64_t F, int64_t k, std::uintptr_t proj,
                      std::uintptr_t cb, int cb_dtype, int64_t H, int64_t V, int64_t d, bool layernorm, int metric,
                      std::uintptr_t mask, std::uintptr_t out, std::uintptr_t stream) {
  const Problem p = make_problem(x, x_dtype, B, T, F, k, proj, cb, cb_dtype, H, V, d, layernorm, metric, mask, out);
  const Launches plan = rp_quantize_launch::plan(p.rows, p.smem_per_warp);
  if (plan.empty()) return;
  const Launch& l = plan[0];
  rp_quantize_kernel<<<grid_of(l), l.threads, l.dyn_smem, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  SSLFAST_CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace rpq

void bind_rp_quantize(py::module_& m) {
  m.def("rp_quantize", &rpq::rp_quantize_cuda, py::arg("x"), py::arg("x_dtype"), py::arg("B"), py::arg("T"),
        py::arg("F"), py::arg("k"), py::arg("proj"), py::arg("codebooks"), py::arg("cb_dtype"), py::arg("H"),
        py::arg("V"), py::arg("d"), py::arg("layernorm"), py::arg("metric"), py::arg("mask"), py::arg("out"),
        py::arg("cuda_stream"));
}

}  // namespace sslfast
