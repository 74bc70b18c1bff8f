// CUDA kernels of the masked-prediction loss (math in csrc/masked_prediction.h, shared with
// the CPU kernel).
//
// A 32-row x 32-class logit tile is built in registers (2 x 2 per thread, 256 threads) from
// 32-wide feature slices of x and W staged in shared memory, then written to a shared tile
// that the per-row math (online log-sum-exp, dS) reads. Nothing N x V is stored.
// * forward: block (row block, head) walks the V tiles; the first 32 threads keep one row's
//   state each (mpl::row_update) and write loss, lse, top.
// * dX: block (row block, 64-feature block, x head) walks its head(s) and V tiles,
//   recomputing each logit tile from the saved lse, and accumulates dS W (8 outputs a thread).
// * dW (and db): block (class block, 64-feature block, head) walks the row tiles and
//   accumulates dS^T X. No atomics: deterministic. Wider D takes more blocks along grid y,
//   each recomputing its logit tiles.
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

// s.z -> g * dloss/dz in place, from each row's saved lse and gradient weight (0 when ignored).
__device__ void dlogit_tile(const Args& a, Smem& s, int64_t h, int64_t n0, int64_t v0, const float* lse,
                            const float* grad) {
  mpl::dlogit_items(a, s, h, n0, v0, lse, grad, threadIdx.x);
  __syncthreads();
}

__global__ void __launch_bounds__(THREADS) forward_kernel(Args a, float* loss, float* lse, uint8_t* top) {
  __shared__ Smem s;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BM, h = blockIdx.y;
  const int r = threadIdx.x;
  const int64_t n = n0 + r;
  const int64_t t = (r < BM && n < a.N) ? a.targets[n * a.H + h] : -1;
  mpl::RowState st = mpl::row_init(false);
  for (int64_t v0 = 0; v0 < a.V; v0 += BV) {
    logit_tile(a, s, h, n0, v0);
    if (r < BM) mpl::row_update(st, s.z[r], static_cast<int>(a.V - v0 < BV ? a.V - v0 : BV), v0, t);
    __syncthreads();
  }
  if (r < BM && n < a.N) mpl::forward_row_out(a, st, n, h, t, loss, lse, top);
}

__global__ void __launch_bounds__(THREADS) dx_kernel(Args a, const float* lse, const float* grad, float* dx) {
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
      dlogit_tile(a, s, h, n0, v0, lse, grad);
      mpl::dx_tile(a, s, acc, h, v0, d0, r, k);
      __syncthreads();
    }
  }
  const int64_t n = n0 + r;
  if (n < a.N) mpl::store_features(acc, dx, (n * a.Hx + hx) * a.D, d0, k, a.D);
}

__global__ void __launch_bounds__(THREADS) dw_kernel(Args a, const float* lse, const float* grad, float* dw,
                                                     float* db) {
  __shared__ Smem s;
  const int64_t v0 = static_cast<int64_t>(blockIdx.x) * BV, d0 = static_cast<int64_t>(blockIdx.y) * BD;
  const int64_t h = blockIdx.z, hx = a.Hx == 1 ? 0 : h;
  const int c = threadIdx.x / 8, k = threadIdx.x % 8;
  float acc[BD / 8] = {};
  float dbias = 0.0f;
  for (int64_t n0 = 0; n0 < a.N; n0 += BM) {
    logit_tile(a, s, h, n0, v0);
    dlogit_tile(a, s, h, n0, v0, lse, grad);
    mpl::dw_tile(a, s, acc, dbias, hx, n0, d0, c, k);
    __syncthreads();
  }
  const int64_t v = v0 + c;
  if (v >= a.V) return;
  mpl::store_features(acc, dw, (h * a.V + v) * a.D, d0, k, a.D);
  // dS carries the scale; the bias enters the logits unscaled.
  if (db != nullptr && blockIdx.y == 0 && k == 0) db[h * a.V + v] = dbias / a.scale;
}

void forward_backward_cuda(std::uintptr_t x, int x_dtype, std::uintptr_t w, int w_dtype, std::uintptr_t bias,
                           int b_dtype, std::uintptr_t targets, std::uintptr_t grad, int64_t N, int64_t H, int64_t Hx,
                           int64_t V, int64_t D, double scale, double eps, std::uintptr_t loss, std::uintptr_t lse,
                           std::uintptr_t top, std::uintptr_t dx, std::uintptr_t dw, std::uintptr_t db,
                           std::uintptr_t stream) {
  if (N == 0) return;
  const Args a{as_ptr<const void>(x), x_dtype, as_ptr<const void>(w), w_dtype, as_ptr<const void>(bias), b_dtype,
               as_ptr<const int64_t>(targets), N, H, Hx, V, D, static_cast<float>(scale), static_cast<float>(eps),
               static_cast<float>(eps / static_cast<double>(V))};
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const Launches plan = masked_prediction_launch::plan(N, H, Hx, V, D, grad != 0);
  forward_kernel<<<grid_of(plan[0]), plan[0].threads, 0, s>>>(a, as_ptr<float>(loss), as_ptr<float>(lse),
                                                            as_ptr<uint8_t>(top));
  SSLFAST_CUDA_CHECK(cudaGetLastError());
  if (grad == 0) return;
  dx_kernel<<<grid_of(plan[1]), plan[1].threads, 0, s>>>(a, as_ptr<const float>(lse), as_ptr<const float>(grad),
                                                       as_ptr<float>(dx));
  SSLFAST_CUDA_CHECK(cudaGetLastError());
  dw_kernel<<<grid_of(plan[2]), plan[2].threads, 0, s>>>(a, as_ptr<const float>(lse), as_ptr<const float>(grad),
                                                       as_ptr<float>(dw), as_ptr<float>(db));
  SSLFAST_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void bind_masked_prediction(py::module_& m) {
  m.def("masked_prediction_forward_backward", &forward_backward_cuda, py::arg("x"), py::arg("x_dtype"), py::arg("w"),
        py::arg("w_dtype"), py::arg("bias"), py::arg("b_dtype"), py::arg("targets"), py::arg("grad"), py::arg("N"),
        py::arg("H"), py::arg("Hx"), py::arg("V"), py::arg("D"), py::arg("scale"), py::arg("eps"), py::arg("loss"),
        py::arg("lse"), py::arg("top"), py::arg("dx"), py::arg("dw"), py::arg("db"), py::arg("cuda_stream"));
}

}  // namespace sslfast
