// CUDA kernels of sample_negatives, no host sync. Launches per call:
//   packed layout (any K, Kc, padding): ONE, negatives_one_pass_kernel<false>. Block
//     (b, chunk) owns kChunk frames of row b; it counts, over the flattened masks, the masked
//     frames before its first frame (its output rows), the candidates before row b, before its
//     first frame and to the end of row b, and (Kc > 0) in the whole batch, then scans its
//     chunk for the ranks: that is all packed_index needs (csrc/negatives.h). The redundant
//     reads are up to B * T mask bytes per block (50 KB at B = 64, T = 781: 64 * 4 blocks,
//     about 13 MB of L2 reads, 16-byte loads counted with popc), no workspace.
//   hf layout with Kc = 0 and a row whose table fits shared memory: ONE,
//     negatives_one_pass_kernel<true>: the block scans its own row into a rank -> frame table
//     in shared memory (4 T bytes, beyond 48 KB with the opt-in) and maps its within-row draws
//     through it. The row limit is the device's opt-in maximum less the kernel's static shared
//     memory (negatives_launch::hf_one_pass_max_t, csrc/sslfast/launch.h: 40952 frames on
//     A100, 57336 on H100 with the 3104 bytes of static tables ptxas reports).
//   hf layout otherwise: TWO. Cross-sample draws map through other rows' tables:
//     1. negatives_scan_kernel (one block): per-row candidate ranks, masked ranks and the
//        candidate-position table (scan_row of csrc/negatives.h), then the row prefixes.
//     2. negatives_draw_kernel: one thread per (positive frame, Philox block of 4 negatives).
// The Philox key: the `seed` argument, or, when the caller passes a seed tensor
// (sslfast.random.seed_args), the int64 at `seed_ptr`, read by each kernel that draws when it
// runs (load_seed, csrc/sslfast/philox.h): a captured CUDA graph replays with its current value.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "negatives.h"
#include "sslfast/bind.h"
#include "sslfast/cuda_check.h"
#include "sslfast/launch_cuda.h"

namespace py = pybind11;

