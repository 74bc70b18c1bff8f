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
// Each kernel is instantiated for hard labels and for soft targets (kSoft).
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
using mpl::THREADS;

// s.z[r][c] = logit of row n0 + r of head h against class v0 + c (0 outside N or V).
__device__ void logit_tile(const Args& a, Smem& s, int64_t h, int64_t n0, int64_t v0) {
  const int64_t hx = a.Hx == 1 ? 0 : h;
  float acc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
  for (int64_t k0 = 0; k0 < a.D; k0 += BK) {
    mpl::stage_slice(a, s, h, hx, n0, v0, k0, threadIdx.x);
    __syncthreads();
    mpl::fma_slice(s, acc, threadIdx.x);
    __syncthreads();
  }
  mpl::write_tile(a, s, acc, h, v0, threadIdx.x);
  __syncthreads();
}

// s.z -> g * dloss/dz in place, from each row's saved statistics and gradient weight (0 when
// ignored); dq (soft targets, or null) receives g * dloss/dq.
template <bool kSoft>
__device__ void dlogit_tile(const Args& a, Smem& s, int64_t h, int64_t n0, int64_t v0, const Saved& sv,
                            const float* grad, float* dq) {
  mpl::dlogit_items(a, s, h, n0, v0, sv, grad, dq, threadIdx.x, kSoft);
  __syncthreads();
}

template <bool kSoft>
__global__ void __launch_bounds__(THREADS) forward_kernel(Args a, float* loss, Saved sv, uint8_t* top) {
  __shared__ Smem s;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BM, h = blockIdx.y;
  const int r = threadIdx.x;
  const int64_t n = n0 + r;
  const int64_t t = (!kSoft && r < BM && n < a.N) ? a.targets[n * a.H + h] : -1;
  mpl::RowState st = mpl::row_init(kSoft);
  for (int64_t v0 = 0; v0 < a.V; v0 += BV) {
    if (kSoft) mpl::stage_targets(a, s, h, n0, v0, threadIdx.x);  // read after logit_tile's barriers
    logit_tile(a, s, h, n0, v0);
    if (r < BM) mpl::fold_tile(s, st, r, v0, a.V, t, kSoft);
    __syncthreads();
  }
  if (r < BM && n < a.N) mpl::forward_row_out(a, st, n, h, kSoft || t >= 0, loss, sv, top);
}

template <bool kSoft>
__global__ void __launch_bounds__(THREADS) dx_kernel(Args a, Saved sv, const float* grad, float* dx, float* dq) {
  __shared__ Smem s;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BM, d0 = static_cast<int64_t>(blockIdx.y) * BD;
  const int64_t hx = blockIdx.z;
  // thread -> output (row r, features d0 + k + 8 * j): 32 rows x 64 features, 8 per thread
  const int r = threadIdx.x / 8, k = threadIdx.x % 8;
  float acc[BD / 8] = {};
  const int64_t heads = a.Hx == 1 ? a.H : 1;
  for (int64_t i = 0; i < heads; ++i) {
    const int64_t h = hx + i;
    for (int64_t v0 = 0; v0 < a.V; v0 += BV) {
      logit_tile(a, s, h, n0, v0);
      dlogit_tile<kSoft>(a, s, h, n0, v0, sv, grad, blockIdx.y == 0 ? dq : nullptr);
      mpl::dx_tile(a, s, acc, h, v0, d0, r, k);
      __syncthreads();
    }
  }
  const int64_t n = n0 + r;
  if (n < a.N) mpl::store_features(acc, dx, (n * a.Hx + hx) * a.D, d0, k, a.D);
}

template <bool kSoft>
__global__ void __launch_bounds__(THREADS) dw_kernel(Args a, Saved sv, const float* grad, float* dw, float* db) {
  __shared__ Smem s;
  const int64_t v0 = static_cast<int64_t>(blockIdx.x) * BV, d0 = static_cast<int64_t>(blockIdx.y) * BD;
  const int64_t h = blockIdx.z, hx = a.Hx == 1 ? 0 : h;
  const int c = threadIdx.x / 8, k = threadIdx.x % 8;
  float acc[BD / 8] = {};
  float dbias = 0.0f;
  for (int64_t n0 = 0; n0 < a.N; n0 += BM) {
    logit_tile(a, s, h, n0, v0);
    dlogit_tile<kSoft>(a, s, h, n0, v0, sv, grad, nullptr);
    mpl::dw_tile(a, s, acc, dbias, hx, n0, d0, c, k);
    __syncthreads();
  }
  const int64_t v = v0 + c;
  if (v >= a.V) return;
  mpl::store_features(acc, dw, (h * a.V + v) * a.D, d0, k, a.D);
  // dS carries the scale; the bias enters the logits unscaled.
  if (db != nullptr && blockIdx.y == 0 && k == 0) db[h * a.V + v] = dbias / a.scale;
}

template <bool kSoft>
void launch_all(const Args& a, const Launches& plan, const float* grad, float* loss, const Saved& sv, uint8_t* top,
                float* dx, float* dw, float* db, float* dq, cudaStream_t s) {
  forward_kernel<kSoft><<<grid_of(plan[0]), plan[0].threads, 0, s>>>(a, loss, sv, top);
  SSLFAST_CUDA_CHECK(cudaGetLastError());
  if (grad == nullptr) return;
  dx_kernel<kSoft><<<grid_of(plan[1]), plan[1].threads, 0, s>>>(a, sv, grad, dx, dq);
  SSLFAST_CUDA_CHECK(cudaGetLastError());
  dw_kernel<kSoft><<<grid_of(plan[2]), plan[2].threads, 0, s>>>(a, sv, grad, dw, db);
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
  (soft ? launch_all<true> : launch_all<false>)(a, plan, as_ptr<const float>(grad), as_ptr<float>(loss), sv,
                                                as_ptr<uint8_t>(top), as_ptr<float>(dx), as_ptr<float>(dw),
                                                as_ptr<float>(db), as_ptr<float>(dq), s);
}

}  // namespace

void bind_masked_prediction(py::module_& m) {
  m.def("masked_prediction_forward_backward", &forward_backward_cuda, py::arg("x"), py::arg("x_dtype"), py::arg("w"),
        py::arg("w_dtype"), py::arg("bias"), py::arg("b_dtype"), py::arg("targets"), py::arg("q"), py::arg("q_dtype"),
        py::arg("grad"), py::arg("N"), py::arg("H"), py::arg("Hx"), py::arg("V"), py::arg("D"), py::arg("scale"),
        py::arg("eps"), py::arg("loss"), py::arg("row_max"), py::arg("log_l"), py::arg("mass"), py::arg("top"),
        py::arg("dx"), py::arg("dw"), py::arg("db"), py::arg("dq"), py::arg("cuda_stream"));
}

}  // namespace sslfast
