// C++ CPU kernels of the Gumbel-softmax vector quantizer (sslfast.gumbel_vector_quantize).
//
// Forward: OpenMP over fixed blocks of frames; per row (n, g) one pass loads the logits,
// draws the Gumbel noise, takes both argmaxes and gathers the codebook row; the soft and
// hard marginals are summed per frame block and the blocks are added in block order, so
// the result does not depend on the thread count. Backward: per row the straight-through
// gradient through softmax((l + g) / tau) (noise redrawn from the seed, nothing stored) plus
// the prob-perplexity term; the codebook gradient is a per-codeword sum over the frames that
// chose it, in frame order (a counting sort of the codes), never the (N, G*V, d) product.
//
// Soft quantization (hard=False, training): the forward keeps a tile of kGradTile frames'
// probabilities softmax((l + g) / tau) and makes q = soft @ C_g with one pass over the codebook
// per tile; the backward's logits gradient is the hard path's (the straight-through gradient
// is the soft one), and the codebook gradient soft^T grad_q is summed per fixed chunk of
// frames (gq::soft_chunk_rows) and the chunk partials added in chunk order (deterministic).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "gumbel_quantize.h"
#include "sslfast/bind.h"
#include "sslfast/cpu_isa.h"
#include "sslfast/parallel.h"

namespace py = pybind11;

namespace sslfast {
namespace {

constexpr int64_t kFrameBlock = 64;
constexpr int64_t kGradTile = 8;  // frames sharing one pass over the codebook (backward, soft forward)

// Natural log of a positive normal float, branch-free so the row loops below vectorize
// (glibc's logf is a call per element). Relative error below 1e-7 (Cephes' logf polynomial).
inline float fast_log(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  int32_t e = static_cast<int32_t>(bits >> 23) - 126;
  const uint32_t mbits = (bits & 0x7fffffu) | 0x3f000000u;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &mbits, 4);
  const bool small = m < 0.70710678f;
  e = small ? e - 1 : e;
  const float f = small ? m + m - 1.0f : m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292E-2f;
  y = y * f - 1.1514610310E-1f;
  y = y * f + 1.1676998740E-1f;
  y = y * f - 1.2420140846E-1f;
  y = y * f + 1.4249322787E-1f;
  y = y * f - 1.6668057665E-1f;
  y = y * f + 2.0000714765E-1f;
  y = y * f - 2.4999993993E-1f;
  y = y * f + 3.3333331174E-1f;
  y = y * f * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe - 0.5f * z;
  return f + y + 0.693359375f * fe;
}

// exp of a float, branch-free so the row loops vectorize (Cephes' expf polynomial, relative
// error below 2e-7); 0 below -87.3 (where expf goes subnormal), as the softmaxes need.
inline float fast_exp(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.7f);
  const float t = xc * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(t + (t >= 0.0f ? 0.5f : -0.5f));
  const float fn = static_cast<float>(n);
  float r = xc - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500E-4f;
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * z + r + 1.0f;
  const uint32_t sbits = static_cast<uint32_t>(n + 127) << 23;
  float scale;
  std::memcpy(&scale, &sbits, 4);
  return x < -87.3f ? 0.0f : y * scale;
}

// Noise of positions [begin, begin + count) of logits row n with fast_log: within 1e-6 of
// the exact noise (gq::gumbel_from_word, fp64 logs) and several times cheaper on a CPU. The
// forward takes codes from the exact noise of the few candidates this bound leaves; the
// backward's softmax uses these values directly (a 1e-6 change of a softmax input).
void gumbel_row_fast(uint64_t seed, int64_t n, int64_t begin, int64_t count, float* out) {
  int64_t quad = -1;
  Philox4 r{};
  for (int64_t i = 0; i < count; ++i) {
    const int64_t pos = begin + i;
    if ((pos >> 2) != quad) {
      quad = pos >> 2;
      r = philox4x32_10(static_cast<uint32_t>(quad), static_cast<uint32_t>(n), gq::kStreamGumbel, 0u, seed);
    }
    out[i] = uint_to_open_uniform(r.w[pos & 3], gq::kULo);
  }
  for (int64_t i = 0; i < count; ++i) out[i] = -fast_log(out[i]);
  for (int64_t i = 0; i < count; ++i) out[i] = -fast_log(out[i]);
}

