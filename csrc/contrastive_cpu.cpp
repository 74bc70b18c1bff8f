// CPU kernels of the wav2vec 2.0 contrastive loss (math in csrc/contrastive.h, spec in
// sslfast/reference/contrastive.py). OpenMP over rows; the loops over D are written for the
// vectoriser and compiled twice, for AVX2+FMA and for the baseline ISA, chosen at run time
// (the build does not pass -march, so the baseline alone would be SSE2).
//
// Forward: per row, stream the K+1 candidates (gathered rows of y), keep an online
// log-sum-exp; write the row loss, lse's two parts (RowStats) and fairseq's "correct" flag.
// Squared norms of all y rows are computed once per call (M*D work instead of N*(K+1)*D).
// Backward, race-free and deterministic: per row, recompute each logit, write grad x and the
// two coefficients (alpha, beta) of every candidate; then per target row j, a segmented sum
// over the candidates that point at j (CSR built by the caller):
//   grad y[j] = sum alpha_e x_{row(e)} + (sum beta_e) y[j].
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "contrastive.h"
#include "sslfast/bind.h"
#include "sslfast/parallel.h"

namespace py = pybind11;

namespace sslfast {
namespace contrastive {
namespace {

#define SSLFAST_INLINE inline __attribute__((always_inline))
#define SSLFAST_AVX2 __attribute__((target("avx2,fma")))

// Independent partial sums (four AVX2 registers) so the FMA latency chain does not bound the
// loop; the fixed tree keeps the result identical for identical inputs, which
// candidate_masked relies on.
constexpr int kLanes = 32;

SSLFAST_INLINE float tree_sum(float* acc) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

template <class S>
SSLFAST_INLINE float dot_row(const float* xf, const typename S::T* t, int64_t D) {
  float acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += xf[d + l] * S::load(t[d + l]);
  }
  for (int l = 0; d < D; ++d, ++l) acc[l] += xf[d] * S::load(t[d]);
  return tree_sum(acc);
}

template <class S>
SSLFAST_INLINE float sq_row(const typename S::T* t, int64_t D) {
  float acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += S::load(t[d + l]) * S::load(t[d + l]);
  }
  for (int l = 0; d < D; ++d, ++l) acc[l] += S::load(t[d]) * S::load(t[d]);
  return tree_sum(acc);
}

// The candidates are random rows of y (L2/L3 at production sizes): ask for the next one
// while the current one is being reduced.
template <class S>
SSLFAST_INLINE void prefetch_row(const typename S::T* p, int64_t D) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = D * static_cast<int64_t>(sizeof(typename S::T));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
}

template <class S>
SSLFAST_INLINE float load_row(float* out, const typename S::T* src, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] = S::load(src[d]);
  return sq_row<F32>(out, D);
}

template <class S>
SSLFAST_INLINE bool rows_equal(const typename S::T* a, const typename S::T* b, int64_t D) {
  int differ = 0;
#pragma omp simd reduction(| : differ)
  for (int64_t d = 0; d < D; ++d) differ |= S::load(a[d]) != S::load(b[d]);
  return differ == 0;
}

// Whole-vector equality is checked in full only when the norm and the dot with x already
// agree: equal vectors give bit-equal results from the same loop, so this filter is exact.
template <class S>
SSLFAST_INLINE bool candidate_masked(const Args<S>& a, const float* ysq, int64_t j, int64_t jp, float dot,
                                     float dot0) {
  if (a.neg_mode == kNegIndex) return j == jp;
  if (a.neg_mode == kNegVector)
    return ysq[j] == ysq[jp] && dot == dot0 && rows_equal<S>(a.y + j * a.D, a.y + jp * a.D, a.D);
  return false;
}

