// CUDA kernels of the Gumbel-softmax vector quantizer (sslfast.gumbel_vector_quantize).
// The per-element math (noise, dtype conversion, argmax rule, softmax gradient) is
// csrc/gumbel_quantize.h, shared with the CPU kernels.
//
// forward: block = (chunk of kChunk frames, group g), one warp per frame row: running
//   (max, first argmax) of the logits and of logits + noise, softmax normaliser, code,
//   codebook row copy; then the block's threads sum the soft and hard marginals over the
//   chunk's frames column by column (fixed order) into a per-chunk partial, and a second
//   kernel adds the partials in chunk order: deterministic, no atomics.
// backward (logits): one warp per row (n, g); soft probabilities and a = C_g grad_q are kept
//   in shared memory (2V + d floats per warp); the noise is redrawn from the seed.
// backward (codebook): block = (codeword, 128 dims); it scans the codes 128 at a time and
//   adds the output gradients of the frames that chose it in frame order (deterministic).
//
// Soft quantization (hard=False, training): the forward kernel above gives codes and
// marginals, then soft_forward_kernel (block = kSoftRows frames x group g) keeps their
// probabilities softmax((l + g) / tau) in shared memory and makes q = soft @ C_g (threads over
// (frame, dim), codebook rows read through the cache). The backward's logits kernel is the hard
// one (the straight-through gradient is the soft gradient) and also writes each row's softmax
// statistics (max of l + g, 1 / normaliser), so soft_codebook_kernel (block = chunk of frames x
// 8 codewords x 128 dims) rebuilds only its own probabilities; it sums soft^T grad_q per chunk
// (gq::soft_chunk_rows) into a partial, and reduce_chunks_kernel adds the partials in chunk
// order: deterministic, no atomics, never the (N, G*V) probabilities.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "gumbel_quantize.h"
#include "sslfast/bind.h"
#include "sslfast/cuda_check.h"
#include "sslfast/launch_cuda.h"

namespace py = pybind11;

