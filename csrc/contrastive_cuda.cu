// CUDA kernels of the wav2vec 2.0 contrastive loss (math in csrc/contrastive.h, spec in
// sslfast/reference/contrastive.py). One warp per prediction row; lanes stride over D so each
// gathered row of y is read with coalesced loads; warp sums by xor-butterfly leave every lane
// with the same bits, so all lanes agree on every logit without a broadcast.
//
// Forward: online log-sum-exp over the K+1 candidates; writes loss, lse's two parts
// (RowStats), correct per row.
// Backward rows: recompute each logit, write its alpha (and beta when deterministic) and, by
// default, atomically add alpha*x + beta*t into an fp32 grad y (fast; the order of the adds, and
// so the last bits, vary between runs); then grad x per lane-owned column from the alphas.
// Backward segments (deterministic=True): one warp per target row sums its CSR segment.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include "contrastive.h"
#include "sslfast/bind.h"
#include "sslfast/cuda_check.h"
#include "sslfast/launch_cuda.h"

namespace py = pybind11;

namespace sslfast {
namespace contrastive {
namespace {

constexpr int kWarpsPerBlock = contrastive_launch::kWarpsPerBlock;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m /= 2) v += __shfl_xor_sync(kFull, v, m);
  return v;
}

// Dot with x and squared norm of one gathered row (identical bits for identical rows, which
// the vector comparison below relies on).
template <class S>
__device__ __forceinline__ void dot_sq(const typename S::T* xr, const typename S::T* t, int64_t D, int lane,
                                       float& dot, float& sq) {
  float a, b;
  lane_dot_sq<S>(xr, t, D, lane, a, b);
  dot = warp_sum(a);
  sq = warp_sum(b);
}

template <class S>
__device__ __forceinline__ bool rows_equal(const typename S::T* a, const typename S::T* b, int64_t D, int lane) {
  return !__any_sync(kFull, lane_rows_differ<S>(a, b, D, lane));
}

// Full comparison only when norm and dot already agree (exact filter, as on the CPU).
template <class S>
__device__ __forceinline__ bool candidate_masked(const Args<S>& a, int64_t j, int64_t jp, float dot, float sq,
                                                 float dot0, float sq0, int lane) {
  if (a.neg_mode == kNegIndex) return j == jp;
  if (a.neg_mode == kNegVector) {
    const bool maybe = sq == sq0 && dot == dot0;  // warp-uniform
    return maybe && rows_equal<S>(a.y + j * a.D, a.y + jp * a.D, a.D, lane);
  }
  return false;
}

template <class S>
__device__ __forceinline__ float x_sq_norm(const typename S::T* xr, int64_t D, int lane) {
  return warp_sum(lane_sq<S>(xr, D, lane));
}

template <class S>
__global__ void forward_kernel(Args<S> a, float* __restrict__ loss, float* __restrict__ stats,
                               bool* __restrict__ correct) {
  const int lane = threadIdx.x % kWarp;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (i >= a.N) return;  // whole warps exit together
  const int64_t D = a.D;
  const typename S::T* xr = a.x + i * D;
  const float nx = clamped_norm(x_sq_norm<S>(xr, D, lane));
  const int64_t jp = candidate_index(a.neg, a.neg_itype, a.pos, a.pos_itype, i, 0, a.K, a.M);
  RowState st = row_init();
  float dot0 = 0.0f, sq0 = 0.0f;
  for (int64_t k = 0; k <= a.K; ++k) {
    const int64_t j = k == 0 ? jp : candidate_index(a.neg, a.neg_itype, a.pos, a.pos_itype, i, k, a.K, a.M);
    float dot, sq;
    dot_sq<S>(xr, a.y + j * D, D, lane, dot, sq);
    if (k == 0) {
      dot0 = dot;
      sq0 = sq;
    }
    push_candidate(a, st, k, k != 0 && candidate_masked(a, j, jp, dot, sq, dot0, sq0, lane), dot, sq, nx);
  }
  if (lane == 0) {
    loss[i] = row_loss(st);
    save_row_stats(st, stats, i, a.N);
    correct[i] = row_correct(st);
  }
}

template <class S>
__global__ void backward_rows_kernel(Args<S> a, const float* __restrict__ grad_rows, const float* __restrict__ stats,
                                     typename S::T* __restrict__ grad_x, float* __restrict__ alpha,
                                     float* __restrict__ beta, float* __restrict__ gy_acc) {
  const int lane = threadIdx.x % kWarp;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (i >= a.N) return;
  const int64_t D = a.D, K1 = a.K + 1;
  const typename S::T* xr = a.x + i * D;
  const float nx_sq = x_sq_norm<S>(xr, D, lane);
  const float nx = clamped_norm(nx_sq);
  const int64_t jp = candidate_index(a.neg, a.neg_itype, a.pos, a.pos_itype, i, 0, a.K, a.M);
  const float go = grad_rows[i];
  const RowStats rs = load_row_stats(stats, i, a.N);
  float sum_gc = 0.0f, dot0 = 0.0f, sq0 = 0.0f;
  for (int64_t k = 0; k < K1; ++k) {
    const int64_t j = k == 0 ? jp : candidate_index(a.neg, a.neg_itype, a.pos, a.pos_itype, i, k, a.K, a.M);
    const typename S::T* t = a.y + j * D;
    float dot, sq;
    dot_sq<S>(xr, t, D, lane, dot, sq);
    if (k == 0) {
      dot0 = dot;
      sq0 = sq;
    }
    float al, be;
    candidate_coeffs(a, k, k != 0 && candidate_masked(a, j, jp, dot, sq, dot0, sq0, lane), dot, sq, nx, rs, go,
                     al, be, sum_gc);
    if (lane == 0) {
      alpha[i * K1 + k] = al;
      if (beta) beta[i * K1 + k] = be;
    }
    if (gy_acc && (al != 0.0f || be != 0.0f)) {
      float* g = gy_acc + j * D;
      for (int64_t d = lane; d < D; d += kWarp) atomicAdd(g + d, al * S::load(xr[d]) + be * S::load(t[d]));
    }
  }
  __syncwarp();  // lane 0's alphas are read by every lane below
  lane_grad_x(a, i, alpha, x_self_coefficient(sum_gc, nx_sq), lane, grad_x);
}

template <class S>
__global__ void segments_kernel(const typename S::T* __restrict__ x, const typename S::T* __restrict__ y,
                                const float* __restrict__ alpha, const float* __restrict__ beta,
                                const int64_t* __restrict__ order, const int64_t* __restrict__ offsets, int64_t M,
                                int64_t D, int64_t K1, typename S::T* __restrict__ grad_y) {
  const int lane = threadIdx.x % kWarp;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (j >= M) return;
  const int64_t start = offsets[j], end = offsets[j + 1];
  lane_segment_grad<S>(x, y, alpha, order, start, end, j, D, K1, segment_beta_sum(beta, order, start, end), lane,
                       grad_y);
}

void forward_cuda(std::uintptr_t x, std::uintptr_t y, std::uintptr_t neg, int neg_itype, std::uintptr_t pos,
                  int pos_itype, std::uintptr_t loss, std::uintptr_t stats, std::uintptr_t correct, int64_t N, int64_t M,
                  int64_t D, int64_t K, int dtype, double temperature, int neg_mode, int precision,
                  std::uintptr_t stream) {
  if (N == 0) return;
  by_dtype(dtype, [&](auto s) {
    using S = decltype(s);
    const Args<S> a = make_args<S>(x, y, neg, neg_itype, pos, pos_itype, N, M, D, K, temperature, neg_mode, precision);
    const Launch l = contrastive_launch::forward(N);
    forward_kernel<S><<<grid_of(l), l.threads, l.dyn_smem, reinterpret_cast<cudaStream_t>(stream)>>>(
        a, as_ptr<float>(loss), as_ptr<float>(stats), as_ptr<bool>(correct));
  });
  SSLFAST_CUDA_CHECK(cudaGetLastError());
}

void backward_rows_cuda(std::uintptr_t grad_rows, std::uintptr_t x, std::uintptr_t y, std::uintptr_t neg,
                        int neg_itype, std::uintptr_t pos, int pos_itype, std::uintptr_t stats, std::uintptr_t grad_x,
                        std::uintptr_t alpha, std::uintptr_t beta, std::uintptr_t gy_acc, int64_t N, int64_t M,
                        int64_t D, int64_t K, int dtype, double temperature, int neg_mode, int precision,
                        std::uintptr_t stream) {
  if (N == 0) return;
  by_dtype(dtype, [&](auto s) {
    using S = decltype(s);
    const Args<S> a = make_args<S>(x, y, neg, neg_itype, pos, pos_itype, N, M, D, K, temperature, neg_mode, precision);
    const Launch l = contrastive_launch::backward_rows(N);
    backward_rows_kernel<S><<<grid_of(l), l.threads, l.dyn_smem, reinterpret_cast<cudaStream_t>(stream)>>>(
        a, as_ptr<const float>(grad_rows), as_ptr<const float>(stats), as_ptr<typename S::T>(grad_x),
        as_ptr<float>(alpha), beta ? as_ptr<float>(beta) : nullptr, gy_acc ? as_ptr<float>(gy_acc) : nullptr);
  });
  SSLFAST_CUDA_CHECK(cudaGetLastError());
}

void backward_segments_cuda(std::uintptr_t x, std::uintptr_t y, std::uintptr_t alpha, std::uintptr_t beta,
                            std::uintptr_t order, std::uintptr_t offsets, std::uintptr_t grad_y, int64_t M, int64_t D,
                            int64_t K, int dtype, std::uintptr_t stream) {
  if (M == 0) return;
  by_dtype(dtype, [&](auto s) {
    using S = decltype(s);
    using T = typename S::T;
    const Launch l = contrastive_launch::segments(M);
    segments_kernel<S><<<grid_of(l), l.threads, l.dyn_smem, reinterpret_cast<cudaStream_t>(stream)>>>(
        as_ptr<const T>(x), as_ptr<const T>(y), as_ptr<const float>(alpha), as_ptr<const float>(beta),
        as_ptr<const int64_t>(order), as_ptr<const int64_t>(offsets), M, D, K + 1, as_ptr<T>(grad_y));
  });
  SSLFAST_CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace contrastive

void bind_contrastive(py::module_& m) {
  using namespace contrastive;
  m.def("contrastive_forward", &forward_cuda, py::arg("x"), py::arg("y"), py::arg("neg"), py::arg("neg_itype"),
        py::arg("pos"), py::arg("pos_itype"), py::arg("loss"), py::arg("stats"), py::arg("correct"), py::arg("N"),
        py::arg("M"), py::arg("D"), py::arg("K"), py::arg("dtype"), py::arg("temperature"), py::arg("neg_mode"),
        py::arg("precision"), py::arg("cuda_stream"));
  m.def("contrastive_backward_rows", &backward_rows_cuda, py::arg("grad_rows"), py::arg("x"), py::arg("y"),
        py::arg("neg"), py::arg("neg_itype"), py::arg("pos"), py::arg("pos_itype"), py::arg("stats"),
        py::arg("grad_x"), py::arg("alpha"), py::arg("beta"), py::arg("gy_acc"), py::arg("N"), py::arg("M"),
        py::arg("D"), py::arg("K"), py::arg("dtype"), py::arg("temperature"), py::arg("neg_mode"),
        py::arg("precision"), py::arg("cuda_stream"));
  m.def("contrastive_backward_segments", &backward_segments_cuda, py::arg("x"), py::arg("y"), py::arg("alpha"),
        py::arg("beta"), py::arg("order"), py::arg("offsets"), py::arg("grad_y"), py::arg("M"), py::arg("D"),
        py::arg("K"), py::arg("dtype"), py::arg("cuda_stream"));
}

}  // namespace sslfast
