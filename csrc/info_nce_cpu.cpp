// C++ CPU kernels of in-batch InfoNCE / NT-Xent (math in csrc/info_nce.h).
//
// Blocked like the GPU kernels: a block of 64 rows is scored against 64-column tiles, so
// the working set is a few 64 x D fp32 buffers per thread and memory stays O(N * D). The
// backward is two passes, one over row blocks (dA) and one over column blocks (dB), each
// recomputing its score tiles from the saved (max, log l): no atomics, deterministic for any number
// of threads. All three products go through one register-blocked micro-kernel.

// The micro-kernel is written as a * b + c; let the compiler fuse it into FMAs (the ISO
// -std=c++17 mode turns contraction off by default).
#pragma GCC optimize("fp-contract=fast")

#include <pybind11/pybind11.h>

#include <algorithm>
#include <vector>

#include "info_nce.h"
#include "sslfast/bind.h"
#include "sslfast/parallel.h"

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

// C[i][j] (+)= sum_p A[i * lda + p] * B(p, j) for i < m, j < n (m % MR == 0, n % NR == 0),
// where B(p, j) = B[(j / NR) * panel + p * ldb + j % NR]: B is read as NR-wide column panels,
// so packed operands (ldb = NR, panel = k * NR) stream contiguously; a row-major B is
// ldb = row stride, panel = NR. The MR x NR accumulator lives in eight named vector registers across the
// whole p loop (an indexed array was spilled to the stack on every iteration).
__attribute__((always_inline)) inline void gemm_body(
    int m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, int64_t panel, float* C,
    int64_t ldc, bool accumulate) {
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
      const float* b = B + (j / NR) * panel;
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
using GemmFn = void (*)(int, int64_t, int64_t, const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t,
                        bool);

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma"))) void gemm_avx2(int m, int64_t n, int64_t k, const float* A, int64_t lda,
                                                   const float* B, int64_t ldb, int64_t panel, float* C, int64_t ldc,
                                                   bool acc) {
  gemm_body(m, n, k, A, lda, B, ldb, panel, C, ldc, acc);
}

#endif

void gemm_base(int m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, int64_t panel,
               float* C, int64_t ldc, bool acc) {
  gemm_body(m, n, k, A, lda, B, ldb, panel, C, ldc, acc);
}

void gemm_acc(int m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, int64_t panel,
              float* C, int64_t ldc, bool acc) {
#if defined(__x86_64__) || defined(__i386__)
  static const GemmFn fn = (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? gemm_avx2 : gemm_base;
#else
  static const GemmFn fn = gemm_base;
#endif
  fn(m, n, k, A, lda, B, ldb, panel, C, ldc, acc);
}

// Operands arrive as fp32 copies packed by `pack` below into buffers that the Python side
// allocates (sslfast/ops/info_nce.py, _cpu_operands), zero padded so that every tile is full (rows to a multiple of TILE,
// features to a multiple of NR), each side in three layouts: row-major (rows, Dp); "t"
// panels (rows / NR, Dp, NR), the B of the score product; "f" panels (Dp / NR, rows, NR), the
// B of the gradient product. The micro-kernel then streams every operand contiguously (a
// strided B aliased in L1 and ran 4x slower) with no per-tile conversion or bounds checks.
struct Side {
  const float* rows;
  const float* t;
  const float* f;
  int64_t n, n_pad;
};

struct Problem {
  Side a, b;
  int64_t Dp;
  float scale;
  int64_t pos_shift, pos_mod;
  bool exclude_self;
};

void forward(const Problem& p, float* loss, float* row_max, float* row_log_l) {
  const int64_t n_blocks = (p.a.n + TILE - 1) / TILE;
#pragma omp parallel if (parallel::use_threads(p.a.n * p.b.n * p.Dp, parallel::kMinInfoNceMacs))
  {
    std::vector<float> s(TILE * TILE);
#pragma omp for schedule(dynamic)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t r0 = blk * TILE;
      const int nr = static_cast<int>(std::min<int64_t>(TILE, p.a.n - r0));
      infonce::RowState st[TILE];
      int64_t pcol[TILE];
      for (int i = 0; i < nr; ++i) {
        st[i] = infonce::row_init();
        pcol[i] = infonce::pos_col(r0 + i, p.pos_shift, p.pos_mod);
      }
      for (int64_t c0 = 0; c0 < p.b.n; c0 += TILE) {
        const int nc = static_cast<int>(std::min<int64_t>(TILE, p.b.n - c0));
        gemm_acc(TILE, TILE, p.Dp, p.a.rows + r0 * p.Dp, p.Dp, p.b.t + c0 * p.Dp, NR, p.Dp * NR, s.data(), TILE,
                 false);
        for (int i = 0; i < nr; ++i) {
          float* row = s.data() + i * TILE;
          for (int j = 0; j < nc; ++j) row[j] *= p.scale;
          infonce::row_update(st[i], row, nc, c0, r0 + i, pcol[i], p.exclude_self);
        }
      }
      for (int i = 0; i < nr; ++i) {
        row_max[r0 + i] = st[i].m;
        row_log_l[r0 + i] = infonce::row_log_l(st[i]);
        loss[r0 + i] = infonce::row_loss(st[i]);
      }
    }
  }
}