template <class S>
SSLFAST_INLINE void forward_row(const Args<S>& a, const float* ysq, int64_t i, float* xf, float* loss, float* stats,
                                bool* correct) {
  const int64_t D = a.D;
  const float nx = clamped_norm(load_row<S>(xf, a.x + i * D, D));
  const int64_t jp = candidate_index(a.neg, a.neg_itype, a.pos, a.pos_itype, i, 0, a.K, a.M);
  RowState st = row_init();
  float dot0 = 0.0f;
  for (int64_t k = 0; k <= a.K; ++k) {
    const int64_t j = k == 0 ? jp : candidate_index(a.neg, a.neg_itype, a.pos, a.pos_itype, i, k, a.K, a.M);
    if (k < a.K) prefetch_row<S>(a.y + candidate_index(a.neg, a.neg_itype, a.pos, a.pos_itype, i, k + 1, a.K, a.M) * D, D);
    const float dot = dot_row<S>(xf, a.y + j * D, D);
    if (k == 0) dot0 = dot;
    float logit = neg_inf();
    if (k == 0 || !candidate_masked(a, ysq, j, jp, dot, dot0))
      logit = logit_from_cosine<S>(cosine(dot, nx, clamped_norm(ysq[j])), a.temperature, a.precision);
    row_push(st, k, logit);
  }
  loss[i] = row_loss(st);
  save_row_stats(st, stats, i, a.N);
  correct[i] = row_correct(st);
}

template <class S>
SSLFAST_INLINE void backward_row(const Args<S>& a, const float* ysq, int64_t i, const float* grad_rows,
                                 const float* stats, float* xf, float* gx, typename S::T* grad_x, float* alpha,
                                 float* beta) {
  const int64_t D = a.D, K1 = a.K + 1;
  const float nx_sq = load_row<S>(xf, a.x + i * D, D);
  const float nx = clamped_norm(nx_sq);
  const int64_t jp = candidate_index(a.neg, a.neg_itype, a.pos, a.pos_itype, i, 0, a.K, a.M);
  for (int64_t d = 0; d < D; ++d) gx[d] = 0.0f;
  float sum_gc = 0.0f, dot0 = 0.0f;
  for (int64_t k = 0; k < K1; ++k) {
    const int64_t j = k == 0 ? jp : candidate_index(a.neg, a.neg_itype, a.pos, a.pos_itype, i, k, a.K, a.M);
    if (k + 1 < K1) prefetch_row<S>(a.y + candidate_index(a.neg, a.neg_itype, a.pos, a.pos_itype, i, k + 1, a.K, a.M) * D, D);
    const typename S::T* t = a.y + j * D;
    const float dot = dot_row<S>(xf, t, D);
    if (k == 0) dot0 = dot;
    float al = 0.0f, be = 0.0f;
    if (k == 0 || !candidate_masked(a, ysq, j, jp, dot, dot0)) {
      const float cos = cosine(dot, nx, clamped_norm(ysq[j]));
      const float logit = logit_from_cosine<S>(cos, a.temperature, a.precision);
      const CandidateGrad cg =
          candidate_grad(logit, load_row_stats(stats, i, a.N), k == 0, grad_rows[i], a.temperature, cos, nx, ysq[j]);
      al = cg.alpha;
      be = cg.beta;
      sum_gc += cg.gc;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) gx[d] += al * S::load(t[d]);
    }
    alpha[i * K1 + k] = al;
    beta[i * K1 + k] = be;
  }
  const float cx = x_self_coefficient(sum_gc, nx_sq);
  typename S::T* out = grad_x + i * D;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] = S::store(gx[d] + cx * xf[d]);
}

template <class S>
SSLFAST_INLINE void segment_row(const typename S::T* x, const typename S::T* y, const float* alpha, const float* beta,
                                const int64_t* order, const int64_t* offsets, int64_t j, int64_t D, int64_t K1,
                                float* acc, typename S::T* grad_y) {
  for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
  float bsum = 0.0f;
  for (int64_t e = offsets[j]; e < offsets[j + 1]; ++e) {
    const int64_t ent = order[e];
    if (e + 1 < offsets[j + 1]) prefetch_row<S>(x + (order[e + 1] / K1) * D, D);
    const float al = alpha[ent];
    bsum += beta[ent];
    if (al == 0.0f) continue;  // masked candidates and rows with zero incoming gradient
    const typename S::T* xr = x + (ent / K1) * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += al * S::load(xr[d]);
  }
  const typename S::T* yr = y + j * D;
  typename S::T* out = grad_y + j * D;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] = S::store(acc[d] + bsum * S::load(yr[d]));
}