namespace sslfast {
namespace {

using gumbel_launch::kChunk;
using gumbel_launch::kForwardWarps;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ __forceinline__ gq::MaxArg warp_maxarg(gq::MaxArg a) {
  for (int o = 16; o > 0; o >>= 1) {
    const float m = __shfl_xor_sync(kFull, a.m, o);
    const long long i = __shfl_xor_sync(kFull, static_cast<long long>(a.i), o);
    gq::maxarg_update(a, m, i);
  }
  return a;
}

// One warp: buf[v] = tempered_weight(l_v + g_v) of Gumbel-noised row (n, g) (unnormalised
// soft probabilities, the row's V logits from `base`); sets *ym to the row's max of l + g and
// returns 1 / sum of the weights.
__device__ __forceinline__ float tempered_row(const void* logits, int ldtype, int64_t base, int64_t V, int64_t n,
                                              int64_t g, float tau, uint64_t seed, int lane, float* buf, float* ym) {
  const float m = warp_max(gq::lane_noisy_logits(logits, ldtype, base, V, n, g, seed, lane, buf));
  const float z = gq::lane_tempered_weights(V, m, tau, lane, buf);
  *ym = m;
  return 1.0f / warp_sum(z);
}

__global__ void forward_kernel(const void* logits, int ldtype, const char* codebook, int esize, int64_t N, int64_t G,
                               int64_t V, int64_t D, bool training, bool gather, const int64_t* seed_ptr,
                               uint64_t seed, const uint8_t* mask, char* quant, int64_t* codes, float* partial) {
  seed = load_seed(seed_ptr, seed);
  __shared__ float s_m[kChunk];
  __shared__ float s_inv_z[kChunk];
  __shared__ int64_t s_am[kChunk];
  __shared__ int s_sel[kChunk];
  const int64_t chunk = blockIdx.x;
  const int64_t g = blockIdx.y;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t GV = G * V;

  for (int i = warp; i < kChunk; i += kForwardWarps) {
    const int64_t n = chunk * kChunk + i;
    if (n >= N) {
      if (lane == 0) s_sel[i] = 0;
      continue;
    }
    const int64_t base = n * GV + g * V;
    gq::MaxArg ml{-INFINITY, V};
    gq::MaxArg mz{-INFINITY, V};
    gq::lane_maxargs(logits, ldtype, base, V, n, g, training, seed, lane, ml, mz);
    ml = warp_maxarg(ml);
    if (ml.i == V) ml.i = 0;  // all -inf or NaN: code 0, like the CPU kernel
    int64_t code = ml.i;
    if (training) {
      mz = warp_maxarg(mz);
      code = mz.i == V ? 0 : mz.i;
    }
    const float z = warp_sum(gq::lane_exp_sum(logits, ldtype, base, V, ml.m, lane));
    if (lane == 0) gq::record_row(n, G, g, code, ml, z, mask, i, codes, s_m, s_inv_z, s_am, s_sel);
    const int64_t src = (g * V + code) * D;
    const int64_t dst = (n * G + g) * D;
    if (!gather) continue;  // soft: soft_forward_kernel writes the output
    gq::lane_copy_code(codebook, esize, src, dst, D, lane, quant);
  }
  __syncthreads();
  gq::chunk_marginals(logits, ldtype, chunk, g, G, V, s_m, s_inv_z, s_am, s_sel, threadIdx.x, blockDim.x, partial);
}

__global__ void reduce_partials_kernel(const float* partial, int64_t n_chunks, int64_t width, float* out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= width) return;
  out[j] = gq::sum_partials(partial, n_chunks, width, j);
}

__global__ void backward_logits_kernel(const void* grad_q, int gdtype, const void* logits, int ldtype,
                                       const float* cbt, const uint8_t* mask, const float* w, int64_t N, int64_t G,
                                       int64_t V, int64_t D, bool training, float tau, const int64_t* seed_ptr,
                                       uint64_t seed, void* grad_logits, float* soft_stats) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp;
  if (row >= N * G) return;  // whole warps exit together: only __syncwarp below
  const int64_t n = row / G;
  const int64_t g = row % G;
  const int64_t base = n * G * V + g * V;
  float* s_buf = smem + static_cast<int64_t>(warp) * (2 * V + D);
  float* acc = s_buf + V;  // a, then the gradient
  float* gq_row = acc + V;

  if (training) {
    float ym;
    const float inv_z = tempered_row(logits, ldtype, base, V, n, g, tau, load_seed(seed_ptr, seed), lane, s_buf, &ym);
    if (soft_stats != nullptr && lane == 0) {
      soft_stats[row * 2] = ym;
      soft_stats[row * 2 + 1] = inv_z;
    }
    gq::lane_load(grad_q, gdtype, row * D, D, lane, gq_row);
    __syncwarp();
    const float* ct = cbt + g * D * V;
    const float sa = warp_sum(gq::lane_soft_dot(gq_row, ct, V, D, inv_z, lane, s_buf, acc));
    gq::lane_softmax_grad(s_buf, sa, tau, V, lane, acc);
  } else {
    for (int64_t v = lane; v < V; v += 32) acc[v] = 0.0f;
  }
  const bool sel = mask == nullptr || mask[n] != 0;
  if (sel && w != nullptr) {
    const float m = warp_max(gq::lane_max(logits, ldtype, base, V, lane));
    const float inv_z = 1.0f / warp_sum(gq::lane_exp_sum(logits, ldtype, base, V, m, lane));
    const float* wg = w + g * V;
    const float pw = warp_sum(gq::lane_probs_dot(logits, ldtype, base, V, m, inv_z, wg, lane, s_buf));
    gq::lane_add_softmax_grad(s_buf, wg, pw, V, lane, acc);
  }
  gq::lane_store(acc, V, base, ldtype, lane, grad_logits);
}

using gumbel_launch::kCodebookThreads;

