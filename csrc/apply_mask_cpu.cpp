// CPU kernels of apply_mask: OpenMP over frames, one pass over x; the per-block math is
// csrc/apply_mask.h, shared with CUDA.
//   forward:  masked frames get the embedding or noise (drawn only there); unmasked frames
//             are copied to out (skipped when out is x: in place).
//   backward: grad_x = grad at unmasked frames, 0 at masked ones; grad_fill = the sum of
//             grad over masked frames, in fp32, as per-chunk partials summed in chunk order
//             (deterministic, whatever the thread count).
#include <pybind11/pybind11.h>

#include <cstring>
#include <stdexcept>
#include <vector>

#include "apply_mask.h"
#include "sslfast/bind.h"
#include "sslfast/philox_cpu.h"
#include "sslfast/parallel.h"

namespace py = pybind11;

namespace sslfast {
namespace {

using apply_mask::Strides;

template <class S>
void forward_cpu(const typename S::T* x, Strides sx, typename S::T* out, Strides so, const uint8_t* mask,
                 const typename S::T* fill, int64_t B, int64_t T, int64_t D, float std, uint64_t seed, bool inplace) {
  using E = typename S::T;
  const int64_t n = B * T, qb = (D + 3) / 4;
#pragma omp parallel if (parallel::use_threads(n * D, parallel::kMinApplyMaskElements))
  {
    std::vector<uint32_t> words(fill == nullptr ? 4 * qb : 0);
#pragma omp for schedule(static, 16)
    for (int64_t f = 0; f < n; ++f) {
      const int64_t b = f / T, t = f % T;
      E* o = out + b * so.b + t * so.t;
      if (mask[f] && fill == nullptr) {  // the frame's Philox blocks in one bulk call
        philox_range(static_cast<uint32_t>(t * qb), qb, static_cast<uint32_t>(b), apply_mask::kStreamMaskNoise, seed,
                     words.data());
        for (int64_t q = 0; q < qb; ++q) apply_mask::noise_block_store<S>(o, so.d, D, q, words.data() + 4 * q, std);
      } else if (mask[f] && so.d == 1) {  // the embedding into a contiguous row: one copy
        std::memcpy(o, fill, static_cast<size_t>(D) * sizeof(E));
      } else if (mask[f]) {
        for (int64_t q = 0; q < qb; ++q) apply_mask::fill_block<S>(o, so.d, D, q, fill, std, seed, b, t);
      } else if (!inplace) {
        const E* xi = x + b * sx.b + t * sx.t;
        if (sx.d == 1 && so.d == 1) {
          std::memcpy(o, xi, static_cast<size_t>(D) * sizeof(E));
        } else {
          for (int64_t d = 0; d < D; ++d) o[d * so.d] = xi[d * sx.d];
        }
      }
    }
  }
}

template <class S>
void backward_cpu(const typename S::T* g, Strides sg, typename S::T* gx, const uint8_t* mask, int64_t B, int64_t T,
                  int64_t D, float* partial, float* gfill) {
  using E = typename S::T;
  const int64_t n = B * T, chunks = (n + apply_mask::kGradChunk - 1) / apply_mask::kGradChunk;
#pragma omp parallel for schedule(static) if (parallel::use_threads(n * D, parallel::kMinApplyMaskElements))
  for (int64_t c = 0; c < chunks; ++c) {
    float* acc = partial ? partial + c * D : nullptr;
    if (acc) std::memset(acc, 0, static_cast<size_t>(D) * sizeof(float));
    const int64_t f_end = (c + 1) * apply_mask::kGradChunk < n ? (c + 1) * apply_mask::kGradChunk : n;
    for (int64_t f = c * apply_mask::kGradChunk; f < f_end; ++f) {
      const int64_t b = f / T, t = f % T;
      const E* gi = g + b * sg.b + t * sg.t;
      E* go = gx ? gx + f * D : nullptr;  // grad_x is contiguous
      if (mask[f]) {
        if (acc)
          for (int64_t d = 0; d < D; ++d) acc[d] += S::load(gi[d * sg.d]);
        if (go) std::memset(go, 0, static_cast<size_t>(D) * sizeof(E));  // +0.0 in every format
      } else if (go) {
        if (sg.d == 1) {
          std::memcpy(go, gi, static_cast<size_t>(D) * sizeof(E));
        } else {
          for (int64_t d = 0; d < D; ++d) go[d] = gi[d * sg.d];
        }
      }
    }
  }
  if (!gfill) return;
#pragma omp parallel for schedule(static) if (parallel::use_threads(chunks * D, parallel::kMinApplyMaskElements))
  for (int64_t d = 0; d < D; ++d) {
    float s = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) s += partial[c * D + d];
    gfill[d] = s;
  }
}

template <template <class> class F, class... A>
void by_dtype(int dtype, A... args) {
  switch (dtype) {
    case static_cast<int>(DType::f32): return F<F32>::run(args...);
    case static_cast<int>(DType::f16): return F<F16>::run(args...);
    case static_cast<int>(DType::bf16): return F<BF16>::run(args...);
    default: throw std::invalid_argument("apply_mask: dtype code must be 0 (f32), 1 (f16) or 2 (bf16)");
  }
}

template <class S>
struct Forward {
  static void run(std::uintptr_t x, Strides sx, std::uintptr_t out, Strides so, std::uintptr_t mask,
                  std::uintptr_t fill, int64_t B, int64_t T, int64_t D, float std, uint64_t seed, bool inplace) {
    using E = typename S::T;
    forward_cpu<S>(as_ptr<const E>(x), sx, as_ptr<E>(out), so, as_ptr<const uint8_t>(mask), as_ptr<const E>(fill), B,
                   T, D, std, seed, inplace);
  }
};

template <class S>
struct Backward {
  static void run(std::uintptr_t g, Strides sg, std::uintptr_t gx, std::uintptr_t mask, int64_t B, int64_t T,
                  int64_t D, std::uintptr_t partial, std::uintptr_t gfill) {
    using E = typename S::T;
    backward_cpu<S>(as_ptr<const E>(g), sg, as_ptr<E>(gx), as_ptr<const uint8_t>(mask), B, T, D,
                    as_ptr<float>(partial), as_ptr<float>(gfill));
  }
};

void apply_mask_forward(std::uintptr_t x, int64_t sxb, int64_t sxt, int64_t sxd, std::uintptr_t out, int64_t sob,
                        int64_t sot, int64_t sod, std::uintptr_t mask, std::uintptr_t fill, int dtype, int64_t B,
                        int64_t T, int64_t D, float std, uint64_t seed) {
  if (B == 0 || T == 0 || D == 0) return;
  by_dtype<Forward>(dtype, x, Strides{sxb, sxt, sxd}, out, Strides{sob, sot, sod}, mask, fill, B, T, D, std, seed,
                    x == out);
}

void apply_mask_backward(std::uintptr_t g, int64_t sgb, int64_t sgt, int64_t sgd, std::uintptr_t gx,
                         std::uintptr_t mask, int dtype, int64_t B, int64_t T, int64_t D, std::uintptr_t partial,
                         std::uintptr_t gfill) {
  if (B == 0 || T == 0 || D == 0) return;
  by_dtype<Backward>(dtype, g, Strides{sgb, sgt, sgd}, gx, mask, B, T, D, partial, gfill);
}

}  // namespace

void bind_apply_mask(py::module_& m) {
  m.attr("apply_mask_grad_chunk") = apply_mask::kGradChunk;
  m.def("apply_mask_forward", &apply_mask_forward, py::arg("x"), py::arg("sxb"), py::arg("sxt"), py::arg("sxd"),
        py::arg("out"), py::arg("sob"), py::arg("sot"), py::arg("sod"), py::arg("mask"), py::arg("fill"),
        py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("D"), py::arg("std"), py::arg("seed"),
        py::call_guard<py::gil_scoped_release>(),
        "Fill the masked frames: out = x with masked frames set to fill (x's dtype; 0 = noise of std). out == x "
        "writes in place.");
  m.def("apply_mask_backward", &apply_mask_backward, py::arg("grad"), py::arg("sgb"), py::arg("sgt"), py::arg("sgd"),
        py::arg("grad_x"), py::arg("mask"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("D"),
        py::arg("partial"), py::arg("grad_fill"), py::call_guard<py::gil_scoped_release>(),
        "grad_x (contiguous, 0 to skip) and grad_fill (fp32 (D,), 0 to skip; partial: fp32 "
        "(ceil(B*T / apply_mask_grad_chunk), D) scratch).");
}

}  // namespace sslfast
