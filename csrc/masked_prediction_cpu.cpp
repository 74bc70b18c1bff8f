// C++ CPU kernel of the masked-prediction loss (math in csrc/masked_prediction.h).
//
// One entry point serves the forward and the backward. Per head, rows are taken R at a time
// (a "chunk"); a chunk's logits S (R x V) are one GEMM with the head's weight, its rows are
// reduced (log-sum-exp, target logit, sum, top) and, when a per-row gradient weight g is
// given, turned in place into dS = scale * g * dloss/dz, from which dX (R x D) = dS W and the
// chunk's share of dW (V x D) += dS^T X are two more GEMMs. So the forward of a scalar loss
// computes its gradients in the same pass (the backward only scales them), and the backward
// of reduction "none" is this pass again with the incoming gradient: the logits are always
// recomputed, never stored beyond one chunk per thread. Memory O(N D + H V D + threads R V).
//
// Threads: chunks are processed in groups of `slots`; phase 1 gives each slot one chunk
// (logits, row math, dS, dX), phase 2 splits V into 48-class blocks and adds the group's
// chunks to dW in ascending chunk order. Every sum is taken in an order fixed by the shapes
// alone, so results are bit-identical for any number of threads.
//
// GEMMs: a 6 x 16 register-blocked micro-kernel (AVX2+FMA, or the scalar fallback with
// std::fma in the same order: the same bits) over 16-column panels of B. The head's weights
// are packed (and converted from fp16/bf16) into those panels once per head, both ways
// (W^T for the logits, W for dX: 2 V D floats), not once per chunk: repacked per chunk, the
// strided scalar copies took about as long as the micro-kernel itself at V = 8192.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "masked_prediction.h"
#include "sslfast/bind.h"
#include "sslfast/cpu_isa.h"
#include "sslfast/dtype.h"

namespace py = pybind11;

