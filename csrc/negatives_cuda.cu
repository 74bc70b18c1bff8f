// CUDA kernels of sample_negatives, no host sync. Launches per call:
//   packed layout (any K, Kc, padding): ONE, negatives_one_pass_kernel<false>. Block
//     (b, chunk) owns kChunk frames of row b; it counts, over the flattened masks, the masked
//     frames before its first frame (its output rows), the candidates before row b, before its
//     first frame and to the end of row b, and (Kc > 0) in the whole batch, then scans its
//     chunk for the ranks: that is all packed_index needs (csrc/negatives.h). The redundant
//     reads are up to B * T mask bytes per block (50 KB at B = 64, T = 781: 64 * 4 blocks,
//     about 13 MB of L2 reads, 16-byte loads counted with popc), no workspace.
//   hf layout with Kc = 0 and T <= kHfOnePassMaxT: ONE, negatives_one_pass_kernel<true>: the
//     block scans its own row into a rank -> frame table in shared memory (4 T bytes) and
//     maps its within-row draws through it.
//   hf layout otherwise: TWO. Cross-sample draws map through other rows' tables:
//     1. negatives_scan_kernel (one block): per-row candidate ranks, masked ranks and the
//        candidate-position table (scan_row of csrc/negatives.h), then the row prefixes.
//     2. negatives_draw_kernel: one thread per (positive frame, Philox block of 4 negatives).
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "negatives.h"
#include "sslfast/bind.h"
#include "sslfast/cuda_check.h"

namespace py = pybind11;

