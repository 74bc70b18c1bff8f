// Launch configurations of every CUDA kernel: one host function per op's host code, the only
// place where grids, block sizes, dynamic shared memory and the shared-memory opt-in are
// computed. The .cu host code launches with what these return; the CPU module binds them
// (sslfast._C.launch, csrc/launch_cpu.cpp) so the compile tier (tests/test_compile_cuda.py)
// checks the same configurations against ptxas's resource report for sm_80 and sm_90 at every
// size the host code can choose, without a GPU. Sizes the host code rejects throw
// std::invalid_argument here, with the message the caller sees.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace sslfast {

struct Launch {
  const char* kernel;  // the __global__ function's name in its .cu file (template arguments where they matter)
  int64_t grid_x = 1, grid_y = 1, grid_z = 1;
  int64_t threads = 0;
  int64_t dyn_smem = 0;  // bytes of dynamic shared memory
  bool opt_in = false;   // the host raises cudaFuncAttributeMaxDynamicSharedMemorySize to dyn_smem first
};

using Launches = std::vector<Launch>;

// Static plus dynamic shared memory a block may use without the opt-in (every CUDA GPU).
constexpr int64_t kSmemDefault = 48 * 1024;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline Launch make_launch(const char* kernel, int64_t gx, int64_t gy, int64_t gz, int64_t threads, int64_t dyn = 0,
                          bool opt_in = false) {
  return Launch{kernel, gx, gy, gz, threads, dyn, opt_in};
}

// ---- random (random_cuda.cu)
namespace random_launch {
constexpr int kThreads = 256;
inline Launch philox_fill(int64_t n) { return make_launch("philox_fill_kernel", ceil_div(n, kThreads), 1, 1, kThreads); }
}  // namespace random_launch

// ---- sample_negatives (negatives_cuda.cu)
namespace negatives_launch {
constexpr int kChunk = 256;  // frames per block of the one-pass kernel = its threads
constexpr int kDrawThreads = 256;

// Longest row the hf layout without cross-sample negatives takes in one launch: the row's
// rank -> frame table (4 bytes a frame, dynamic) plus the kernel's static shared memory
// (`static_smem`, bytes) must fit the device's opt-in maximum per block (`smem_optin`).
inline int64_t hf_one_pass_max_t(int64_t static_smem, int64_t smem_optin) {
  const int64_t room = smem_optin - static_smem;
  return room > 0 ? room / 4 : 0;
}

inline bool one_pass(int64_t T, int64_t Kc, int hf_layout, int64_t static_smem, int64_t smem_optin) {
  return !hf_layout || (Kc == 0 && T <= hf_one_pass_max_t(static_smem, smem_optin));
}

// The launches of one sample_negatives call, in order. `static_smem` is the static shared
// memory of negatives_one_pass_kernel<true> and `smem_optin` the device's opt-in maximum.
inline Launches plan(int64_t B, int64_t T, int64_t K, int64_t Kc, int hf_layout, int64_t static_smem,
                     int64_t smem_optin) {
  Launches out;
  if (B == 0 || T == 0) return out;
  if (one_pass(T, Kc, hf_layout, static_smem, smem_optin)) {
    if (K + Kc == 0) return out;
    const int64_t blocks = B * ceil_div(T, kChunk);
    if (!hf_layout) {
      out.push_back(make_launch("negatives_one_pass_kernel<false>", blocks, 1, 1, kChunk));
    } else {
      const int64_t dyn = 4 * T;
      out.push_back(make_launch("negatives_one_pass_kernel<true>", blocks, 1, 1, kChunk, dyn,
                                static_smem + dyn > kSmemDefault));
    }
    return out;
  }
  const int64_t threads_scan = B < 1024 ? ceil_div(B, 32) * 32 : 1024;
  out.push_back(make_launch("negatives_scan_kernel", 1, 1, 1, threads_scan));
  const int64_t work = B * T * (ceil_div(K, 4) + ceil_div(Kc, 4));
  if (work > 0) out.push_back(make_launch("negatives_draw_kernel", ceil_div(work, kDrawThreads), 1, 1, kDrawThreads));
  return out;
}
}  // namespace negatives_launch

// ---- compute_mask_indices (masking_cuda.cu)
namespace masking_launch {
constexpr int kThreads = 256;
inline Launches plan(int64_t B, int64_t T, int hf, int require_same, double dropout) {
  Launches out;
  if (B == 0 || T == 0) return out;
  out.push_back(make_launch("mask_rows_kernel", B, 1, 1, kThreads));
  if (hf || (!require_same && dropout <= 0.0)) return out;
  out.push_back(make_launch("mask_equalize_kernel", B, 1, 1, kThreads));
  return out;
}
}  // namespace masking_launch