namespace sslfast {
namespace mpl {
namespace {

constexpr int MR = 6;       // micro-kernel rows
constexpr int NR = 16;      // micro-kernel columns (two AVX2 vectors)
constexpr int64_t R = 96;   // rows per chunk (a multiple of MR)
constexpr int64_t VB = 48;  // classes per dW block (a multiple of MR and NR)
constexpr int64_t KC = 256; // depth of a packed B panel (KC x NR fp32 = 16 KB, L1)

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[i][j] (+)= sum_p A[i * lda + p] * B[p * NR + j], i < MR, j < NR.
void micro_scalar(int64_t k, const float* A, int64_t lda, const float* B, float* C, int64_t ldc, bool acc) {
  float c[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) c[i][j] = acc ? C[i * ldc + j] : 0.0f;
  for (int64_t p = 0; p < k; ++p)
    for (int i = 0; i < MR; ++i) {
      const float a = A[i * lda + p];
      for (int j = 0; j < NR; ++j) c[i][j] = std::fma(a, B[p * NR + j], c[i][j]);
    }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) C[i * ldc + j] = c[i][j];
}

#if SSLFAST_X86_SIMD
SSLFAST_TARGET_AVX2 void micro_avx2(int64_t k, const float* A, int64_t lda, const float* B, float* C, int64_t ldc,
                                    bool acc) {
  // Twelve named accumulators: an indexed array would be spilled to the stack.
#define MPL_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define MPL_DECL(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps();
  MPL_ROWS(MPL_DECL)
#define MPL_LOAD(i)                                  \
  c##i##0 = _mm256_loadu_ps(C + i * ldc);            \
  c##i##1 = _mm256_loadu_ps(C + i * ldc + 8);
  if (acc) {
    MPL_ROWS(MPL_LOAD)
  }
  for (int64_t p = 0; p < k; ++p) {
    const __m256 b0 = _mm256_loadu_ps(B + p * NR), b1 = _mm256_loadu_ps(B + p * NR + 8);
#define MPL_FMA(i)                                             \
  {                                                            \
    const __m256 a = _mm256_broadcast_ss(A + i * lda + p);     \
    c##i##0 = _mm256_fmadd_ps(a, b0, c##i##0);                 \
    c##i##1 = _mm256_fmadd_ps(a, b1, c##i##1);                 \
  }
    MPL_ROWS(MPL_FMA)
  }
#define MPL_STORE(i)                       \
  _mm256_storeu_ps(C + i * ldc, c##i##0);  \
  _mm256_storeu_ps(C + i * ldc + 8, c##i##1);
  MPL_ROWS(MPL_STORE)
#undef MPL_ROWS
#undef MPL_DECL
#undef MPL_LOAD
#undef MPL_FMA
#undef MPL_STORE
}
#endif

using MicroFn = void (*)(int64_t, const float*, int64_t, const float*, float*, int64_t, bool);

MicroFn micro_kernel() {
#if SSLFAST_X86_SIMD
  if (cpu_isa() != Isa::scalar) return micro_avx2;
#endif
  return micro_scalar;
}

// C (m x n, ldc) (+)= A (m x k, lda) * B (k x n), m % MR == 0, n % NR == 0. B is pre-packed
// in panels: panel(p0, j0) points to B[p0 .. p0 + kc)[j0 .. j0 + NR) laid out kc x NR.
template <class PanelB>
void gemm(MicroFn micro, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, PanelB&& panel, float* C,
          int64_t ldc, bool accumulate) {
  if (k == 0 && !accumulate) {
    for (int64_t i = 0; i < m; ++i) std::fill(C + i * ldc, C + i * ldc + n, 0.0f);
    return;
  }
  for (int64_t p0 = 0; p0 < k; p0 += KC) {
    const int64_t kc = std::min(KC, k - p0);
    for (int64_t j0 = 0; j0 < n; j0 += NR) {
      const float* b = panel(p0, j0);
      for (int64_t i0 = 0; i0 < m; i0 += MR)
        micro(kc, A + i0 * lda + p0, lda, b, C + i0 * ldc + j0, ldc, accumulate || p0 > 0);
    }
  }
}

struct Problem {
  const void* x;  // (N, Hx, D) storage dtype
  int x_dtype;
  const void* w;  // (H, V, D)
  int w_dtype;
  const void* bias;  // (H, V) or null
  int b_dtype;
  const int64_t* targets;  // (N, H), -1 = ignored; unused with q
  const void* q;           // (N, H, V) soft targets or null
  int q_dtype;
  const float* grad;       // (N, H) gradient weight per row, or null: no gradients
  int64_t N, H, Hx, V, D;
  float scale, eps;
  float* loss;  // (N, H) or null
  float* row_max;  // (N, H) or null: the row's max logit and log l (lse = their sum, kept apart)
  float* log_l;    // (N, H) or null
  uint8_t* top; // (N, H) or null
  float* dx;    // (N, Hx, D), accumulated into (zeroed by the caller)
  float* dw;    // (H, V, D)
  float* db;    // (H, V) or null
  float* dq;    // (N, H, V) (zeroed by the caller) or null
};

// Workspace layout, all fp32: per slot S (R x Vs), dST (Vs x R), X rows (R x Dp), X panels
// (Dp / NR, R, NR), dX (R x Dp), a row of soft targets (Vs); shared: dW block
// accumulator (Vs x Dp), db accumulator (Vs), the head's W^T panels (Vs / NR, Dp, NR) and, with
// gradients, its W panels (Dp / NR, Vs, NR). Vs: V rounded up to VB, Dp: D rounded up to NR.
struct Layout {
  int64_t Vs, Dp, slots, per_slot, total;
  Layout(int64_t V, int64_t D, int64_t slots_, bool grad) : Vs(round_up(std::max<int64_t>(V, 1), VB)),
      Dp(round_up(std::max<int64_t>(D, 1), NR)), slots(slots_) {
    per_slot = R * Vs + (grad ? Vs * R : 0) + 2 * R * Dp + (grad ? R * Dp : 0) + Vs;
    total = slots * per_slot + (grad ? Vs * Dp + Vs : 0) + (grad ? 2 : 1) * Vs * Dp;
  }
};

// The head's weights as the micro-kernel's B panels (zero past V and D).
struct Packed {
  const float* wt;  // (Vs / NR, Dp, NR): B(p = d, j = v) of S = X W^T
  const float* w;   // (Dp / NR, Vs, NR): B(p = v, j = d) of dX = dS W, or null
};

// Panel jp (NR classes) of W^T and panel jp (NR features) of W, threads splitting the panels.
void pack_head(const Problem& p, const Layout& L, int64_t h, float* wt, float* w) {
  const int64_t nt = L.Vs / NR, nw = w ? L.Dp / NR : 0;
#pragma omp for schedule(static)
  for (int64_t jp = 0; jp < nt + nw; ++jp) {
    if (jp < nt) {
      float* out = wt + jp * L.Dp * NR;
      for (int64_t jj = 0; jj < NR; ++jj) {
        const int64_t v = jp * NR + jj;
        for (int64_t d = 0; d < L.Dp; ++d)
          out[d * NR + jj] = (v < p.V && d < p.D) ? load_float(p.w, (h * p.V + v) * p.D + d, p.w_dtype) : 0.0f;
      }
    } else {
      const int64_t d0 = (jp - nt) * NR;
      float* out = w + (jp - nt) * L.Vs * NR;
      for (int64_t v = 0; v < L.Vs; ++v)
        for (int64_t jj = 0; jj < NR; ++jj)
          out[v * NR + jj] =
              (v < p.V && d0 + jj < p.D) ? load_float(p.w, (h * p.V + v) * p.D + d0 + jj, p.w_dtype) : 0.0f;
    }
  }
}

int default_slots() {
#ifdef _OPENMP
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}

struct Slot {
  float *S, *dST, *xr, *xf, *dxb, *qrow;
};

Slot slot_at(const Layout& L, float* ws, int64_t s, bool grad) {
  float* p = ws + s * L.per_slot;
  Slot sl;
  sl.S = p, p += R * L.Vs;
  sl.dST = grad ? p : nullptr, p += grad ? L.Vs * R : 0;
  sl.xr = p, p += R * L.Dp;
  sl.xf = p, p += R * L.Dp;
  sl.dxb = grad ? p : nullptr, p += grad ? R * L.Dp : 0;
  sl.qrow = p;
  return sl;
}

// Phase 1 for chunk c of head h in slot sl.
void chunk_rows(const Problem& p, const Layout& L, MicroFn micro, const Packed& pk, int64_t h, int64_t c,
                const Slot& sl) {
  const int64_t n0 = c * R, nr = std::min(R, p.N - n0);
  const int64_t hx = p.Hx == 1 ? 0 : h;
  const bool grad = p.grad != nullptr;
  // X rows of the chunk as fp32, zero padded (rows past N, columns past D).
  for (int64_t r = 0; r < R; ++r) {
    float* row = sl.xr + r * L.Dp;
    for (int64_t d = 0; d < L.Dp; ++d)
      row[d] = (r < nr && d < p.D) ? load_float(p.x, ((n0 + r) * p.Hx + hx) * p.D + d, p.x_dtype) : 0.0f;
  }
  // S = X W_h^T: B(p = d, j = v) = W[h, v, d].
  auto panel_wt = [&](int64_t p0, int64_t j0) { return pk.wt + ((j0 / NR) * L.Dp + p0) * NR; };
  gemm(micro, R, L.Vs, p.D, sl.xr, L.Dp, panel_wt, sl.S, L.Vs, false);

  const float eps_over_v = p.eps / static_cast<float>(p.V);
  const bool soft = p.q != nullptr;
  for (int64_t r = 0; r < R; ++r) {
    float* z = sl.S + r * L.Vs;
    if (r >= nr) {
      std::fill(z, z + L.Vs, 0.0f);
      continue;
    }
    const int64_t i = (n0 + r) * p.H + h;
    const int64_t t = soft ? -1 : p.targets[i];
    const bool valid = soft || t >= 0;
    for (int64_t v = 0; v < p.V; ++v)
      z[v] = logit(z[v], p.scale, p.bias ? load_float(p.bias, h * p.V + v, p.b_dtype) : 0.0f);
    RowState st = row_init(soft);
    if (soft) {
      for (int64_t v = 0; v < p.V; ++v) sl.qrow[v] = load_float(p.q, i * p.V + v, p.q_dtype);
      row_update_soft(st, z, sl.qrow, static_cast<int>(p.V));
    } else {
      row_update(st, z, static_cast<int>(p.V), 0, t);
    }
    const float log_l = row_log_l(st);
    if (p.loss) p.loss[i] = row_loss(st, valid, p.eps, eps_over_v);
    if (p.row_max) p.row_max[i] = st.m;
    if (p.log_l) p.log_l[i] = log_l;
    if (p.top) p.top[i] = row_top(st, valid) ? 1 : 0;
    if (!grad) continue;
    const float g = valid ? p.grad[i] : 0.0f;
    if (g == 0.0f) {
      std::fill(z, z + L.Vs, 0.0f);
      continue;
    }
    const float mass = row_mass(st, p.eps);
    for (int64_t v = 0; v < p.V; ++v) {
      const float qv = soft ? sl.qrow[v] : (v == t ? 1.0f : 0.0f);
      if (p.dq) p.dq[i * p.V + v] = dtarget(z[v], st.m, log_l, g, p.eps);
      z[v] = p.scale * dlogit(z[v], st.m, log_l, g, qv, mass, p.eps, eps_over_v);
    }
    std::fill(z + p.V, z + L.Vs, 0.0f);
  }
  if (!grad) return;

  // dX = dS W_h: B(p = v, j = d) = W[h, v, d].
  auto panel_w = [&](int64_t p0, int64_t j0) { return pk.w + ((j0 / NR) * L.Vs + p0) * NR; };
  gemm(micro, R, L.Dp, p.V, sl.S, L.Vs, panel_w, sl.dxb, L.Dp, false);
  for (int64_t r = 0; r < nr; ++r) {
    float* out = p.dx + ((n0 + r) * p.Hx + hx) * p.D;
    const float* in = sl.dxb + r * L.Dp;
    for (int64_t d = 0; d < p.D; ++d) out[d] += in[d];
  }
  // dS^T for phase 2, and the chunk's X as NR-wide panels (the B of dW += dS^T X).
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < L.Vs; ++v) sl.dST[v * R + r] = sl.S[r * L.Vs + v];
  for (int64_t jp = 0; jp < L.Dp / NR; ++jp)
    for (int64_t r = 0; r < R; ++r)
      std::memcpy(sl.xf + (jp * R + r) * NR, sl.xr + r * L.Dp + jp * NR, NR * sizeof(float));
}

void run(const Problem& p, float* ws, int64_t slots) {
  const bool grad = p.grad != nullptr;
  const Layout L(p.V, p.D, slots, grad);
  const MicroFn micro = micro_kernel();
  const int64_t n_chunks = (p.N + R - 1) / R;
  const int64_t n_vblocks = L.Vs / VB;
  float* dw_acc = ws + slots * L.per_slot;
  float* db_acc = dw_acc + L.Vs * L.Dp;
  float* wt_pack = grad ? db_acc + L.Vs : dw_acc;
  float* w_pack = grad ? wt_pack + L.Vs * L.Dp : nullptr;
  const Packed pk{wt_pack, w_pack};
#pragma omp parallel
  {
    for (int64_t h = 0; h < p.H; ++h) {
      // every thread is past the previous head's last barrier: no reads of the panels remain
      pack_head(p, L, h, wt_pack, w_pack);
      if (grad) {
#pragma omp for schedule(static)
        for (int64_t v = 0; v < L.Vs; ++v) {
          std::fill(dw_acc + v * L.Dp, dw_acc + (v + 1) * L.Dp, 0.0f);
          db_acc[v] = 0.0f;
        }
      }
      for (int64_t c0 = 0; c0 < n_chunks; c0 += slots) {
        const int64_t group = std::min<int64_t>(slots, n_chunks - c0);
#pragma omp for schedule(static, 1)
        for (int64_t s = 0; s < group; ++s) chunk_rows(p, L, micro, pk, h, c0 + s, slot_at(L, ws, s, grad));
        if (!grad) continue;
        // Phase 2: dW[v block] += sum over the group's chunks, in chunk order.
#pragma omp for schedule(static)
        for (int64_t vb = 0; vb < n_vblocks; ++vb) {
          for (int64_t s = 0; s < group; ++s) {
            const Slot sl = slot_at(L, ws, s, grad);
            auto panel = [&](int64_t p0, int64_t j0) -> const float* { return sl.xf + ((j0 / NR) * R + p0) * NR; };
            const float* a = sl.dST + vb * VB * R;
            gemm(micro, VB, L.Dp, R, a, R, panel, dw_acc + vb * VB * L.Dp, L.Dp, true);
            for (int64_t v = 0; v < VB; ++v) {
              float sum = 0.0f;
              for (int64_t r = 0; r < R; ++r) sum += a[v * R + r];
              db_acc[vb * VB + v] += sum;
            }
          }
        }
      }
      if (!grad) continue;
#pragma omp for schedule(static)
      for (int64_t v = 0; v < p.V; ++v) {
        std::memcpy(p.dw + (h * p.V + v) * p.D, dw_acc + v * L.Dp, p.D * sizeof(float));
        // dS carries the scale; the bias enters the logits unscaled.
        if (p.db) p.db[h * p.V + v] = db_acc[v] / p.scale;
      }
    }
  }
}

std::tuple<int64_t, int64_t> layout_cpu(int64_t V, int64_t D, bool grad) {
  const int64_t slots = default_slots();
  return {slots, Layout(V, D, slots, grad).total};
}

void forward_backward_cpu(std::uintptr_t x, int x_dtype, std::uintptr_t w, int w_dtype, std::uintptr_t bias,
                          int b_dtype, std::uintptr_t targets, std::uintptr_t q, int q_dtype, std::uintptr_t grad,
                          int64_t N, int64_t H, int64_t Hx, int64_t V, int64_t D, double scale, double eps,
                          std::uintptr_t loss, std::uintptr_t row_max, std::uintptr_t log_l, std::uintptr_t top,
                          std::uintptr_t dx,
                          std::uintptr_t dw, std::uintptr_t db, std::uintptr_t dq, std::uintptr_t ws, int64_t slots) {
  const Problem p{as_ptr<const void>(x), x_dtype, as_ptr<const void>(w), w_dtype, as_ptr<const void>(bias), b_dtype,
                  as_ptr<const int64_t>(targets), as_ptr<const void>(q), q_dtype, as_ptr<const float>(grad), N, H, Hx,
                  V, D, static_cast<float>(scale), static_cast<float>(eps), as_ptr<float>(loss), as_ptr<float>(row_max),
                  as_ptr<float>(log_l),
                  as_ptr<uint8_t>(top), as_ptr<float>(dx), as_ptr<float>(dw), as_ptr<float>(db),
                  as_ptr<float>(dq)};
  if (N == 0 || H == 0) return;
  py::gil_scoped_release nogil;
  run(p, as_ptr<float>(ws), slots);
}

}  // namespace
}  // namespace mpl

void bind_masked_prediction(py::module_& m) {
  m.def("masked_prediction_layout", &mpl::layout_cpu, py::arg("V"), py::arg("D"), py::arg("grad"),
        "(slots, workspace floats) of masked_prediction_forward_backward for this V, D and thread count");
  m.def("masked_prediction_forward_backward", &mpl::forward_backward_cpu, py::arg("x"), py::arg("x_dtype"),
        py::arg("w"), py::arg("w_dtype"), py::arg("bias"), py::arg("b_dtype"), py::arg("targets"), py::arg("q"),
        py::arg("q_dtype"), py::arg("grad"), py::arg("N"), py::arg("H"), py::arg("Hx"), py::arg("V"), py::arg("D"),
        py::arg("scale"), py::arg("eps"), py::arg("loss"), py::arg("row_max"), py::arg("log_l"), py::arg("top"),
        py::arg("dx"),
        py::arg("dw"), py::arg("db"), py::arg("dq"), py::arg("ws"), py::arg("slots"));
}

}  // namespace sslfast
