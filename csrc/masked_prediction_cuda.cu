// CUDA kernels of the masked-prediction loss (math in csrc/masked_prediction.h, shared with
// the CPU kernel).
//
// A 32-row x 32-class logit tile is built in registers (2 x 2 per thread, 256 threads) from
// 32-wide feature slices of x and W staged in shared memory, then written to a shared tile
// that the per-row math (online log-sum-exp, dS) reads. Nothing N x V is stored.
// * forward: block (row block, head) walks the V tiles; the first 32 threads keep one row's
//   state each (mpl::row_update, or row_update_soft over the soft targets staged beside the
//   logits) and write loss, the saved statistics (max, log l; the target mass when soft), top.
// * dX: block (row block, 64-feature block, x head) walks its head(s) and V tiles,
//   recomputing each logit tile from the saved statistics, and accumulates dS W (8 outputs a
//   thread); with soft targets the blocks of the first feature block also write dq.
// * dW (and db): block (class block, 64-feature block, head) walks the row tiles and
//   accumulates dS^T X. No atomics: deterministic. Wider D takes more blocks along grid y,
//   each recomputing its logit tiles.
// Each kernel is instantiated for hard labels, soft targets given (kSoft) and BiRQ's soft
// targets made on the fly (kGumbel): the forward first sweeps V for the target logits'
// statistics (m_t, l_t; t tiles from 32-wide slices of y and the codewords staged like x and
// W, plus the Gumbel noise), then recomputes each t tile beside its logit tile and folds
// q = softmax(t) in as a soft target; the gradient kernels recompute both tiles, and the blocks
// of the first feature block accumulate dy (dX's) and dc (dW's) from dt = g dloss/dt.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include "masked_prediction.h"
#include "sslfast/bind.h"
#include "sslfast/cuda_check.h"
#include "sslfast/dtype.h"
#include "sslfast/launch_cuda.h"

namespace py = pybind11;