// ---- info_nce (info_nce_cuda.cu)
namespace info_nce_launch {
constexpr int BM = 64;        // rows of a block (and of a tile of the other side)
constexpr int BK = 16;        // feature slice staged in shared memory
constexpr int DV = 128;       // gradient features per program
constexpr int THREADS = 256;  // 16 x 16 threads, 4 x 4 scores each
inline Launches forward(int64_t M) {
  Launches out;
  if (M > 0) out.push_back(make_launch("info_nce_forward_kernel", ceil_div(M, BM), 1, 1, THREADS));
  return out;
}
// Two passes: the rows of a (M of them), then the first n_grad_cols rows of b.
inline Launches backward(int64_t M, int64_t n_grad_cols, int64_t D) {
  Launches out;
  if (M == 0) return out;
  for (const int64_t n_x : {M, n_grad_cols})
    if (n_x > 0) out.push_back(make_launch("info_nce_backward_kernel", ceil_div(n_x, BM), ceil_div(D, DV), 1, THREADS));
  return out;
}
}  // namespace info_nce_launch

// ---- rp_quantize (rp_quantize_cuda.cu)
namespace rp_quantize_launch {
constexpr int kWarp = 32;
constexpr int64_t kMaxSmemFloats = 12288;  // 48 KB: dynamic shared memory without the opt-in
// `rows` frames (stacked), `smem_per_warp` floats staged per warp (F*k, plus H*d with a projection).
inline Launches plan(int64_t rows, int64_t smem_per_warp) {
  if (smem_per_warp > kMaxSmemFloats)
    throw std::invalid_argument("sslfast rp_quantize (cuda): F*k + H*d must be <= 12288");
  Launches out;
  if (rows == 0) return out;
  const int warps = smem_per_warp * 4 <= kMaxSmemFloats ? 4 : 1;
  const int64_t blocks = ceil_div(rows, warps);
  if (blocks > 2147483647LL) throw std::invalid_argument("sslfast rp_quantize (cuda): too many rows for one launch");
  out.push_back(make_launch("rp_quantize_kernel", blocks, 1, 1, warps * kWarp, warps * smem_per_warp * 4));
  return out;
}
}  // namespace rp_quantize_launch

// ---- contrastive_loss (contrastive_cuda.cu): one warp per row, kWarpsPerBlock rows a block
namespace contrastive_launch {
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
inline Launch rows(const char* kernel, int64_t n) {
  return make_launch(kernel, ceil_div(n, kWarpsPerBlock), 1, 1, kWarp * kWarpsPerBlock);
}
inline Launch forward(int64_t N) { return rows("forward_kernel", N); }
inline Launch backward_rows(int64_t N) { return rows("backward_rows_kernel", N); }
inline Launch segments(int64_t M) { return rows("segments_kernel", M); }
}  // namespace contrastive_launch

// ---- gumbel_vector_quantize (gumbel_quantize_cuda.cu)
namespace gumbel_launch {
constexpr int kChunk = 32;  // frames per forward_kernel block
constexpr int kForwardWarps = 8;
constexpr int kCodebookThreads = 128;
constexpr int kSoftThreads = 256;
constexpr int64_t kSoftRows = 16;       // frames per soft_forward_kernel block (fewer for large V)
constexpr int64_t kSoftMaxSmem = 8192;  // floats of probabilities per soft_forward_kernel block
constexpr int kSoftCbRows = 32;         // frames per step of soft_codebook_kernel
constexpr int kSoftCbVars = kSoftThreads / 32;  // codewords per soft_codebook_kernel block
constexpr int kSoftCbDims = 128;        // dims per soft_codebook_kernel block, 4 per lane
constexpr int kReduceThreads = 256;

inline int64_t num_chunks(int64_t n) { return ceil_div(n, kChunk); }

// Frames per soft_forward_kernel block: their V probabilities each stay in shared memory.
inline int64_t soft_rows(int64_t V) {
  return V * kSoftRows <= kSoftMaxSmem ? kSoftRows : (kSoftMaxSmem / V > 0 ? kSoftMaxSmem / V : 1);
}

inline Launches forward(int64_t N, int64_t G, int64_t V, bool training, bool hard) {
  Launches out;
  if (N == 0) return out;
  if (G > 65535) throw std::invalid_argument("sslfast gumbel_quantize (cuda): groups must be <= 65535");
  out.push_back(make_launch("forward_kernel", num_chunks(N), G, 1, kForwardWarps * 32));
  if (training && !hard) {
    const int64_t rows = soft_rows(V);
    const int64_t smem = rows * V * 4;
    if (smem > kSmemDefault)
      throw std::invalid_argument("sslfast gumbel_quantize (cuda): hard=False needs num_vars <= 12288, got " +
                                  std::to_string(V));
    out.push_back(make_launch("soft_forward_kernel", ceil_div(N, rows), G, 1, kSoftThreads, smem));
  }
  out.push_back(make_launch("reduce_partials_kernel", ceil_div(2 * G * V, kReduceThreads), 1, 1, kReduceThreads));
  return out;
}

// Largest 2 V + d (floats a warp of backward_logits_kernel stages) that fits the device's
// opt-in shared memory per block `smem_optin` beside the kernel's static `static_smem` (bytes).
inline int64_t backward_max_floats(int64_t static_smem, int64_t smem_optin) {
  const int64_t room = smem_optin - static_smem;
  return room > 0 ? room / 4 : 0;
}

// `soft_chunks`: gq::soft_num_chunks(N, kSoftCbRows) (gumbel_quantize.h); `static_smem`: the
// static shared memory of backward_logits_kernel, `smem_optin`: the device's opt-in maximum.
inline Launches backward(int64_t N, int64_t G, int64_t V, int64_t D, bool training, bool hard, int64_t soft_chunks,
                         int64_t static_smem, int64_t smem_optin) {
  Launches out;
  if (N == 0) return out;
  const int64_t per_warp = (2 * V + D) * 4;
  const int64_t max_floats = backward_max_floats(static_smem, smem_optin);
  if (2 * V + D > max_floats)
    throw std::invalid_argument("sslfast gumbel_quantize (cuda): 2*num_vars + dim must be <= " +
                                std::to_string(max_floats) + " on this device (shared memory), got " +
                                std::to_string(2 * V + D));
  // four rows a block while they fit without the opt-in, else one (with it where needed)
  const int warps = static_smem + per_warp * 4 <= kSmemDefault ? 4 : 1;
  const int64_t dyn = per_warp * warps;
  out.push_back(make_launch("backward_logits_kernel", ceil_div(N * G, warps), 1, 1, warps * 32, dyn,
                            static_smem + dyn > kSmemDefault));
  if (training && !hard) {
    const int64_t v_tiles = ceil_div(V, kSoftCbVars);
    if (G * v_tiles > 65535) throw std::invalid_argument("sslfast gumbel_quantize (cuda): groups * num_vars too large");
    out.push_back(
        make_launch("soft_codebook_kernel", soft_chunks, G * v_tiles, ceil_div(D, kSoftCbDims), kSoftThreads));
    out.push_back(make_launch("reduce_chunks_kernel", ceil_div(G * V * D, kReduceThreads), 1, 1, kReduceThreads));
    return out;
  }
  out.push_back(make_launch("backward_codebook_kernel", G * V, ceil_div(D, kCodebookThreads), 1, kCodebookThreads));
  return out;
}
}  // namespace gumbel_launch