namespace sslfast {
namespace {

constexpr int kChunk = 256;  // frames per block of the one-pass kernel = its threads
constexpr int kWarps = kChunk / 32;
constexpr unsigned kFull = 0xffffffffu;
// The hf one-pass kernel keeps a row's table (int32 per frame) in the default 48 KB of
// dynamic shared memory; longer rows take the two-launch path.
constexpr int64_t kHfOnePassMaxT = 12288;

// 0x01 in every byte of x that is nonzero (mask bytes are bools, normally 0 or 1 already).
__device__ __forceinline__ uint32_t bytes_nonzero(uint32_t x) {
  return (((x & 0x7f7f7f7fu) + 0x7f7f7f7fu) | x) >> 7 & 0x01010101u;
}

// scan_row's candidate rule on four frames at once (0x01 per candidate byte).
__device__ __forceinline__ uint32_t candidates4(uint32_t m, uint32_t p, int from_masked_only, bool has_pad) {
  if (from_masked_only) return m;
  return has_pad ? (m | (p ^ 0x01010101u)) : 0x01010101u;
}

// Of the four 0x01/0x00 bytes of x, at flat frames [f, f + 4), how many lie below thr.
__device__ __forceinline__ int count_below(uint32_t x, int64_t f, int64_t thr) {
  if (f + 4 <= thr) return __popc(x);
  if (f >= thr) return 0;
  return __popc(x & ((1u << (8 * (thr - f))) - 1u));
}

// The prefix counts of one block: masked frames before `first`, candidates before `first`,
// before row b, before the end of row b, and in [0, end).
struct Prefix {
  int m_first, c_first, c_row, c_end, c_all;
};

__device__ __forceinline__ void add_frames(Prefix& a, uint32_t m, uint32_t c, int64_t f, int64_t first,
                                           int64_t row_base, int64_t row_end) {
  a.m_first += count_below(m, f, first);
  a.c_first += count_below(c, f, first);
  a.c_row += count_below(c, f, row_base);
  a.c_end += count_below(c, f, row_end);
  a.c_all += __popc(c);
}

// This thread's share of the block's Prefix over the flat frames [0, end): 16-byte loads over
// the aligned body, bytes over the rest (and everywhere when a pointer is not 16-aligned).
__device__ Prefix count_prefix(const uint8_t* mask, const uint8_t* pad, int from_masked_only, int64_t end,
                               int64_t first, int64_t row_base, int64_t row_end) {
  Prefix a{0, 0, 0, 0, 0};
  const bool has_pad = pad != nullptr && !from_masked_only;
  const bool vec = (reinterpret_cast<uintptr_t>(mask) % 16 == 0) && (!has_pad || reinterpret_cast<uintptr_t>(pad) % 16 == 0);
  const int64_t body = vec ? end / 16 : 0;  // in 16-byte words
  for (int64_t i = threadIdx.x; i < body; i += blockDim.x) {
    const uint4 xm = reinterpret_cast<const uint4*>(mask)[i];
    const uint4 xp = has_pad ? reinterpret_cast<const uint4*>(pad)[i] : make_uint4(0, 0, 0, 0);
    const uint32_t ms[4] = {xm.x, xm.y, xm.z, xm.w}, ps[4] = {xp.x, xp.y, xp.z, xp.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t m = bytes_nonzero(ms[k]);
      const uint32_t c = candidates4(m, has_pad ? bytes_nonzero(ps[k]) : 0u, from_masked_only, has_pad);
      add_frames(a, m, c, 16 * i + 4 * k, first, row_base, row_end);
    }
  }
  for (int64_t f = 16 * body + threadIdx.x; f < end; f += blockDim.x) {
    const uint32_t m = mask[f] != 0;
    const uint32_t c = candidates4(m, has_pad ? (pad[f] != 0) : 0u, from_masked_only, has_pad) & 1u;
    add_frames(a, m, c, f, first, row_base, row_end);  // one frame: bytes 1..3 are 0
  }
  return a;
}

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

__device__ __forceinline__ uint32_t candidate1(const uint8_t* mask, const uint8_t* pad, int from_masked_only,
                                               int64_t f) {
  const bool m = mask[f] != 0;
  return (m || (!from_masked_only && (pad == nullptr || pad[f] == 0))) ? 1u : 0u;
}

// One launch for the packed layout (kHf = false) and the hf layout without cross-sample
// negatives (kHf = true); see the top of the file. Block x = b * chunks + chunk.
template <bool kHf>
__global__ void __launch_bounds__(kChunk)
    negatives_one_pass_kernel(const uint8_t* mask, const uint8_t* pad, int from_masked_only, int64_t B, int64_t T,
                              int64_t K, int64_t Kc, uint64_t seed, int64_t n_rows, int64_t* out) {
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
    const Prefix a = count_prefix(mask, pad, from_masked_only, end, row_base + t0, row_base, row_base + T);
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

  const int64_t frames = T - t0 < kChunk ? T - t0 : kChunk;
  const int64_t width = K + Kc, kb = (K + 3) / 4, per_frame = kb + (Kc + 3) / 4;
  if (kHf) {
    for (int64_t i = tid; i < frames * width; i += kChunk)
      if (s_row[i / width] < 0) out[(row_base + t0) * width + i] = -1;
  }
  for (int64_t i = tid; i < frames * per_frame; i += kChunk) {
    const int64_t f = i / per_frame, q = i % per_frame;
    const int64_t r = s_row[f];
    if (r < 0) continue;
    int64_t* row_out = out + r * width;
    if (kHf)
      negatives::draw_block_hf_within(seed, K, T, b, t0 + f, n_row, s_own[f], s_pos, q, row_out);
    else if (q < kb)
      negatives::draw_block_packed(seed, K, Kc, b, t0 + f, row_start, n_row, total, s_own[f], 0, q, row_out);
    else
      negatives::draw_block_packed(seed, K, Kc, b, t0 + f, row_start, n_row, total, s_own[f], 1, q - kb, row_out + K);
  }
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
  if (!hf_layout || (Kc == 0 && T <= kHfOnePassMaxT)) {
    if (K + Kc == 0) return;
    const int64_t blocks = B * ((T + kChunk - 1) / kChunk);
    const uint8_t* mask = as_ptr<const uint8_t>(mask_ptr);
    const uint8_t* pad = as_ptr<const uint8_t>(pad_ptr);
    int64_t* out = as_ptr<int64_t>(out_ptr);
    if (hf_layout) {
      negatives_one_pass_kernel<true><<<static_cast<unsigned>(blocks), kChunk, T * sizeof(int32_t), stream>>>(
          mask, pad, from_masked_only, B, T, K, Kc, seed, n_rows, out);
    } else {
      negatives_one_pass_kernel<false><<<static_cast<unsigned>(blocks), kChunk, 0, stream>>>(
          mask, pad, from_masked_only, B, T, K, Kc, seed, n_rows, out);
    }
    SSLFAST_CUDA_CHECK(cudaGetLastError());
    return;
  }
  if (ws32_ptr == 0 || ws64_ptr == 0) throw std::invalid_argument("sample_negatives: this layout needs workspaces");
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
  // Longest row the hf layout (Kc = 0) takes in one launch; ops/negatives.py allocates the
  // two-launch workspaces beyond it.
  m.attr("negatives_hf_one_pass_max_t") = py::int_(kHfOnePassMaxT);
}

}  // namespace sslfast
