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

constexpr int kWarp = rp_quantize_launch::kWarp;
constexpr int64_t kNoIndex = INT64_MAX;


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
    for (int64_t h = lane; h < p.H; h += kWarp) p.out[n * p.H + h] = -1;
    return;
  }
  float* xs = smem + warp * p.smem_per_warp;
  float* y = p.proj != nullptr ? xs + p.in_dim : xs;
  const int64_t off = stacked_row_offset(n, p.rows_per_seq, p.T, p.F, p.k);
  for (int64_t i = lane; i < p.in_dim; i += kWarp) xs[i] = load_float(p.x, off + i, p.x_dtype);
  __syncwarp();
  if (p.layernorm) {
    float s = 0.0f;
    for (int64_t i = lane; i < p.in_dim; i += kWarp) s += xs[i];
    const float mean = warp_sum(s) / static_cast<float>(p.in_dim);
    float m2 = 0.0f;
    for (int64_t i = lane; i < p.in_dim; i += kWarp) m2 += (xs[i] - mean) * (xs[i] - mean);
    const float rstd = layernorm_rstd(warp_sum(m2), p.in_dim, kLayerNormEps);
    for (int64_t i = lane; i < p.in_dim; i += kWarp) xs[i] = (xs[i] - mean) * rstd;
    __syncwarp();
  }
  const int64_t hd = p.H * p.d;
  if (p.proj != nullptr) {
    for (int64_t c = lane; c < hd; c += kWarp) {
      float acc = 0.0f;
      for (int64_t i = 0; i < p.in_dim; ++i) acc += xs[i] * p.proj[i * hd + c];
      y[c] = acc;
    }
    __syncwarp();
  }
  for (int64_t h = 0; h < p.H; ++h) {
    float* yh = y + h * p.d;
    if (p.metric == kCosine) {
      float ss = 0.0f;
      for (int64_t j = lane; j < p.d; j += kWarp) ss += yh[j] * yh[j];
      const float scale = normalize_scale(warp_sum(ss));
      __syncwarp();
      for (int64_t j = lane; j < p.d; j += kWarp) yh[j] *= scale;
      __syncwarp();
    }
    float best = -INFINITY;
    int64_t best_index = kNoIndex;
    const int64_t cb0 = h * p.V * p.d;
    for (int64_t v = lane; v < p.V; v += kWarp) {
      float dot = 0.0f, cc = 0.0f;
      for (int64_t j = 0; j < p.d; ++j) {
        const float c = load_float(p.cb, cb0 + v * p.d + j, p.cb_dtype);
        dot += yh[j] * c;
        cc += c * c;
      }
      float a, b;
      codeword_coeffs(cc, p.metric, &a, &b);
      const float s = dot * a + b;
      if (better(s, v, best, best_index)) {
        best = s;
        best_index = v;
      }
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, best_index, o);
      if (better(ob, oi, best, best_index)) {
        best = ob;
        best_index = oi;
      }
    }
    // Only NaN scores everywhere leave no winner: label 0, as on the CPU.
    if (lane == 0) p.out[n * p.H + h] = best_index == kNoIndex ? 0 : best_index;
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