// The tile products (the backward's a = C_g grad_q and the soft output soft @ C_g, both
// tile_matmul, and the soft codebook-gradient partial soft^T grad_q) are y[k] += a * x[k] loops without a reduction
// across k, so a wider vector gives the same bits. Each is compiled for the baseline ISA and
// once more for AVX2 without FMA (no contraction: bit-identical, cpu_isa.h's rule) and chosen
// at run time by cpu_isa().
#define GQ_INLINE inline __attribute__((always_inline))

// c[f * N + j] = sum_k a[f * lda + k] m[k * N + j] for the nt frames of a tile, k ascending:
// the backward's a = grad_q C_g^T (a: grad_q, m: C_g^T) and the soft output soft @ C_g
// (a: soft probabilities, m: C_g, whose rows are read once per tile; the (N, G*V, d)
// product is never formed).
GQ_INLINE void tile_matmul_body(const float* __restrict a, int64_t lda, int64_t nt, const float* __restrict m,
                                int64_t K, int64_t N, float* __restrict c) {
  std::fill(c, c + nt * N, 0.0f);
  for (int64_t k = 0; k < K; ++k) {
    const float* row = m + k * N;
    for (int64_t f = 0; f < nt; ++f) {
      const float x = a[f * lda + k];
      float* cf = c + f * N;
      for (int64_t j = 0; j < N; ++j) cf[j] += x * row[j];
    }
  }
}

// part[v * D + k] += sum_f soft[f * V + v] gq[f * D + k]: each partial row once per tile.
GQ_INLINE void soft_partial_body(const float* __restrict soft, int64_t nt, const float* __restrict gq, int64_t V,
                                 int64_t D, float* __restrict part) {
  for (int64_t v = 0; v < V; ++v) {
    float* prow = part + v * D;
    for (int64_t f = 0; f < nt; ++f) {
      const float sf = soft[f * V + v];
      const float* gqf = gq + f * D;
      for (int64_t k = 0; k < D; ++k) prow[k] += sf * gqf[k];
    }
  }
}

#if SSLFAST_X86_SIMD
#define GQ_ISA_VARIANTS(name, params, args)                                        \
  void name##_base params { name##_body args; }                                    \
  __attribute__((target("avx2"))) void name##_avx2 params { name##_body args; }    \
  void name params {                                                               \
    if (cpu_isa() != Isa::scalar)                                                  \
      name##_avx2 args;                                                            \
    else                                                                           \
      name##_base args;                                                            \
  }