// One instantiation per ISA; the OpenMP loops stay in the dispatcher so the outlined
// parallel regions need no target attribute.
template <class S>
SSLFAST_AVX2 void forward_row_avx2(const Args<S>& a, const float* ysq, int64_t i, float* xf, float* loss, float* stats,
                                   bool* correct) {
  forward_row<S>(a, ysq, i, xf, loss, stats, correct);
}
template <class S>
void forward_row_base(const Args<S>& a, const float* ysq, int64_t i, float* xf, float* loss, float* stats,
                      bool* correct) {
  forward_row<S>(a, ysq, i, xf, loss, stats, correct);
}
template <class S>
SSLFAST_AVX2 void backward_row_avx2(const Args<S>& a, const float* ysq, int64_t i, const float* grad_rows,
                                    const float* stats, float* xf, float* gx, typename S::T* grad_x, float* alpha,
                                    float* beta) {
  backward_row<S>(a, ysq, i, grad_rows, stats, xf, gx, grad_x, alpha, beta);
}
template <class S>
void backward_row_base(const Args<S>& a, const float* ysq, int64_t i, const float* grad_rows, const float* stats,
                       float* xf, float* gx, typename S::T* grad_x, float* alpha, float* beta) {
  backward_row<S>(a, ysq, i, grad_rows, stats, xf, gx, grad_x, alpha, beta);
}
template <class S>
SSLFAST_AVX2 void segment_row_avx2(const typename S::T* x, const typename S::T* y, const float* alpha,
                                   const float* beta, const int64_t* order, const int64_t* offsets, int64_t j,
                                   int64_t D, int64_t K1, float* acc, typename S::T* grad_y) {
  segment_row<S>(x, y, alpha, beta, order, offsets, j, D, K1, acc, grad_y);
}
template <class S>
void segment_row_base(const typename S::T* x, const typename S::T* y, const float* alpha, const float* beta,
                      const int64_t* order, const int64_t* offsets, int64_t j, int64_t D, int64_t K1, float* acc,
                      typename S::T* grad_y) {
  segment_row<S>(x, y, alpha, beta, order, offsets, j, D, K1, acc, grad_y);
}
template <class S>
SSLFAST_AVX2 float sq_norm_avx2(const typename S::T* r, int64_t D) {
  return sq_row<S>(r, D);
}
template <class S>
float sq_norm_base(const typename S::T* r, int64_t D) {
  return sq_row<S>(r, D);
}

bool use_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

template <class S>
void y_sq_norms(const Args<S>& a, float* ysq) {
  const bool v = use_avx2();
#pragma omp parallel for schedule(static) if (parallel::use_threads(a.M * a.D, parallel::kMinContrastiveMacs))
  for (int64_t j = 0; j < a.M; ++j)
    ysq[j] = v ? sq_norm_avx2<S>(a.y + j * a.D, a.D) : sq_norm_base<S>(a.y + j * a.D, a.D);
}

template <class S>
void forward_impl(const Args<S>& a, float* ysq, float* loss, float* stats, bool* correct) {
  y_sq_norms<S>(a, ysq);
  const bool v = use_avx2();
#pragma omp parallel if (parallel::use_threads(a.N * (a.K + 1) * a.D, parallel::kMinContrastiveMacs))
  {
    std::vector<float> xf(static_cast<size_t>(a.D));
    // Dynamic chunks: on a shared machine a descheduled thread's rows get taken by the others
    // instead of stalling the barrier.
#pragma omp for schedule(dynamic, 16)
    for (int64_t i = 0; i < a.N; ++i) {
      if (v)
        forward_row_avx2<S>(a, ysq, i, xf.data(), loss, stats, correct);
      else
        forward_row_base<S>(a, ysq, i, xf.data(), loss, stats, correct);
    }
  }
}

