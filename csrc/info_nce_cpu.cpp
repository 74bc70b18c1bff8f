// C++ CPU kernels of in-batch InfoNCE / NT-Xent (math in csrc/info_nce.h).
//
// Blocked like the GPU kernels: a block of 64 rows is scored against 64-column tiles, so
// the working set is a few 64 x D fp32 buffers per thread and memory stays O(N * D). The
// backward is two passes, one over row blocks (dA) and one over column blocks (dB), each
// recomputing its score tiles from the saved lse: no atomics, deterministic for any number
// of threads. All three products go through one register-blocked micro-kernel.

// The micro-kernel is written as a * b + c; let the compiler fuse it into FMAs (the ISO
// -std=c++17 mode turns contraction off by default).
#pragma GCC optimize("fp-contract=fast")

#include <pybind11/pybind11.h>

#include <algorithm>
#include <vector>

#include "info_nce.h"
#include "sslfast/bind.h"

namespace py = pybind11;

namespace sslfast {
namespace {

constexpr int TILE = 64;  // rows of a block and of a tile; a multiple of MR and NR
constexpr int MR = 4;     // micro-kernel rows
constexpr int NR = 16;    // micro-kernel columns: two AVX2 / one AVX-512 vector

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Eight fp32 lanes: one AVX2 register, two SSE registers in the baseline build.
typedef float v8 __attribute__((vector_size(32)));

// By reference, not by value: a vector return value changes the ABI between the AVX and the
// baseline build of the body.
__attribute__((always_inline)) inline void load8(v8& v, const float* p) { __builtin_memcpy(&v, p, sizeof v); }

__attribute__((always_inline)) inline void store8(float* p, const v8& v) { __builtin_memcpy(p, &v, sizeof v); }

// C[i][j] (+)= sum_p A[i * lda + p] * B[p * ldb + j] for i < m, j < n (m % MR == 0,
// n % NR == 0). The MR x NR accumulator lives in eight named vector registers across the
// whole p loop (an indexed array was spilled to the stack on every iteration).
__attribute__((always_inline)) inline void gemm_body(
    int m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
    bool accumulate) {
  static_assert(MR == 4 && NR == 16, "the micro-kernel below is written out for 4 x 16");
  for (int i = 0; i < m; i += MR) {
    const float* a0 = A + i * lda;
    const float* a1 = a0 + lda;
    const float* a2 = a1 + lda;
    const float* a3 = a2 + lda;
    for (int64_t j = 0; j < n; j += NR) {
      float* c = C + i * ldc + j;
      v8 c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
      if (accumulate) {
        load8(c00, c), load8(c01, c + 8);
        load8(c10, c + ldc), load8(c11, c + ldc + 8);
        load8(c20, c + 2 * ldc), load8(c21, c + 2 * ldc + 8);
        load8(c30, c + 3 * ldc), load8(c31, c + 3 * ldc + 8);
      }
      const float* b = B + j;
      for (int64_t p = 0; p < k; ++p, b += ldb) {
        v8 b0, b1;
        load8(b0, b), load8(b1, b + 8);
        const float x0 = a0[p], x1 = a1[p], x2 = a2[p], x3 = a3[p];
        c00 += x0 * b0, c01 += x0 * b1;
        c10 += x1 * b0, c11 += x1 * b1;
        c20 += x2 * b0, c21 += x2 * b1;
        c30 += x3 * b0, c31 += x3 * b1;
      }
      store8(c, c00), store8(c + 8, c01);
      store8(c + ldc, c10), store8(c + ldc + 8, c11);
      store8(c + 2 * ldc, c20), store8(c + 2 * ldc + 8, c21);
      store8(c + 3 * ldc, c30), store8(c + 3 * ldc + 8, c31);
    }
  }
}

// The body compiled twice: for AVX2+FMA (x86) and for the baseline target, picked once at
// run time.
// (target_clones picked the baseline clone here, 25x slower, hence the explicit choice.)
using GemmFn = void (*)(int, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, bool);

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma"))) void gemm_avx2(int m, int64_t n, int64_t k, const float* A, int64_t lda,
                                                   const float* B, int64_t ldb, float* C, int64_t ldc, bool acc) {
  gemm_body(m, n, k, A, lda, B, ldb, C, ldc, acc);
}

#endif

void gemm_base(int m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
               int64_t ldc, bool acc) {
  gemm_body(m, n, k, A, lda, B, ldb, C, ldc, acc);
}

void gemm_acc(int m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc, bool acc) {
#if defined(__x86_64__) || defined(__i386__)
  static const GemmFn fn = (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? gemm_avx2 : gemm_base;
#else
  static const GemmFn fn = gemm_base;
#endif
  fn(m, n, k, A, lda, B, ldb, C, ldc, acc);
}

// Rows r0..r0+nr of X (D columns, storage dtype) as fp32 into dst[TILE][ld], zero padded.
void load_rows(const void* X, int dtype, int64_t r0, int nr, int64_t D, float* dst, int64_t ld) {
  std::fill(dst, dst + TILE * ld, 0.0f);
  for (int i = 0; i < nr; ++i)
    for (int64_t k = 0; k < D; ++k) dst[i * ld + k] = infonce::load_float(X, (r0 + i) * D + k, dtype);
}

// The same rows transposed: dst[k][i] (D x TILE), zero padded past nr.
void load_rows_t(const void* X, int dtype, int64_t r0, int nr, int64_t D, float* dst) {
  std::fill(dst, dst + D * TILE, 0.0f);
  for (int i = 0; i < nr; ++i)
    for (int64_t k = 0; k < D; ++k) dst[k * TILE + i] = infonce::load_float(X, (r0 + i) * D + k, dtype);
}

struct Problem {
  const void* a;  // rows (M, D)
  const void* b;  // columns (C, D)
  int dtype;
  int64_t M, C, D;
  float scale;
  int64_t pos_shift, pos_mod;
  bool exclude_self;
};

void forward(const Problem& p, float* loss, float* lse) {
  const int64_t n_blocks = (p.M + TILE - 1) / TILE;
#pragma omp parallel
  {
    std::vector<float> xf(TILE * p.D), yt(p.D * TILE), s(TILE * TILE);
#pragma omp for schedule(dynamic)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t r0 = blk * TILE;
      const int nr = static_cast<int>(std::min<int64_t>(TILE, p.M - r0));
      load_rows(p.a, p.dtype, r0, nr, p.D, xf.data(), p.D);
      infonce::RowState st[TILE];
      for (int i = 0; i < TILE; ++i) st[i] = infonce::row_init();
      for (int64_t c0 = 0; c0 < p.C; c0 += TILE) {
        const int nc = static_cast<int>(std::min<int64_t>(TILE, p.C - c0));
        load_rows_t(p.b, p.dtype, c0, nc, p.D, yt.data());
        gemm_acc(TILE, TILE, p.D, xf.data(), p.D, yt.data(), TILE, s.data(), TILE, false);
        for (int i = 0; i < nr; ++i) {
          float* row = s.data() + i * TILE;
          for (int j = 0; j < nc; ++j) row[j] *= p.scale;
          infonce::row_update(st[i], row, nc, c0, r0 + i, infonce::pos_col(r0 + i, p.pos_shift, p.pos_mod),
                              p.exclude_self);
        }
      }
      for (int i = 0; i < nr; ++i) {
        lse[r0 + i] = infonce::row_lse(st[i]);
        loss[r0 + i] = lse[r0 + i] - st[i].pos;
      }
    }
  }
}

// One backward pass. The "X side" is the block whose gradient this pass produces: the rows
// (dA, col_side = false) or the columns (dB, col_side = true); the "Y side" is walked tile by
// tile. dX[x] = scale * sum_y dS(x, y) * Y[y], where dS is dL/ds of the (row, col) pair.
void backward_pass(const Problem& p, bool col_side, int64_t n_x, const float* lse, const float* g, float* dx) {
  const void* X = col_side ? p.b : p.a;
  const void* Y = col_side ? p.a : p.b;
  const int64_t n_y = col_side ? p.M : p.C;
  const int64_t Dp = round_up(p.D, NR);
  const int64_t n_blocks = (n_x + TILE - 1) / TILE;
#pragma omp parallel
  {
    std::vector<float> xf(TILE * p.D), yt(p.D * TILE), yf(TILE * Dp), s(TILE * TILE), acc(TILE * Dp);
#pragma omp for schedule(dynamic)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t x0 = blk * TILE;
      const int nx = static_cast<int>(std::min<int64_t>(TILE, n_x - x0));
      load_rows(X, p.dtype, x0, nx, p.D, xf.data(), p.D);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t y0 = 0; y0 < n_y; y0 += TILE) {
        const int ny = static_cast<int>(std::min<int64_t>(TILE, n_y - y0));
        load_rows_t(Y, p.dtype, y0, ny, p.D, yt.data());
        load_rows(Y, p.dtype, y0, ny, p.D, yf.data(), Dp);
        gemm_acc(TILE, TILE, p.D, xf.data(), p.D, yt.data(), TILE, s.data(), TILE, false);
        for (int x = 0; x < TILE; ++x) {
          for (int y = 0; y < TILE; ++y) {
            float& v = s[x * TILE + y];
            if (x >= nx || y >= ny) {
              v = 0.0f;
              continue;
            }
            const int64_t row = col_side ? y0 + y : x0 + x;
            const int64_t col = col_side ? x0 + x : y0 + y;
            v = infonce::dscore(p.scale * v, lse[row], g[row], col == infonce::pos_col(row, p.pos_shift, p.pos_mod),
                                infonce::excluded(row, col, p.exclude_self));
          }
        }
        gemm_acc(TILE, Dp, TILE, s.data(), TILE, yf.data(), Dp, acc.data(), Dp, true);
      }
      for (int x = 0; x < nx; ++x)
        for (int64_t k = 0; k < p.D; ++k) dx[(x0 + x) * p.D + k] = p.scale * acc[x * Dp + k];
    }
  }
}