// One backward pass. The "X side" is the block whose gradient this pass produces: the rows
// (dA, col_side = false) or the columns (dB, col_side = true); the "Y side" is walked tile by
// tile. dX[x] = scale * sum_y dS(x, y) * Y[y], where dS is dL/ds of the (row, col) pair.
void backward_pass(const Problem& p, bool col_side, int64_t n_x, const float* row_max, const float* row_log_l,
                   const float* g, float* dx, int64_t D) {
  const Side& X = col_side ? p.b : p.a;
  const Side& Y = col_side ? p.a : p.b;
  const int64_t n_y = Y.n;
  const int64_t n_blocks = (n_x + TILE - 1) / TILE;
#pragma omp parallel if (parallel::use_threads(n_x * n_y * D, parallel::kMinInfoNceMacs))
  {
    std::vector<float> s(TILE * TILE), acc(TILE * p.Dp);
#pragma omp for schedule(dynamic)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t x0 = blk * TILE;
      const int nx = static_cast<int>(std::min<int64_t>(TILE, n_x - x0));
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t y0 = 0; y0 < n_y; y0 += TILE) {
        const int ny = static_cast<int>(std::min<int64_t>(TILE, n_y - y0));
        gemm_acc(TILE, TILE, p.Dp, X.rows + x0 * p.Dp, p.Dp, Y.t + y0 * p.Dp, NR, p.Dp * NR, s.data(), TILE, false);
        // The positive column of each row is hoisted out of the element loop (a 64-bit
        // modulo per score cost as much as the scores themselves).
        int64_t pcol[TILE];
        const int n_rows = col_side ? ny : nx;
        const int64_t row0 = col_side ? y0 : x0;
        for (int r = 0; r < n_rows; ++r) pcol[r] = infonce::pos_col(row0 + r, p.pos_shift, p.pos_mod);
        for (int x = 0; x < TILE; ++x) {
          float* sx = s.data() + x * TILE;
          if (x >= nx) {
            std::fill(sx, sx + TILE, 0.0f);
            continue;
          }
          for (int y = 0; y < ny; ++y) {
            const int r = col_side ? y : x;
            const int64_t row = row0 + r;
            const int64_t col = col_side ? x0 + x : y0 + y;
            sx[y] = infonce::dscore(p.scale * sx[y], row_max[row], row_log_l[row], g[row], col == pcol[r],
                                    infonce::excluded(row, col, p.exclude_self));
          }
          std::fill(sx + ny, sx + TILE, 0.0f);
        }
        gemm_acc(TILE, p.Dp, TILE, s.data(), TILE, Y.f + y0 * NR, NR, Y.n_pad * NR, acc.data(), p.Dp, true);
      }
      for (int x = 0; x < nx; ++x)
        for (int64_t k = 0; k < D; ++k) dx[(x0 + x) * D + k] = p.scale * acc[x * p.Dp + k];
    }
  }
}