__global__ void backward_codebook_kernel(const void* grad_q, int gdtype, const int64_t* codes, int64_t N, int64_t G,
                                         int64_t V, int64_t D, void* grad_cb, int cdtype) {
  __shared__ int64_t s_list[kCodebookThreads];
  __shared__ int s_count[kCodebookThreads / 32];
  const int64_t j = blockIdx.x;
  const int64_t g = j / V;
  const int64_t v = j % V;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kCodebookThreads + threadIdx.x;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  float acc = 0.0f;
  for (int64_t n0 = 0; n0 < N; n0 += kCodebookThreads) {
    const int64_t n = n0 + threadIdx.x;
    const bool hit = n < N && codes[n * G + g] == v;
    const unsigned bits = __ballot_sync(kFull, hit);
    if (lane == 0) s_count[warp] = __popc(bits);
    __syncthreads();
    int offset, total;
    gq::warp_offsets(s_count, warp, offset, total);
    // frames land in s_list in frame order, so the sum order is fixed
    if (hit) s_list[offset + __popc(bits & ((1u << lane) - 1u))] = n;
    __syncthreads();
    if (k < D) gq::add_listed(grad_q, gdtype, s_list, total, G, g, D, k, acc);
    __syncthreads();
  }
  if (k < D) store_float(grad_cb, j * D + k, cdtype, acc);
}

using gumbel_launch::kSoftThreads;
using gumbel_launch::kSoftCbRows;  // frames per step of soft_codebook_kernel
using gumbel_launch::kSoftCbVars;  // codewords per soft_codebook_kernel block
using gumbel_launch::kSoftCbDims;  // dims per soft_codebook_kernel block, 4 per lane

__global__ void soft_forward_kernel(const void* logits, int ldtype, const void* codebook, int cdtype, int64_t N,
                                    int64_t G, int64_t V, int64_t D, int64_t rows, float tau,
                                    const int64_t* seed_ptr, uint64_t seed, void* quant) {
  extern __shared__ float s_p[];  // (rows, V) probabilities
  seed = load_seed(seed_ptr, seed);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * rows;
  const int64_t g = blockIdx.y;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t nt = N - n0 < rows ? N - n0 : rows;
  for (int64_t t = warp; t < nt; t += kSoftThreads / 32) {
    const int64_t n = n0 + t;
    const int64_t base = n * G * V + g * V;
    float* p = s_p + t * V;
    float ym;
    gq::lane_scale(V, tempered_row(logits, ldtype, base, V, n, g, tau, seed, lane, p, &ym), lane, p);
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < nt * D; i += kSoftThreads) {
    const int64_t t = i / D;
    const int64_t k = i % D;
    store_float(quant, ((n0 + t) * G + g) * D + k, cdtype, gq::soft_q(s_p + t * V, codebook, cdtype, g, V, D, k));
  }
}

__global__ void soft_codebook_kernel(const void* grad_q, int gdtype, const void* logits, int ldtype,
                                     const float* stats, int64_t N, int64_t G, int64_t V, int64_t D,
                                     int64_t chunk_rows, float tau, const int64_t* seed_ptr, uint64_t seed,
                                     float* partial) {
  seed = load_seed(seed_ptr, seed);
  __shared__ float s_p[kSoftCbRows][kSoftCbVars];
  __shared__ float s_gq[kSoftCbRows][kSoftCbDims];
  const int64_t chunk = blockIdx.x;
  const int64_t v_tiles = (V + kSoftCbVars - 1) / kSoftCbVars;
  const int64_t g = blockIdx.y / v_tiles;
  const int64_t v0 = (blockIdx.y % v_tiles) * kSoftCbVars;
  const int64_t k0 = static_cast<int64_t>(blockIdx.z) * kSoftCbDims;
  const int vv = threadIdx.x / 32;  // this thread's codeword v0 + vv ...
  const int lane = threadIdx.x % 32;  // ... and dims k0 + lane + 32 i
  const int64_t row_end = (chunk + 1) * chunk_rows < N ? (chunk + 1) * chunk_rows : N;
  float acc[gq::kSoftCbPerLane] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t r0 = chunk * chunk_rows; r0 < row_end; r0 += kSoftCbRows) {
    gq::soft_cb_stage(grad_q, gdtype, logits, ldtype, stats, G, g, V, v0, D, k0, r0, row_end, tau, seed, threadIdx.x,
                      s_p, s_gq);
    __syncthreads();
    gq::soft_cb_accumulate(s_p, s_gq, vv, lane, acc);
    __syncthreads();
  }
  const int64_t v = v0 + vv;
  if (v >= V) return;
  gq::soft_cb_store(acc, k0, D, lane, partial + (chunk * G * V + g * V + v) * D);
}