#else
#define GQ_ISA_VARIANTS(name, params, args) \
  void name params { name##_body args; }
#endif

GQ_ISA_VARIANTS(tile_matmul, (const float* a, int64_t lda, int64_t nt, const float* m, int64_t K, int64_t N, float* c),
                (a, lda, nt, m, K, N, c))
GQ_ISA_VARIANTS(soft_partial, (const float* soft, int64_t nt, const float* gq, int64_t V, int64_t D, float* part),
                (soft, nt, gq, V, D, part))

void forward_cpu(std::uintptr_t logits_p, int ldtype, std::uintptr_t codebook_p, int cdtype, std::uintptr_t cbf_p,
                 int64_t N, int64_t G, int64_t V, int64_t D, bool training, bool hard, double tau, uint64_t seed,
                 std::uintptr_t mask_p, std::uintptr_t quant_p, std::uintptr_t codes_p, std::uintptr_t prob_sum_p,
                 std::uintptr_t code_sum_p) {
  const void* logits = as_ptr<const void>(logits_p);
  const char* codebook = as_ptr<const char>(codebook_p);
  const float* cbf = as_ptr<const float>(cbf_p);  // (G*V, D) fp32, read by the soft path only
  const bool soft = training && !hard;
  const float tau_f = static_cast<float>(tau);
  const uint8_t* mask = as_ptr<const uint8_t>(mask_p);
  char* quant = as_ptr<char>(quant_p);
  int64_t* codes = as_ptr<int64_t>(codes_p);
  float* prob_sum = as_ptr<float>(prob_sum_p);
  float* code_sum = as_ptr<float>(code_sum_p);
  const int64_t GV = G * V;
  const int64_t esize = cdtype == 0 ? 4 : 2;
  const int64_t n_blocks = (N + kFrameBlock - 1) / kFrameBlock;
  std::vector<float> partial(static_cast<size_t>(n_blocks) * 2 * GV, 0.0f);

#pragma omp parallel if (parallel::use_threads(N * G * (V + D), parallel::kMinGumbelElements))
  {
    std::vector<float> l(V), noise(V);
    std::vector<float> soft_tile(soft ? static_cast<size_t>(kGradTile * G * V) : 0);
    std::vector<float> q_tile(soft ? static_cast<size_t>(kGradTile * D) : 0);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n_blocks; ++b) {
      float* pp = partial.data() + b * 2 * GV;
      float* cp = pp + GV;
      const int64_t n_end = std::min(N, (b + 1) * kFrameBlock);
      for (int64_t t0 = b * kFrameBlock; t0 < n_end; t0 += kGradTile) {
        const int64_t t_end = std::min(n_end, t0 + kGradTile);
        for (int64_t n = t0; n < t_end; ++n) {
          const bool sel = mask == nullptr || mask[n] != 0;
          for (int64_t g = 0; g < G; ++g) {
            const int64_t base = n * GV + g * V;
            gq::MaxArg ml{-INFINITY, V};
            for (int64_t v = 0; v < V; ++v) {
              l[v] = load_float(logits, base + v, ldtype);
              gq::maxarg_update(ml, l[v], v);
            }
            if (ml.i == V) ml.i = 0;  // all -inf or NaN: code 0, like an all-equal row
            int64_t code = ml.i;
            if (training) {
              gumbel_row_fast(seed, n, g * V, V, noise.data());
              float zmax = -INFINITY;
              for (int64_t v = 0; v < V; ++v) {
                noise[v] += l[v];
                zmax = std::max(zmax, noise[v]);
              }
              // candidates: every v whose approximate l + g can be the exact maximum (noise
              // error < 1e-6, plus the rounding of the sums); their exact values decide
              const float slack = 3e-5f + std::fabs(zmax) * 1e-6f;
              gq::MaxArg mz{-INFINITY, V};
              for (int64_t v = 0; v < V; ++v)
                if (noise[v] >= zmax - slack) gq::maxarg_update(mz, l[v] + gq::gumbel_at(seed, n, g * V + v), v);
              code = mz.i == V ? 0 : mz.i;
              if (soft) {
                // soft = softmax((l + g) / tau) on the fast noise, as the backward recomputes it
                float* s_row = soft_tile.data() + ((n - t0) * G + g) * V;
                float zs = 0.0f;
                for (int64_t v = 0; v < V; ++v) {
                  s_row[v] = fast_exp((noise[v] - zmax) / tau_f);
                  zs += s_row[v];
                }
                const float inv_zs = 1.0f / zs;
                for (int64_t v = 0; v < V; ++v) s_row[v] *= inv_zs;
              }
            }
            codes[n * G + g] = code;
            if (!soft)
              std::memcpy(quant + (n * G + g) * D * esize, codebook + (g * V + code) * D * esize,
                          static_cast<size_t>(D * esize));
            if (sel) {
              float z = 0.0f;
              for (int64_t v = 0; v < V; ++v) {
                l[v] = fast_exp(l[v] - ml.m);
                z += l[v];
              }
              const float inv_z = 1.0f / z;
              for (int64_t v = 0; v < V; ++v) pp[g * V + v] += l[v] * inv_z;
              cp[g * V + ml.i] += 1.0f;
            }
          }
        }
        if (soft) {
          const int64_t nt = t_end - t0;
          for (int64_t g = 0; g < G; ++g) {
            tile_matmul(soft_tile.data() + g * V, G * V, nt, cbf + g * V * D, V, D, q_tile.data());
            for (int64_t f = 0; f < nt; ++f)
              for (int64_t k = 0; k < D; ++k)
                store_float(quant, ((t0 + f) * G + g) * D + k, cdtype, q_tile[f * D + k]);
          }
        }
      }
    }
#pragma omp for schedule(static)
    for (int64_t j = 0; j < 2 * GV; ++j) {
      float acc = 0.0f;
      for (int64_t b = 0; b < n_blocks; ++b) acc += partial[b * 2 * GV + j];
      (j < GV ? prob_sum[j] : code_sum[j - GV]) = acc;
    }
  }
}