// x (n, D), storage dtype -> the three fp32 layouts of a Side (t or f may be 0: skipped).
void pack(const void* x, int dtype, int64_t n, int64_t D, float* rows, float* t, float* f) {
  const int64_t n_pad = round_up(n, TILE), Dp = round_up(D, NR);
#pragma omp parallel for schedule(static)
  for (int64_t r0 = 0; r0 < n_pad; r0 += NR) {
    for (int64_t r = r0; r < r0 + NR; ++r) {
      for (int64_t k = 0; k < Dp; ++k) {
        const float v = (r < n && k < D) ? load_float(x, r * D + k, dtype) : 0.0f;
        if (rows) rows[r * Dp + k] = v;
        if (t) t[(r / NR) * Dp * NR + k * NR + r % NR] = v;
        if (f) f[(k / NR) * n_pad * NR + r * NR + k % NR] = v;
      }
    }
  }
}

void info_nce_pack_cpu(std::uintptr_t x, int dtype, int64_t n, int64_t D, std::uintptr_t rows, std::uintptr_t t,
                       std::uintptr_t f) {
  py::gil_scoped_release nogil;
  pack(as_ptr<const void>(x), dtype, n, D, as_ptr<float>(rows), as_ptr<float>(t), as_ptr<float>(f));
}

Side make_side(std::uintptr_t rows, std::uintptr_t t, std::uintptr_t f, int64_t n) {
  return Side{as_ptr<const float>(rows), as_ptr<const float>(t), as_ptr<const float>(f), n, round_up(n, TILE)};
}

void info_nce_forward_cpu(std::uintptr_t a, std::uintptr_t b_t, int64_t M, int64_t C, int64_t D, std::uintptr_t scale,
                          int64_t pos_shift, int64_t pos_mod, bool exclude_self, std::uintptr_t loss,
                          std::uintptr_t row_max, std::uintptr_t row_log_l) {
  if (M == 0) return;
  const Problem p{make_side(a, 0, 0, M), make_side(0, b_t, 0, C), round_up(D, NR), *as_ptr<const float>(scale),
                  pos_shift, pos_mod, exclude_self};
  py::gil_scoped_release nogil;
  forward(p, as_ptr<float>(loss), as_ptr<float>(row_max), as_ptr<float>(row_log_l));
}

void info_nce_backward_cpu(std::uintptr_t a, std::uintptr_t a_t, std::uintptr_t a_f, std::uintptr_t b,
                           std::uintptr_t b_t, std::uintptr_t b_f, int64_t M, int64_t C, int64_t D,
                           std::uintptr_t scale, int64_t pos_shift, int64_t pos_mod, bool exclude_self,
                           std::uintptr_t row_max, std::uintptr_t row_log_l, std::uintptr_t grad,
                           int64_t n_grad_cols, std::uintptr_t da, std::uintptr_t db) {
  if (M == 0) return;
  const Problem p{make_side(a, a_t, a_f, M), make_side(b, b_t, b_f, C), round_up(D, NR), *as_ptr<const float>(scale),
                  pos_shift, pos_mod, exclude_self};
  py::gil_scoped_release nogil;
  const float *mx = as_ptr<const float>(row_max), *ll = as_ptr<const float>(row_log_l);
  backward_pass(p, false, M, mx, ll, as_ptr<const float>(grad), as_ptr<float>(da), D);
  backward_pass(p, true, n_grad_cols, mx, ll, as_ptr<const float>(grad), as_ptr<float>(db), D);
}

}  // namespace

void bind_info_nce(py::module_& m) {
  m.def("info_nce_pack", &info_nce_pack_cpu, py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("D"),
        py::arg("rows"), py::arg("t"), py::arg("f"));
  m.def("info_nce_forward", &info_nce_forward_cpu, py::arg("a"), py::arg("b_t"), py::arg("M"),
        py::arg("C"), py::arg("D"), py::arg("scale"), py::arg("pos_shift"), py::arg("pos_mod"),
        py::arg("exclude_self"), py::arg("loss"), py::arg("row_max"), py::arg("row_log_l"));
  m.def("info_nce_backward", &info_nce_backward_cpu, py::arg("a"), py::arg("a_t"), py::arg("a_f"), py::arg("b"),
        py::arg("b_t"), py::arg("b_f"), py::arg("M"), py::arg("C"), py::arg("D"), py::arg("scale"), py::arg("pos_shift"), py::arg("pos_mod"),
        py::arg("exclude_self"), py::arg("row_max"), py::arg("row_log_l"), py::arg("grad"), py::arg("n_grad_cols"),
        py::arg("da"), py::arg("db"));
}

}  // namespace sslfast