__global__ void reduce_chunks_kernel(const float* partial, int64_t n_chunks, int64_t width, void* out, int dtype) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= width) return;
  store_float(out, j, dtype, gq::sum_partials(partial, n_chunks, width, j));
}

int64_t num_chunks(int64_t n) { return gumbel_launch::num_chunks(n); }

// Floats of the soft backward's workspace: (N, G, 2) row statistics, then the chunk partials.
int64_t soft_workspace(int64_t N, int64_t G, int64_t V, int64_t D) { return gq::soft_workspace_floats(N, G, V, D); }

void forward_cuda(std::uintptr_t logits_p, int ldtype, std::uintptr_t codebook_p, int cdtype, int64_t N, int64_t G,
                  int64_t V, int64_t D, bool training, bool hard, double tau, uint64_t seed, std::uintptr_t seed_p,
                  std::uintptr_t mask_p, std::uintptr_t quant_p, std::uintptr_t codes_p, std::uintptr_t partial_p,
                  std::uintptr_t sums_p, std::uintptr_t stream_h) {
  const Launches plan = gumbel_launch::forward(N, G, V, training, hard);
  if (plan.empty()) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_h);
  const bool soft = training && !hard;
  const int64_t chunks = num_chunks(N);
  const Launch& fw = plan[0];
  forward_kernel<<<grid_of(fw), fw.threads, fw.dyn_smem, stream>>>(
      as_ptr<const void>(logits_p), ldtype, as_ptr<const char>(codebook_p), cdtype == 0 ? 4 : 2, N, G, V, D,
      training, !soft, as_ptr<const int64_t>(seed_p), seed, as_ptr<const uint8_t>(mask_p), as_ptr<char>(quant_p),
      as_ptr<int64_t>(codes_p), as_ptr<float>(partial_p));
  SSLFAST_CUDA_CHECK(cudaGetLastError());
  if (soft) {
    const Launch& sf = plan[1];
    soft_forward_kernel<<<grid_of(sf), sf.threads, sf.dyn_smem, stream>>>(
        as_ptr<const void>(logits_p), ldtype, as_ptr<const void>(codebook_p), cdtype, N, G, V, D,
        gumbel_launch::soft_rows(V), static_cast<float>(tau), as_ptr<const int64_t>(seed_p), seed,
        as_ptr<void>(quant_p));
    SSLFAST_CUDA_CHECK(cudaGetLastError());
  }
  const int64_t width = 2 * G * V;
  const Launch& red = plan.back();
  reduce_partials_kernel<<<grid_of(red), red.threads, red.dyn_smem, stream>>>(as_ptr<const float>(partial_p), chunks,
                                                                            width, as_ptr<float>(sums_p));
  SSLFAST_CUDA_CHECK(cudaGetLastError());
}