namespace sslfast {
namespace {

using mpl::Args;
using mpl::Saved;
using mpl::BD;
using mpl::BK;
using mpl::BM;
using mpl::BV;
using mpl::Smem;
using mpl::Targets;
using mpl::THREADS;

// The dot-product tile of rows n0.. and classes v0.. of head h: kTarget false, s.z[r][c] = the
// logit (0 outside N or V); kTarget true (kGumbel), s.q[r][c] = the target logit t from the staged
// slices of y and the codewords c, plus the Gumbel noise.
template <bool kTarget>
__device__ void dot_tile(const Args& a, const Targets& t, Smem& s, int64_t h, int64_t n0, int64_t v0, uint64_t seed) {
  const int64_t hr = kTarget ? (t.Hy == 1 ? 0 : h) : (a.Hx == 1 ? 0 : h);
  const int64_t K = kTarget ? t.Dt : a.D;
  float acc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    if (kTarget)
      mpl::stage_target_slice(a, t, s, h, hr, n0, v0, k0, threadIdx.x);
    else
      mpl::stage_slice(a, s, h, hr, n0, v0, k0, threadIdx.x);
    __syncthreads();
    mpl::fma_slice(s, acc, threadIdx.x);
    __syncthreads();
  }
  if (kTarget)
    mpl::write_target_tile(a, t, s, acc, h, n0, v0, seed, threadIdx.x);
  else
    mpl::write_tile(a, s, acc, h, v0, threadIdx.x);
  __syncthreads();
}

__device__ void logit_tile(const Args& a, Smem& s, int64_t h, int64_t n0, int64_t v0) {
  dot_tile<false>(a, Targets{}, s, h, n0, v0, 0);
}

// s.z -> g * dloss/dz in place, from each row's saved statistics and gradient weight (0 when
// ignored); dq (soft targets, or null) receives g * dloss/dq; kGumbel: s.q -> g * dloss/d<y, c>.
template <int kMode>
__device__ void dlogit_tile(const Args& a, const Targets& t, Smem& s, int64_t h, int64_t n0, int64_t v0,
                            const Saved& sv, const float* grad, float* dq) {
  if (kMode == mpl::kGumbel)
    mpl::dlogit_items_gumbel(a, t, s, h, n0, v0, sv, grad, threadIdx.x);
  else
    mpl::dlogit_items(a, s, h, n0, v0, sv, grad, dq, threadIdx.x, kMode == mpl::kSoft);
  __syncthreads();
}

template <int kMode>
__global__ void __launch_bounds__(THREADS) forward_kernel(Args a, float* loss, Saved sv, uint8_t* top,
                                                          Targets gt) {
  constexpr bool kSoft = kMode == mpl::kSoft, kGumbel = kMode == mpl::kGumbel;
  __shared__ Smem s;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BM, h = blockIdx.y;
  const int r = threadIdx.x;
  const int64_t n = n0 + r;
  const int64_t t = (kMode == mpl::kHard && r < BM && n < a.N) ? a.targets[n * a.H + h] : -1;
  mpl::RowState st = mpl::row_init(kMode != mpl::kHard);
  if constexpr (kGumbel) {
    // sweep 1 (i < tiles): the target logits' statistics (in st, then reset); sweep 2: the loss.
    // One loop, one RowState, the key loaded per tile: so the target tile (the Philox rounds) is
    // inlined once and fewer registers are live across the loop. Two loops, two states or a key
    // kept live left ptxas with 16 bytes of stack and 12 to 68 of spill stores on sm_80 or sm_90.
    const int64_t tiles = (a.V + BV - 1) / BV;
    float m_t = 0.0f, l_t = 0.0f;
    float acc[3] = {0.0f, 0.0f, 0.0f};  // fold_tile_gumbel's sums
    for (int64_t i = 0; i < 2 * tiles; ++i) {
      const bool loss_pass = i >= tiles;
      const int64_t v0 = (loss_pass ? i - tiles : i) * BV;
      dot_tile<true>(a, gt, s, h, n0, v0, load_seed(gt.seed_ptr, gt.seed));
      if (loss_pass) logit_tile(a, s, h, n0, v0);
      if (r < BM) {
        if (i == tiles) {
          m_t = st.m;
          l_t = mpl::row_denominator(st);
          st = mpl::row_init(true);
        }
        if (loss_pass)
          mpl::fold_tile_gumbel(s, st, acc, r, v0, a.V, m_t, l_t);
        else
          mpl::fold_target_stats(s, st, r, v0, a.V);
      }
      __syncthreads();
    }
    if (r < BM && n < a.N) mpl::gumbel_row_out(a, st, acc, m_t, l_t, n, h, loss, sv, top);
  } else {
    for (int64_t v0 = 0; v0 < a.V; v0 += BV) {
      if (kSoft) mpl::stage_targets(a, s, h, n0, v0, threadIdx.x);  // read after logit_tile's barriers
      logit_tile(a, s, h, n0, v0);
      if (r < BM) mpl::fold_tile(s, st, r, v0, a.V, t, kSoft);
      __syncthreads();
    }
    if (r < BM && n < a.N) mpl::forward_row_out(a, st, n, h, kSoft || t >= 0, loss, sv, top);
  }
}

// dyh (kGumbel): the (N, H, Dt) gradient of y per head, accumulated by the first feature block.
template <int kMode>
__global__ void __launch_bounds__(THREADS) dx_kernel(Args a, Saved sv, const float* grad, float* dx, float* dq,
                                                     Targets gt, float* dyh) {
  constexpr bool kGumbel = kMode == mpl::kGumbel;
  __shared__ Smem s;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BM, d0 = static_cast<int64_t>(blockIdx.y) * BD;
  const int64_t hx = blockIdx.z;
  const uint64_t seed = kGumbel ? load_seed(gt.seed_ptr, gt.seed) : 0;
  // thread -> output (row r, features d0 + k + 8 * j): 32 rows x 64 features, 8 per thread
  const int r = threadIdx.x / 8, k = threadIdx.x % 8;
  float acc[BD / 8] = {};
  const int64_t heads = a.Hx == 1 ? a.H : 1;
  for (int64_t i = 0; i < heads; ++i) {
    const int64_t h = hx + i;
    for (int64_t v0 = 0; v0 < a.V; v0 += BV) {
      if (kGumbel) dot_tile<true>(a, gt, s, h, n0, v0, seed);
      logit_tile(a, s, h, n0, v0);
      dlogit_tile<kMode>(a, gt, s, h, n0, v0, sv, grad, blockIdx.y == 0 ? dq : nullptr);
      mpl::dx_tile(a, s, acc, h, v0, d0, r, k);
      if (kGumbel && blockIdx.y == 0 && n0 + r < a.N) mpl::dy_tile(a, gt, s, dyh, h, v0, n0 + r, r, k);
      __syncthreads();
    }
  }
  const int64_t n = n0 + r;
  if (n < a.N) mpl::store_features(acc, dx, (n * a.Hx + hx) * a.D, d0, k, a.D);
}

// dc (kGumbel): the (H, V, Dt) gradient of the codewords, accumulated by the first feature block.
template <int kMode>
__global__ void __launch_bounds__(THREADS) dw_kernel(Args a, Saved sv, const float* grad, float* dw, float* db,
                                                     Targets gt, float* dc) {
  constexpr bool kGumbel = kMode == mpl::kGumbel;
  __shared__ Smem s;
  const int64_t v0 = static_cast<int64_t>(blockIdx.x) * BV, d0 = static_cast<int64_t>(blockIdx.y) * BD;
  const int64_t h = blockIdx.z, hx = a.Hx == 1 ? 0 : h, hy = gt.Hy == 1 ? 0 : h;
  const uint64_t seed = kGumbel ? load_seed(gt.seed_ptr, gt.seed) : 0;
  const int c = threadIdx.x / 8, k = threadIdx.x % 8;
  const int64_t v = v0 + c;
  float acc[BD / 8] = {};
  float dbias = 0.0f;
  for (int64_t n0 = 0; n0 < a.N; n0 += BM) {
    if (kGumbel) dot_tile<true>(a, gt, s, h, n0, v0, seed);
    logit_tile(a, s, h, n0, v0);
    dlogit_tile<kMode>(a, gt, s, h, n0, v0, sv, grad, nullptr);
    mpl::dw_tile(a, s, acc, dbias, hx, n0, d0, c, k);
    if (kGumbel && blockIdx.y == 0 && v < a.V) mpl::dc_tile(a, gt, s, dc, h, hy, n0, v, c, k);
    __syncthreads();
  }
  if (v >= a.V) return;
  mpl::store_features(acc, dw, (h * a.V + v) * a.D, d0, k, a.D);
  // dS carries the scale; the bias enters the logits unscaled.
  if (db != nullptr && blockIdx.y == 0 && k == 0) db[h * a.V + v] = dbias / a.scale;
}

template <int kMode>
void launch_all(const Args& a, const Targets& gt, const Launches& plan, const float* grad, float* loss, const Saved& sv,
                uint8_t* top, float* dx, float* dw, float* db, float* dq, float* dyh, float* dc, cudaStream_t s) {
  forward_kernel<kMode><<<grid_of(plan[0]), plan[0].threads, 0, s>>>(a, loss, sv, top, gt);
  SSLFAST_CUDA_CHECK(cudaGetLastError());
  if (grad == nullptr) return;
  dx_kernel<kMode><<<grid_of(plan[1]), plan[1].threads, 0, s>>>(a, sv, grad, dx, dq, gt, dyh);
  SSLFAST_CUDA_CHECK(cudaGetLastError());
  dw_kernel<kMode><<<grid_of(plan[2]), plan[2].threads, 0, s>>>(a, sv, grad, dw, db, gt, dc);
  SSLFAST_CUDA_CHECK(cudaGetLastError());
}

// targets (N, H) int64 labels or, when q is given, unused: q (N, H, V) soft targets (dtype
// q_dtype). Saved per row: row_max, log_l and, with q, mass ((N, H) fp32 each; the gradient
// kernels read them). dq (N, H, V) fp32 with q and a gradient.
void forward_backward_cuda(std::uintptr_t x, int x_dtype, std::uintptr_t w, int w_dtype, std::uintptr_t bias,
                           int b_dtype, std::uintptr_t targets, std::uintptr_t q, int q_dtype, std::uintptr_t grad,
                           int64_t N, int64_t H, int64_t Hx, int64_t V, int64_t D, double scale, double eps,
                           std::uintptr_t loss, std::uintptr_t row_max, std::uintptr_t log_l, std::uintptr_t mass,
                           std::uintptr_t top, std::uintptr_t dx, std::uintptr_t dw, std::uintptr_t db,
                           std::uintptr_t dq, std::uintptr_t stream) {
  if (N == 0) return;
  const bool soft = q != 0;
  Args a;
  Saved sv;
  host_args(x, x_dtype, w, w_dtype, bias, b_dtype, targets, q, q_dtype, N, H, Hx, V, D, scale, eps, row_max, log_l,
            mass, &a, &sv);
  const Launches plan = masked_prediction_launch::plan(N, H, Hx, V, D, grad != 0);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  (soft ? launch_all<mpl::kSoft> : launch_all<mpl::kHard>)(a, Targets{}, plan, as_ptr<const float>(grad),
                                                           as_ptr<float>(loss), sv, as_ptr<uint8_t>(top),
                                                           as_ptr<float>(dx), as_ptr<float>(dw), as_ptr<float>(db),
                                                           as_ptr<float>(dq), nullptr, nullptr, s);
}

// BiRQ (kGumbel): the soft targets q = softmax(t) made from y (N, Hy, Dt), the codewords c (H, V,
// Dt) (fp32, normalised) and the Philox key at seed_ptr (an int64 on the device), never stored.
// Saved per row (fp32 (N, H) each): row_max, log_l, mass, m_t, l_t, zbest, dbar. With a gradient:
// dyh (N, H, Dt) and dc (H, V, Dt), zero-filled by the caller (the kernels accumulate into them);
// dyh is dy when Hy = H, else the caller sums its heads.
void gumbel_forward_backward_cuda(std::uintptr_t x, int x_dtype, std::uintptr_t w, int w_dtype, std::uintptr_t bias,
                                  int b_dtype, std::uintptr_t y, std::uintptr_t c, int64_t Hy, int64_t Dt,
                                  std::uintptr_t seed_ptr, double tgt_scale, double noise_scale, std::uintptr_t grad,
                                  int64_t N, int64_t H, int64_t Hx, int64_t V, int64_t D, double scale, double eps,
                                  std::uintptr_t loss, std::uintptr_t row_max, std::uintptr_t log_l,
                                  std::uintptr_t mass, std::uintptr_t m_t, std::uintptr_t l_t, std::uintptr_t zbest,
                                  std::uintptr_t dbar,
                                  std::uintptr_t top, std::uintptr_t dx, std::uintptr_t dw, std::uintptr_t db,
                                  std::uintptr_t dyh, std::uintptr_t dc, std::uintptr_t stream) {
  if (N == 0) return;
  Args a;
  Targets gt;
  Saved sv;
  host_args(x, x_dtype, w, w_dtype, bias, b_dtype, 0, 0, 0, N, H, Hx, V, D, scale, eps, row_max, log_l, 0, &a, &sv);
  mpl::gumbel_args(y, c, Hy, Dt, tgt_scale, noise_scale, seed_ptr, mass, m_t, l_t, zbest, dbar, &gt, &sv);
  const Launches plan = masked_prediction_launch::plan(N, H, Hx, V, D, grad != 0);
  launch_all<mpl::kGumbel>(a, gt, plan, as_ptr<const float>(grad), as_ptr<float>(loss), sv, as_ptr<uint8_t>(top),
                           as_ptr<float>(dx), as_ptr<float>(dw), as_ptr<float>(db), nullptr, as_ptr<float>(dyh),
                           as_ptr<float>(dc), reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace

void bind_masked_prediction(py::module_& m) {
  m.def("masked_prediction_forward_backward", &forward_backward_cuda, py::arg("x"), py::arg("x_dtype"), py::arg("w"),
        py::arg("w_dtype"), py::arg("bias"), py::arg("b_dtype"), py::arg("targets"), py::arg("q"), py::arg("q_dtype"),
        py::arg("grad"), py::arg("N"), py::arg("H"), py::arg("Hx"), py::arg("V"), py::arg("D"), py::arg("scale"),
        py::arg("eps"), py::arg("loss"), py::arg("row_max"), py::arg("log_l"), py::arg("mass"), py::arg("top"),
        py::arg("dx"), py::arg("dw"), py::arg("db"), py::arg("dq"), py::arg("cuda_stream"));
  m.def("masked_prediction_gumbel_forward_backward", &gumbel_forward_backward_cuda, py::arg("x"), py::arg("x_dtype"),
        py::arg("w"), py::arg("w_dtype"), py::arg("bias"), py::arg("b_dtype"), py::arg("y"), py::arg("c"),
        py::arg("Hy"), py::arg("Dt"), py::arg("seed_ptr"), py::arg("tgt_scale"), py::arg("noise_scale"),
        py::arg("grad"), py::arg("N"), py::arg("H"), py::arg("Hx"), py::arg("V"), py::arg("D"), py::arg("scale"),
        py::arg("eps"), py::arg("loss"), py::arg("row_max"), py::arg("log_l"), py::arg("mass"), py::arg("m_t"),
        py::arg("l_t"), py::arg("zbest"), py::arg("dbar"), py::arg("top"), py::arg("dx"), py::arg("dw"),
        py::arg("db"),
        py::arg("dy"), py::arg("dc"), py::arg("cuda_stream"));
}

}  // namespace sslfast