namespace sslfast {
namespace {

constexpr int kChunk = negatives_launch::kChunk;  // frames per block of the one-pass kernel = its threads
constexpr int kWarps = kChunk / 32;
constexpr unsigned kFull = 0xffffffffu;

using negatives::candidate1;
using negatives::count_prefix;
using negatives::Prefix;

__device__ __forceinline__ int warp_sum(int v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Inclusive scan of v over the block (kChunk threads); *total gets the block's sum.
__device__ uint32_t block_scan(uint32_t v, uint32_t* s_warp, uint32_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t n = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += n;
  }
  __syncthreads();  // s_warp is free again (earlier scans have read it)
  if (lane == 31) s_warp[warp] = v;
  __syncthreads();
  uint32_t before = 0, all = 0;
  for (int w = 0; w < kWarps; ++w) {
    const uint32_t x = s_warp[w];
    before += w < warp ? x : 0u;
    all += x;
  }
  *total = all;
  return before + v;
}

// One launch for the packed layout (kHf = false) and the hf layout without cross-sample
// negatives (kHf = true); see the top of the file. Block x = b * chunks + chunk.
template <bool kHf>
__global__ void __launch_bounds__(kChunk)
    negatives_one_pass_kernel(const uint8_t* mask, const uint8_t* pad, int from_masked_only, int64_t B, int64_t T,
                              int64_t K, int64_t Kc, uint64_t seed_value, const int64_t* seed_ptr, int64_t n_rows,
                              int64_t* out) {
  extern __shared__ int32_t s_pos[];  // hf: row b's rank -> frame table (T entries)
  __shared__ uint32_t s_warp[kWarps];
  __shared__ int s_red[5][kWarps];
  __shared__ int32_t s_own[kChunk];
  __shared__ int64_t s_row[kChunk];
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  const int64_t b = blockIdx.x / chunks, t0 = (blockIdx.x % chunks) * kChunk;
  const int64_t row_base = b * T;
  const int tid = threadIdx.x;
  int64_t row_start = 0, n_row = 0, total = 0, own0 = 0, masked_before = 0;
  if (kHf) {
    int64_t run = 0;
    for (int64_t s = 0; s < T; s += kChunk) {
      const uint32_t c = s + tid < T ? candidate1(mask, pad, from_masked_only, row_base + s + tid) : 0u;
      uint32_t n;
      const uint32_t incl = block_scan(c, s_warp, &n);
      if (c) s_pos[run + incl - 1] = static_cast<int32_t>(s + tid);
      if (s == t0) own0 = run;
      run += n;
    }
    n_row = run;
  } else {
    const int64_t end = Kc > 0 ? B * T : row_base + T;
    const Prefix a =
        count_prefix(mask, pad, from_masked_only, end, row_base + t0, row_base, row_base + T, tid, kChunk);
    const int v[5] = {warp_sum(a.m_first), warp_sum(a.c_first), warp_sum(a.c_row), warp_sum(a.c_end),
                      warp_sum(a.c_all)};
    if ((tid & 31) == 0)
      for (int k = 0; k < 5; ++k) s_red[k][tid >> 5] = v[k];
    __syncthreads();
    int64_t r[5] = {0, 0, 0, 0, 0};
    for (int k = 0; k < 5; ++k)
      for (int w = 0; w < kWarps; ++w) r[k] += s_red[k][w];
    masked_before = r[0];
    row_start = r[2];
    own0 = r[1] - r[2];
    n_row = r[3] - r[2];
    total = r[4];
  }
  // This chunk: ranks by a block scan of (candidate, masked) packed in one word.
  const int64_t t = t0 + tid;
  uint32_t m = 0, c = 0;
  if (t < T) {
    m = mask[row_base + t] != 0;
    c = candidate1(mask, pad, from_masked_only, row_base + t);
  }
  uint32_t n;
  const uint32_t incl = block_scan(c | (m << 16), s_warp, &n);
  s_own[tid] = static_cast<int32_t>(own0 + (incl & 0xffffu) - 1);
  int64_t row = -1;
  if (m) {
    row = kHf ? row_base + t : masked_before + (incl >> 16) - 1;
    if (!kHf && row >= n_rows) row = -1;  // a caller's num_masked below mask.sum()
  }
  s_row[tid] = row;
  __syncthreads();  // s_own, s_row and (hf) s_pos are complete

  const uint64_t seed = load_seed(seed_ptr, seed_value);  // loaded here: not live across the scans
  negatives::one_pass_draws(kHf, seed, T, K, Kc, b, t0, row_start, n_row, total, s_own, s_row, s_pos, out, tid,
                            kChunk);
}

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
  if (threadIdx.x == 0) negatives::scan_prefixes(B, ws64);
}

__global__ void negatives_draw_kernel(int64_t B, int64_t T, int64_t K, int64_t Kc, int hf_layout, uint64_t seed,
                                      const int64_t* seed_ptr, const int32_t* rank, const int32_t* mrank,
                                      const int32_t* pos, const int64_t* ws64, int64_t n_rows, int64_t* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  negatives::draw_item(B, T, K, Kc, hf_layout, load_seed(seed_ptr, seed), rank, mrank, pos, ws64, n_rows, out, i);
}

// The static shared memory of the hf one-pass kernel and the current device's opt-in maximum,
// the two facts its row limit depends on.
int64_t hf_static_smem() { return static_smem(negatives_one_pass_kernel<true>); }

int64_t hf_one_pass_max_t() { return negatives_launch::hf_one_pass_max_t(hf_static_smem(), smem_optin()); }

void sample_negatives_cuda(std::uintptr_t mask_ptr, std::uintptr_t pad_ptr, int64_t B, int64_t T, int64_t K,
                           int64_t Kc, int from_masked_only, int hf_layout, uint64_t seed,
                           std::uintptr_t seed_ptr_value, std::uintptr_t ws32_ptr,
                           std::uintptr_t ws64_ptr, int64_t n_rows, std::uintptr_t out_ptr,
                           std::uintptr_t stream_handle) {
  if (B == 0 || T == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t st = hf_layout ? hf_static_smem() : 0, optin = hf_layout ? smem_optin() : 0;
  const Launches plan = negatives_launch::plan(B, T, K, Kc, hf_layout, st, optin);
  const uint8_t* mask = as_ptr<const uint8_t>(mask_ptr);
  const uint8_t* pad = as_ptr<const uint8_t>(pad_ptr);
  int64_t* out = as_ptr<int64_t>(out_ptr);
  const int64_t* seed_ptr = as_ptr<const int64_t>(seed_ptr_value);  // null: the key is `seed`
  if (negatives_launch::one_pass(T, Kc, hf_layout, st, optin)) {
    if (plan.empty()) return;
    const Launch& l = plan[0];
    if (hf_layout) {
      prepare(negatives_one_pass_kernel<true>, l);
      negatives_one_pass_kernel<true><<<grid_of(l), l.threads, l.dyn_smem, stream>>>(
          mask, pad, from_masked_only, B, T, K, Kc, seed, seed_ptr, n_rows, out);
    } else {
      negatives_one_pass_kernel<false><<<grid_of(l), l.threads, l.dyn_smem, stream>>>(
          mask, pad, from_masked_only, B, T, K, Kc, seed, seed_ptr, n_rows, out);
    }
    SSLFAST_CUDA_CHECK(cudaGetLastError());
    return;
  }
  if (ws32_ptr == 0 || ws64_ptr == 0) throw std::invalid_argument("sample_negatives: this layout needs workspaces");
  int32_t* ws32 = as_ptr<int32_t>(ws32_ptr);
  int64_t* ws64 = as_ptr<int64_t>(ws64_ptr);
  const Launch& scan = plan[0];
  negatives_scan_kernel<<<grid_of(scan), scan.threads, scan.dyn_smem, stream>>>(
      mask, pad, from_masked_only, B, T, ws32, ws32 + B * T, ws32 + 2 * B * T, ws64);
  SSLFAST_CUDA_CHECK(cudaGetLastError());
  if (plan.size() < 2) return;
  const Launch& draw = plan[1];
  negatives_draw_kernel<<<grid_of(draw), draw.threads, draw.dyn_smem, stream>>>(
      B, T, K, Kc, hf_layout, seed, seed_ptr, ws32, ws32 + B * T, ws32 + 2 * B * T, ws64, n_rows, out);
  SSLFAST_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void bind_negatives(py::module_& m) {
  m.def("sample_negatives", &sample_negatives_cuda, py::arg("mask"), py::arg("padding_mask"), py::arg("B"),
        py::arg("T"), py::arg("K"), py::arg("Kc"), py::arg("from_masked_only"), py::arg("hf_layout"),
        py::arg("seed"), py::arg("seed_ptr"), py::arg("ws32"), py::arg("ws64"), py::arg("n_rows"), py::arg("out"),
        py::arg("cuda_stream"));
  // Longest row the hf layout (Kc = 0) takes in one launch on the current device;
  // ops/negatives.py allocates the two-launch workspaces beyond it.
  m.def("negatives_hf_one_pass_max_t", &hf_one_pass_max_t);
}

}  // namespace sslfast