Problem make_problem(std::uintptr_t a, std::uintptr_t b, int dtype, int64_t M, int64_t C, int64_t D,
                     std::uintptr_t scale, int64_t pos_shift, int64_t pos_mod, bool exclude_self) {
  return Problem{as_ptr<const void>(a), as_ptr<const void>(b), dtype, M, C, D, *as_ptr<const float>(scale),
                 pos_shift, pos_mod, exclude_self};
}

void info_nce_forward_cpu(std::uintptr_t a, std::uintptr_t b, int dtype, int64_t M, int64_t C, int64_t D,
                          std::uintptr_t scale, int64_t pos_shift, int64_t pos_mod, bool exclude_self,
                          std::uintptr_t loss, std::uintptr_t lse) {
  if (M == 0) return;
  const Problem p = make_problem(a, b, dtype, M, C, D, scale, pos_shift, pos_mod, exclude_self);
  py::gil_scoped_release nogil;
  forward(p, as_ptr<float>(loss), as_ptr<float>(lse));
}

void info_nce_backward_cpu(std::uintptr_t a, std::uintptr_t b, int dtype, int64_t M, int64_t C, int64_t D,
                           std::uintptr_t scale, int64_t pos_shift, int64_t pos_mod, bool exclude_self,
                           std::uintptr_t lse, std::uintptr_t grad, int64_t n_grad_cols, std::uintptr_t da,
                           std::uintptr_t db) {
  if (M == 0) return;
  const Problem p = make_problem(a, b, dtype, M, C, D, scale, pos_shift, pos_mod, exclude_self);
  py::gil_scoped_release nogil;
  backward_pass(p, false, M, as_ptr<const float>(lse), as_ptr<const float>(grad), as_ptr<float>(da));
  backward_pass(p, true, n_grad_cols, as_ptr<const float>(lse), as_ptr<const float>(grad), as_ptr<float>(db));
}

}  // namespace

void bind_info_nce(py::module_& m) {
  m.def("info_nce_forward", &info_nce_forward_cpu, py::arg("a"), py::arg("b"), py::arg("dtype"), py::arg("M"),
        py::arg("C"), py::arg("D"), py::arg("scale"), py::arg("pos_shift"), py::arg("pos_mod"),
        py::arg("exclude_self"), py::arg("loss"), py::arg("lse"));
  m.def("info_nce_backward", &info_nce_backward_cpu, py::arg("a"), py::arg("b"), py::arg("dtype"), py::arg("M"),
        py::arg("C"), py::arg("D"), py::arg("scale"), py::arg("pos_shift"), py::arg("pos_mod"),
        py::arg("exclude_self"), py::arg("lse"), py::arg("grad"), py::arg("n_grad_cols"), py::arg("da"),
        py::arg("db"));
}

}  // namespace sslfast