void backward_cuda(std::uintptr_t grad_q_p, int gdtype, std::uintptr_t logits_p, int ldtype, std::uintptr_t cbt_p,
                   std::uintptr_t codes_p, std::uintptr_t mask_p, std::uintptr_t w_p, int64_t N, int64_t G, int64_t V,
                   int64_t D, bool training, bool hard, double tau, uint64_t seed, std::uintptr_t seed_p,
                   std::uintptr_t grad_logits_p, int cdtype, std::uintptr_t grad_cb_p, std::uintptr_t workspace_p,
                   std::uintptr_t stream_h) {
  if (N == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_h);
  const bool soft = training && !hard;
  if (soft && workspace_p == 0)
    throw std::invalid_argument("sslfast gumbel_quantize (cuda): hard=False needs the soft workspace");
  float* stats = soft ? as_ptr<float>(workspace_p) : nullptr;
  const int64_t n_chunks = gq::soft_num_chunks(N, kSoftCbRows);
  const Launches plan = gumbel_launch::backward(N, G, V, D, training, hard, n_chunks,
                                                static_smem(backward_logits_kernel), smem_optin());
  const Launch& bl = plan[0];
  prepare(backward_logits_kernel, bl);
  backward_logits_kernel<<<grid_of(bl), bl.threads, bl.dyn_smem, stream>>>(
      as_ptr<const void>(grad_q_p), gdtype, as_ptr<const void>(logits_p), ldtype, as_ptr<const float>(cbt_p),
      as_ptr<const uint8_t>(mask_p), as_ptr<const float>(w_p), N, G, V, D, training, static_cast<float>(tau),
      as_ptr<const int64_t>(seed_p), seed, as_ptr<void>(grad_logits_p), stats);
  SSLFAST_CUDA_CHECK(cudaGetLastError());
  if (soft) {
    const int64_t chunk_rows = gq::soft_chunk_rows(N, kSoftCbRows);
    float* partial = stats + N * G * 2;
    const Launch& sc = plan[1];
    soft_codebook_kernel<<<grid_of(sc), sc.threads, sc.dyn_smem, stream>>>(
        as_ptr<const void>(grad_q_p), gdtype, as_ptr<const void>(logits_p), ldtype, stats, N, G, V, D, chunk_rows,
        static_cast<float>(tau), as_ptr<const int64_t>(seed_p), seed, partial);
    SSLFAST_CUDA_CHECK(cudaGetLastError());
    const int64_t width = G * V * D;
    const Launch& rc = plan[2];
    reduce_chunks_kernel<<<grid_of(rc), rc.threads, rc.dyn_smem, stream>>>(partial, n_chunks, width,
                                                                         as_ptr<void>(grad_cb_p), cdtype);
    SSLFAST_CUDA_CHECK(cudaGetLastError());
    return;
  }
  const Launch& bc = plan[1];
  backward_codebook_kernel<<<grid_of(bc), bc.threads, bc.dyn_smem, stream>>>(
      as_ptr<const void>(grad_q_p), gdtype, as_ptr<const int64_t>(codes_p), N, G, V, D, as_ptr<void>(grad_cb_p),
      cdtype);
  SSLFAST_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void bind_gumbel_quantize(py::module_& m) {
  // Largest 2 * num_vars + dim the backward takes on the current device.
  m.def("gumbel_quantize_backward_max_floats",
        [] { return gumbel_launch::backward_max_floats(static_smem(backward_logits_kernel), smem_optin()); });
  m.def("gumbel_quantize_num_chunks", &num_chunks, py::arg("n"));
  m.def("gumbel_quantize_soft_workspace", &soft_workspace, py::arg("n"), py::arg("groups"), py::arg("num_vars"),
        py::arg("dim"));
  m.def("gumbel_quantize_forward", &forward_cuda, py::arg("logits"), py::arg("ldtype"), py::arg("codebook"),
        py::arg("cdtype"), py::arg("n"), py::arg("groups"), py::arg("num_vars"), py::arg("dim"), py::arg("training"),
        py::arg("hard"), py::arg("tau"), py::arg("seed"), py::arg("seed_ptr"), py::arg("mask"), py::arg("quantized"),
        py::arg("codes"), py::arg("partial"), py::arg("sums"), py::arg("cuda_stream"));
  m.def("gumbel_quantize_backward", &backward_cuda, py::arg("grad_q"), py::arg("gdtype"), py::arg("logits"),
        py::arg("ldtype"), py::arg("codebook_t"), py::arg("codes"), py::arg("mask"), py::arg("w"), py::arg("n"),
        py::arg("groups"), py::arg("num_vars"), py::arg("dim"), py::arg("training"), py::arg("hard"), py::arg("tau"),
        py::arg("seed"), py::arg("seed_ptr"), py::arg("grad_logits"), py::arg("cdtype"), py::arg("grad_codebook"),
        py::arg("workspace"), py::arg("cuda_stream"));
}

}  // namespace sslfast