void backward_cpu(std::uintptr_t grad_q_p, int gdtype, std::uintptr_t logits_p, int ldtype, std::uintptr_t cbt_p,
                  std::uintptr_t codes_p, std::uintptr_t mask_p, std::uintptr_t w_p, int64_t N, int64_t G, int64_t V,
                  int64_t D, bool training, bool hard, double tau, uint64_t seed, std::uintptr_t grad_logits_p,
                  int cdtype, std::uintptr_t grad_cb_p) {
  const void* grad_q = as_ptr<const void>(grad_q_p);
  const void* logits = as_ptr<const void>(logits_p);
  const float* cbt = as_ptr<const float>(cbt_p);  // (G, D, V) fp32: the inner loop runs over v
  const int64_t* codes = as_ptr<const int64_t>(codes_p);
  const uint8_t* mask = as_ptr<const uint8_t>(mask_p);
  const float* w = as_ptr<const float>(w_p);
  void* grad_logits = as_ptr<void>(grad_logits_p);
  void* grad_cb = as_ptr<void>(grad_cb_p);
  const int64_t GV = G * V;
  const float tau_f = static_cast<float>(tau);
  const bool soft = training && !hard;
  const bool need_logit_grad = grad_logits != nullptr;
  const bool need_cb_grad = grad_cb != nullptr;
  const bool soft_cb = soft && need_cb_grad;

  // Hard: frames of each codeword in frame order (counting sort), so the codebook gradient
  // is a deterministic per-codeword sum that threads never share.
  std::vector<int64_t> start, order;
  if (need_cb_grad && !soft) {
    start.assign(static_cast<size_t>(GV + 1), 0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t g = 0; g < G; ++g) ++start[g * V + codes[n * G + g] + 1];
    for (int64_t j = 0; j < GV; ++j) start[j + 1] += start[j];
    order.resize(static_cast<size_t>(N * G));
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t g = 0; g < G; ++g) order[fill[g * V + codes[n * G + g]]++] = n;
  }
  // Soft: every frame adds soft[n, g, v] grad_q[n, g] to every codeword; each chunk of frames
  // (gq::soft_chunk_rows, fixed by N) sums into its own partial, added in chunk order below.
  const int64_t chunk_rows = soft_cb ? gq::soft_chunk_rows(N, kGradTile) : kGradTile;
  const int64_t n_chunks = (N + chunk_rows - 1) / chunk_rows;
  std::vector<float> partial(soft_cb ? static_cast<size_t>(n_chunks * GV * D) : 0, 0.0f);

