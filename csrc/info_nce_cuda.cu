// CUDA kernels of in-batch InfoNCE / NT-Xent (math in csrc/info_nce.h, shared with the CPU).
//
// Tiles of 64 rows x 64 columns; the scores of a tile are built in registers (4 x 4 per
// thread) from 16-wide slices of both sides staged in shared memory, then written to a
// shared 64 x 64 tile that the per-row math (online log-sum-exp, dS) reads. Nothing M x C
// is ever stored. The backward is two launches of one kernel, over row blocks (dA) and over
// column blocks (dB), each recomputing its tiles from the saved (max, log l): no atomics,
// deterministic. The gradient block of a program is 64 rows x 128 features (32 fp32
// registers per thread); wider D takes more programs along grid y, each recomputing the
// scores of its rows.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <algorithm>

#include "info_nce.h"
#include "sslfast/bind.h"
#include "sslfast/cuda_check.h"
#include "sslfast/launch_cuda.h"

namespace py = pybind11;

namespace sslfast {
namespace {

using info_nce_launch::BM;       // rows of a block (and of a tile of the other side)
using info_nce_launch::BK;       // feature slice staged in shared memory
using info_nce_launch::DV;       // gradient features per program
using info_nce_launch::THREADS;  // 16 x 16 threads, 4 x 4 scores each

struct TileSmem {
  // +4: the loads write a column of 16 consecutive k per row; with rows 64 floats apart
  // they all hit one bank, with 68 they spread over eight.
  float x[BK][BM + 4];
  float y[BK][BM + 4];
  float s[BM][BM + 1];  // +1: the per-row sweeps read a column of rows without bank conflicts
};

// s[i][j] = scale * <X[x0 + i], Y[y0 + j]> for i < nx, j < ny (0 elsewhere). All threads
// of the block call it; it ends with a barrier so s can be read at once.
__device__ void tile_scores(const void* X, const void* Y, int dtype, int64_t x0, int nx, int64_t y0, int ny,
                            int64_t D, float scale, TileSmem& sm) {
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  for (int64_t k0 = 0; k0 < D; k0 += BK) {
    for (int e = tid; e < BM * BK; e += THREADS) {
      const int r = e / BK, kk = e % BK;
      const int64_t k = k0 + kk;
      sm.x[kk][r] = (r < nx && k < D) ? load_float(X, (x0 + r) * D + k, dtype) : 0.0f;
      sm.y[kk][r] = (r < ny && k < D) ? load_float(Y, (y0 + r) * D + k, dtype) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float xv[4], yv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = sm.x[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) yv[j] = sm.y[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xv[i], yv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) sm.s[ty * 4 + i][tx * 4 + j] = acc[i][j] * scale;
  __syncthreads();
}

__global__ void __launch_bounds__(THREADS) info_nce_forward_kernel(const void* a, const void* b, int dtype, int64_t M,
                                                                   int64_t C, int64_t D, const float* scale_ptr,
                                                                   int64_t pos_shift, int64_t pos_mod,
                                                                   bool exclude_self, float* loss, float* row_max,
                                                                   float* row_log_l) {
  __shared__ TileSmem sm;
  const float scale = *scale_ptr;
  const int64_t x0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int nx = static_cast<int>(M - x0 < BM ? M - x0 : BM);
  const int tid = threadIdx.x;
  const int64_t row = x0 + tid;
  infonce::RowState st = infonce::row_init();
  const int64_t pcol = tid < nx ? infonce::pos_col(row, pos_shift, pos_mod) : -1;
  for (int64_t c0 = 0; c0 < C; c0 += BM) {
    const int nc = static_cast<int>(C - c0 < BM ? C - c0 : BM);
    tile_scores(a, b, dtype, x0, nx, c0, nc, D, scale, sm);
    if (tid < nx) infonce::row_update(st, sm.s[tid], nc, c0, row, pcol, exclude_self);
    __syncthreads();  // s is rewritten by the next tile
  }
  if (tid < nx) {
    row_max[row] = st.m;
    row_log_l[row] = infonce::row_log_l(st);
    loss[row] = infonce::row_loss(st);
  }
}

// dX[x0 + r, d0 + k] = scale * sum_y dS(row, col) * Y[y, d0 + k]; X is the row side (dA) or,
// with col_side, the column side (dB). Thread t owns feature k = t % DV of rows
// t / DV + 2 i, i < 32.
__global__ void __launch_bounds__(THREADS) info_nce_backward_kernel(
    const void* X, const void* Y, int dtype, int64_t n_x, int64_t n_y, int64_t D, const float* scale_ptr,
    const float* row_max, const float* row_log_l, const float* g, int64_t pos_shift, int64_t pos_mod,
    bool exclude_self, bool col_side, float* dx) {
  constexpr int ROWS_PER_PASS = THREADS / DV;
  constexpr int ROWS_PER_THREAD = BM / ROWS_PER_PASS;
  __shared__ TileSmem sm;
  const float scale = *scale_ptr;
  const int64_t x0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int nx = static_cast<int>(n_x - x0 < BM ? n_x - x0 : BM);
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * DV;
  const int tid = threadIdx.x;
  const int k = tid % DV;
  const int r_first = tid / DV;
  const bool k_ok = d0 + k < D;
  float acc[ROWS_PER_THREAD];
#pragma unroll
  for (int i = 0; i < ROWS_PER_THREAD; ++i) acc[i] = 0.0f;
  for (int64_t y0 = 0; y0 < n_y; y0 += BM) {
    const int ny = static_cast<int>(n_y - y0 < BM ? n_y - y0 : BM);
    tile_scores(X, Y, dtype, x0, nx, y0, ny, D, scale, sm);
    for (int e = tid; e < BM * BM; e += THREADS) {
      const int x = e / BM, y = e % BM;
      float v = 0.0f;
      if (x < nx && y < ny) {
        const int64_t row = col_side ? y0 + y : x0 + x;
        const int64_t col = col_side ? x0 + x : y0 + y;
        v = infonce::dscore(sm.s[x][y], row_max[row], row_log_l[row], g[row],
                            col == infonce::pos_col(row, pos_shift, pos_mod), infonce::excluded(row, col, exclude_self));
      }
      sm.s[x][y] = v;
    }
    __syncthreads();
    if (k_ok) {
      for (int y = 0; y < ny; ++y) {
        const float yv = load_float(Y, (y0 + y) * D + d0 + k, dtype);
#pragma unroll
        for (int i = 0; i < ROWS_PER_THREAD; ++i) acc[i] = fmaf(sm.s[r_first + ROWS_PER_PASS * i][y], yv, acc[i]);
      }
    }
    __syncthreads();
  }
  if (!k_ok) return;
#pragma unroll
  for (int i = 0; i < ROWS_PER_THREAD; ++i) {
    const int r = r_first + ROWS_PER_PASS * i;
    if (r < nx) dx[(x0 + r) * D + d0 + k] = scale * acc[i];
  }
}

void info_nce_forward_cuda(std::uintptr_t a, std::uintptr_t b, int dtype, int64_t M, int64_t C, int64_t D,
                           std::uintptr_t scale, int64_t pos_shift, int64_t pos_mod, bool exclude_self,
                           std::uintptr_t loss, std::uintptr_t row_max, std::uintptr_t row_log_l,
                           std::uintptr_t stream) {
  if (M == 0) return;
  const Launch l = info_nce_launch::forward(M)[0];
  info_nce_forward_kernel<<<grid_of(l), l.threads, l.dyn_smem, reinterpret_cast<cudaStream_t>(stream)>>>(
      as_ptr<const void>(a), as_ptr<const void>(b), dtype, M, C, D, as_ptr<const float>(scale), pos_shift, pos_mod,
      exclude_self, as_ptr<float>(loss), as_ptr<float>(row_max), as_ptr<float>(row_log_l));
  SSLFAST_CUDA_CHECK(cudaGetLastError());
}

void info_nce_backward_cuda(std::uintptr_t a, std::uintptr_t b, int dtype, int64_t M, int64_t C, int64_t D,
                            std::uintptr_t scale, int64_t pos_shift, int64_t pos_mod, bool exclude_self,
                            std::uintptr_t row_max, std::uintptr_t row_log_l, std::uintptr_t grad,
                            int64_t n_grad_cols, std::uintptr_t da, std::uintptr_t db, std::uintptr_t stream) {
  if (M == 0) return;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const Launches plan = info_nce_launch::backward(M, n_grad_cols, D);  // one per pass with rows
  size_t next = 0;
  struct Pass {
    std::uintptr_t x, y, dx;
    int64_t n_x, n_y;
    bool col_side;
  };
  const Pass passes[2] = {{a, b, da, M, C, false}, {b, a, db, n_grad_cols, M, true}};
  for (const Pass& p : passes) {
    if (p.n_x == 0) continue;
    const Launch& l = plan[next++];
    info_nce_backward_kernel<<<grid_of(l), l.threads, l.dyn_smem, s>>>(
        as_ptr<const void>(p.x), as_ptr<const void>(p.y), dtype, p.n_x, p.n_y, D, as_ptr<const float>(scale),
        as_ptr<const float>(row_max), as_ptr<const float>(row_log_l), as_ptr<const float>(grad), pos_shift, pos_mod,
        exclude_self, p.col_side,
        as_ptr<float>(p.dx));
    SSLFAST_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace

void bind_info_nce(py::module_& m) {
  m.def("info_nce_forward", &info_nce_forward_cuda, py::arg("a"), py::arg("b"), py::arg("dtype"), py::arg("M"),
        py::arg("C"), py::arg("D"), py::arg("scale"), py::arg("pos_shift"), py::arg("pos_mod"),
        py::arg("exclude_self"), py::arg("loss"), py::arg("row_max"), py::arg("row_log_l"), py::arg("cuda_stream"));
  m.def("info_nce_backward", &info_nce_backward_cuda, py::arg("a"), py::arg("b"), py::arg("dtype"), py::arg("M"),
        py::arg("C"), py::arg("D"), py::arg("scale"), py::arg("pos_shift"), py::arg("pos_mod"),
        py::arg("exclude_self"), py::arg("row_max"), py::arg("row_log_l"), py::arg("grad"), py::arg("n_grad_cols"),
        py::arg("da"), py::arg("db"), py::arg("cuda_stream"));
}

}  // namespace sslfast