// ---- apply_mask (apply_mask_cuda.cu)
namespace apply_mask_launch {
constexpr int kThreads = 256;
inline Launches forward(int64_t B, int64_t T, int64_t D) {
  Launches out;
  if (B == 0 || T == 0 || D == 0) return out;
  out.push_back(make_launch("apply_mask_forward_kernel", ceil_div(B * T * ceil_div(D, 4), kThreads), 1, 1, kThreads));
  return out;
}
// `grad_chunk`: apply_mask::kGradChunk (apply_mask.h); the partial sums are reduced when the
// fill value needs a gradient.
inline Launches backward(int64_t B, int64_t T, int64_t D, bool need_fill, int64_t grad_chunk) {
  Launches out;
  if (B == 0 || T == 0 || D == 0) return out;
  const int64_t chunks = ceil_div(B * T, grad_chunk);
  out.push_back(make_launch("apply_mask_backward_kernel", chunks, ceil_div(D, kThreads), 1, kThreads));
  if (need_fill) out.push_back(make_launch("apply_mask_sum_partials_kernel", ceil_div(D, kThreads), 1, 1, kThreads));
  return out;
}
}  // namespace apply_mask_launch

// ---- masked_prediction (masked_prediction_cuda.cu)
namespace masked_prediction_launch {
constexpr int kRows = 32;      // BM: rows of a logit tile
constexpr int kClasses = 32;   // BV: classes of a logit tile
constexpr int kFeatures = 64;  // BD: gradient features per block
constexpr int kThreads = 256;
// forward (row blocks x heads); with a gradient, dX (row blocks x feature blocks x heads of x)
// and dW (class blocks x feature blocks x heads). Grid y and z are capped at 65535.
inline Launches plan(int64_t N, int64_t H, int64_t Hx, int64_t V, int64_t D, bool backward) {
  const int64_t rows = ceil_div(N, kRows), d_blocks = ceil_div(D, kFeatures);
  if (H > 65535 || d_blocks > 65535)
    throw std::invalid_argument("sslfast masked_prediction (cuda): at most 65535 heads and 65535*64 features");
  if (rows > 2147483647LL || ceil_div(V, kClasses) > 2147483647LL)
    throw std::invalid_argument("sslfast masked_prediction (cuda): too many rows or classes for one launch");
  Launches out{make_launch("forward_kernel", rows, H, 1, kThreads)};
  if (backward) {
    out.push_back(make_launch("dx_kernel", rows, d_blocks, Hx, kThreads));
    out.push_back(make_launch("dw_kernel", ceil_div(V, kClasses), d_blocks, H, kThreads));
  }
  return out;
}
}  // namespace masked_prediction_launch

}  // namespace sslfast