template <class S>
void backward_rows_impl(const Args<S>& a, float* ysq, const float* grad_rows, const float* stats,
                        typename S::T* grad_x, float* alpha, float* beta) {
  y_sq_norms<S>(a, ysq);
  const bool v = use_avx2();
#pragma omp parallel if (parallel::use_threads(a.N * (a.K + 1) * a.D, parallel::kMinContrastiveMacs))
  {
    std::vector<float> xf(static_cast<size_t>(a.D)), gx(static_cast<size_t>(a.D));
#pragma omp for schedule(dynamic, 16)
    for (int64_t i = 0; i < a.N; ++i) {
      if (v)
        backward_row_avx2<S>(a, ysq, i, grad_rows, stats, xf.data(), gx.data(), grad_x, alpha, beta);
      else
        backward_row_base<S>(a, ysq, i, grad_rows, stats, xf.data(), gx.data(), grad_x, alpha, beta);
    }
  }
}

template <class S>
void segments_impl(const typename S::T* x, const typename S::T* y, const float* alpha, const float* beta,
                   const int64_t* order, const int64_t* offsets, int64_t M, int64_t D, int64_t K1,
                   typename S::T* grad_y) {
  const bool v = use_avx2();
#pragma omp parallel if (parallel::use_threads(M * K1 * D, parallel::kMinContrastiveMacs))
  {
    std::vector<float> acc(static_cast<size_t>(D));
    // Targets differ in how many candidates point at them: balance dynamically.
#pragma omp for schedule(dynamic, 32)
    for (int64_t j = 0; j < M; ++j) {
      if (v)
        segment_row_avx2<S>(x, y, alpha, beta, order, offsets, j, D, K1, acc.data(), grad_y);
      else
        segment_row_base<S>(x, y, alpha, beta, order, offsets, j, D, K1, acc.data(), grad_y);
    }
  }
}

void forward_cpu(std::uintptr_t x, std::uintptr_t y, std::uintptr_t neg, int neg_itype, std::uintptr_t pos,
                 int pos_itype, std::uintptr_t ysq, std::uintptr_t loss, std::uintptr_t stats, std::uintptr_t correct,
                 int64_t N, int64_t M, int64_t D, int64_t K, int dtype, double temperature, int neg_mode,
                 int precision) {
  py::gil_scoped_release nogil;
  by_dtype(dtype, [&](auto s) {
    using S = decltype(s);
    const Args<S> a = make_args<S>(x, y, neg, neg_itype, pos, pos_itype, N, M, D, K, temperature, neg_mode, precision);
    forward_impl<S>(a, as_ptr<float>(ysq), as_ptr<float>(loss), as_ptr<float>(stats), as_ptr<bool>(correct));
  });
}

void backward_rows_cpu(std::uintptr_t grad_rows, std::uintptr_t x, std::uintptr_t y, std::uintptr_t neg,
                       int neg_itype, std::uintptr_t pos, int pos_itype, std::uintptr_t stats, std::uintptr_t ysq,
                       std::uintptr_t grad_x, std::uintptr_t alpha, std::uintptr_t beta, int64_t N, int64_t M,
                       int64_t D, int64_t K, int dtype, double temperature, int neg_mode, int precision) {
  py::gil_scoped_release nogil;
  by_dtype(dtype, [&](auto s) {
    using S = decltype(s);
    const Args<S> a = make_args<S>(x, y, neg, neg_itype, pos, pos_itype, N, M, D, K, temperature, neg_mode, precision);
    backward_rows_impl<S>(a, as_ptr<float>(ysq), as_ptr<const float>(grad_rows), as_ptr<const float>(stats),
                          as_ptr<typename S::T>(grad_x), as_ptr<float>(alpha), as_ptr<float>(beta));
  });
}

void backward_segments_cpu(std::uintptr_t x, std::uintptr_t y, std::uintptr_t alpha, std::uintptr_t beta,
                           std::uintptr_t order, std::uintptr_t offsets, std::uintptr_t grad_y, int64_t M, int64_t D,
                           int64_t K, int dtype) {
  py::gil_scoped_release nogil;
  by_dtype(dtype, [&](auto s) {
    using S = decltype(s);
    using T = typename S::T;
    segments_impl<S>(as_ptr<const T>(x), as_ptr<const T>(y), as_ptr<const float>(alpha), as_ptr<const float>(beta),
                     as_ptr<const int64_t>(order), as_ptr<const int64_t>(offsets), M, D, K + 1, as_ptr<T>(grad_y));
  });
}