#pragma omp parallel if (parallel::use_threads(N * G * (V + D), parallel::kMinGumbelElements))
  {
    std::vector<float> l(V), y(V), p(V), grad(V), acc(D), a_buf(kGradTile * V), gq_tile(kGradTile * D),
        s_tile(soft_cb ? static_cast<size_t>(kGradTile * V) : 0);
    if (need_logit_grad || soft_cb) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
        float* part = soft_cb ? partial.data() + chunk * GV * D : nullptr;
        const int64_t chunk_end = std::min(N, (chunk + 1) * chunk_rows);
        for (int64_t n0 = chunk * chunk_rows; n0 < chunk_end; n0 += kGradTile) {
          const int64_t nt = std::min<int64_t>(kGradTile, chunk_end - n0);
          for (int64_t g = 0; g < G; ++g) {
            if (training) {
              // a[f] = C_g grad_q[f] (d output / d soft) for the tile's frames at once, so
              // each codebook row is read once per tile, not per frame
              for (int64_t f = 0; f < nt; ++f)
                for (int64_t k = 0; k < D; ++k)
                  gq_tile[f * D + k] = load_float(grad_q, ((n0 + f) * G + g) * D + k, gdtype);
              tile_matmul(gq_tile.data(), D, nt, cbt + g * D * V, D, V, a_buf.data());
            }
            for (int64_t f = 0; f < nt; ++f) {
              const int64_t n = n0 + f;
              const bool sel = mask == nullptr || mask[n] != 0;
              const int64_t base = n * GV + g * V;
              for (int64_t v = 0; v < V; ++v) l[v] = load_float(logits, base + v, ldtype);
              std::fill(grad.begin(), grad.end(), 0.0f);
              if (training) {
                const float* a = a_buf.data() + f * V;
                gumbel_row_fast(seed, n, g * V, V, y.data());
                float ym = -INFINITY;
                for (int64_t v = 0; v < V; ++v) {
                  y[v] = l[v] + y[v];
                  ym = std::max(ym, y[v]);
                }
                float z = 0.0f;
                for (int64_t v = 0; v < V; ++v) {
                  y[v] = fast_exp((y[v] - ym) / tau_f);  // max first: finite for tiny tau
                  z += y[v];
                }
                const float inv_z = 1.0f / z;
                float sa = 0.0f;
                for (int64_t v = 0; v < V; ++v) {
                  y[v] *= inv_z;  // y now holds soft
                  sa += y[v] * a[v];
                }
                for (int64_t v = 0; v < V; ++v) grad[v] = gq::softmax_grad(y[v], a[v], sa, tau_f);
                if (soft_cb) std::copy(y.begin(), y.end(), s_tile.begin() + f * V);
              }
              if (sel && w != nullptr) {
                float m = -INFINITY;
                for (int64_t v = 0; v < V; ++v) m = std::max(m, l[v]);
                float z = 0.0f;
                for (int64_t v = 0; v < V; ++v) {
                  p[v] = fast_exp(l[v] - m);
                  z += p[v];
                }
                const float inv_z = 1.0f / z;
                const float* wg = w + g * V;
                float pw = 0.0f;
                for (int64_t v = 0; v < V; ++v) {
                  p[v] *= inv_z;
                  pw += p[v] * wg[v];
                }
                for (int64_t v = 0; v < V; ++v) grad[v] += gq::softmax_grad(p[v], wg[v], pw, 1.0f);
              }
              if (need_logit_grad)
                for (int64_t v = 0; v < V; ++v) store_float(grad_logits, base + v, ldtype, grad[v]);
            }
            if (soft_cb) {
              soft_partial(s_tile.data(), nt, gq_tile.data(), V, D, part + g * V * D);
            }
          }
        }
      }
    }
    if (soft_cb) {
#pragma omp for schedule(static)
      for (int64_t j = 0; j < GV * D; ++j) {
        float sum = 0.0f;
        for (int64_t c = 0; c < n_chunks; ++c) sum += partial[c * GV * D + j];
        store_float(grad_cb, j, cdtype, sum);
      }
    } else if (need_cb_grad) {
#pragma omp for schedule(static)
      for (int64_t j = 0; j < GV; ++j) {
        const int64_t g = j / V;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t i = start[j]; i < start[j + 1]; ++i) {
          const int64_t off = (order[i] * G + g) * D;
          for (int64_t k = 0; k < D; ++k) acc[k] += load_float(grad_q, off + k, gdtype);
        }
        for (int64_t k = 0; k < D; ++k) store_float(grad_cb, j * D + k, cdtype, acc[k]);
      }
    }
  }
}

}  // namespace

void bind_gumbel_quantize(py::module_& m) {
  m.def("gumbel_quantize_forward", &forward_cpu, py::arg("logits"), py::arg("ldtype"), py::arg("codebook"),
        py::arg("cdtype"), py::arg("codebook_f32"), py::arg("n"), py::arg("groups"), py::arg("num_vars"), py::arg("dim"),
        py::arg("training"), py::arg("hard"), py::arg("tau"), py::arg("seed"), py::arg("mask"), py::arg("quantized"),
        py::arg("codes"), py::arg("prob_sum"), py::arg("code_sum"), py::call_guard<py::gil_scoped_release>());
  m.def("gumbel_quantize_backward", &backward_cpu, py::arg("grad_q"), py::arg("gdtype"), py::arg("logits"),
        py::arg("ldtype"), py::arg("codebook_t"), py::arg("codes"), py::arg("mask"), py::arg("w"), py::arg("n"),
        py::arg("groups"), py::arg("num_vars"), py::arg("dim"), py::arg("training"), py::arg("hard"), py::arg("tau"),
        py::arg("seed"), py::arg("grad_logits"), py::arg("cdtype"), py::arg("grad_codebook"),
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace sslfast