// CSR of the candidates by target row: a stable counting sort, O(N*(K+1) + M). (torch's
// stable argsort on the CPU is two orders of magnitude slower at these sizes.)
void build_csr_cpu(std::uintptr_t neg, int neg_itype, std::uintptr_t pos, int pos_itype, std::uintptr_t order_ptr,
                   std::uintptr_t offsets_ptr, int64_t N, int64_t M, int64_t K) {
  py::gil_scoped_release nogil;
  const void* negp = as_ptr<const void>(neg);
  const void* posp = pos ? as_ptr<const void>(pos) : nullptr;
  int64_t* order = as_ptr<int64_t>(order_ptr);
  int64_t* offsets = as_ptr<int64_t>(offsets_ptr);
  const int64_t K1 = K + 1;
  for (int64_t j = 0; j <= M; ++j) offsets[j] = 0;
  for (int64_t i = 0; i < N; ++i)
    for (int64_t k = 0; k < K1; ++k) ++offsets[candidate_index(negp, neg_itype, posp, pos_itype, i, k, K, M) + 1];
  for (int64_t j = 0; j < M; ++j) offsets[j + 1] += offsets[j];
  std::vector<int64_t> fill(offsets, offsets + M);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t k = 0; k < K1; ++k)
      order[fill[candidate_index(negp, neg_itype, posp, pos_itype, i, k, K, M)]++] = i * K1 + k;
}

// Test hooks: the storage conversions the kernels use, against torch's casts.
void round_to_dtype_cpu(std::uintptr_t in, std::uintptr_t out, int64_t n, int dtype) {
  const float* src = as_ptr<const float>(in);
  float* dst = as_ptr<float>(out);
  by_dtype(dtype, [&](auto s) {
    using S = decltype(s);
    for (int64_t i = 0; i < n; ++i) dst[i] = S::round(src[i]);
  });
}

}  // namespace
}  // namespace contrastive

void bind_contrastive(py::module_& m) {
  using namespace contrastive;
  m.def("contrastive_forward", &forward_cpu, py::arg("x"), py::arg("y"), py::arg("neg"), py::arg("neg_itype"),
        py::arg("pos"), py::arg("pos_itype"), py::arg("ysq"), py::arg("loss"), py::arg("stats"), py::arg("correct"),
        py::arg("N"), py::arg("M"), py::arg("D"), py::arg("K"), py::arg("dtype"), py::arg("temperature"),
        py::arg("neg_mode"), py::arg("precision"));
  m.def("contrastive_backward_rows", &backward_rows_cpu, py::arg("grad_rows"), py::arg("x"), py::arg("y"),
        py::arg("neg"), py::arg("neg_itype"), py::arg("pos"), py::arg("pos_itype"), py::arg("stats"), py::arg("ysq"),
        py::arg("grad_x"), py::arg("alpha"), py::arg("beta"), py::arg("N"), py::arg("M"), py::arg("D"), py::arg("K"),
        py::arg("dtype"), py::arg("temperature"), py::arg("neg_mode"), py::arg("precision"));
  m.def("contrastive_backward_segments", &backward_segments_cpu, py::arg("x"), py::arg("y"), py::arg("alpha"),
        py::arg("beta"), py::arg("order"), py::arg("offsets"), py::arg("grad_y"), py::arg("M"), py::arg("D"),
        py::arg("K"), py::arg("dtype"));
  m.def("contrastive_build_csr", &build_csr_cpu, py::arg("neg"), py::arg("neg_itype"), py::arg("pos"),
        py::arg("pos_itype"), py::arg("order"), py::arg("offsets"), py::arg("N"), py::arg("M"), py::arg("K"));
  m.def("contrastive_round_to_dtype", &round_to_dtype_cpu, py::arg("input"), py::arg("out"), py::arg("n"),
        py::arg("dtype"));
}

}  // namespace sslfast
