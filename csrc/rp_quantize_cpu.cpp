// CPU kernels of random-projection quantization and nearest-codeword assignment.
//
// One pass per call, parallel over blocks of rows: load the block's stacked rows (straight
// from the (B, T, F) input, no stacked copy), LayerNorm, project, normalise, then for each
// head stream the codebook in tiles of TV codewords and keep a running best per row. A tile
// is converted once to fp32 and transposed to (d, TV), so the scores of one row against a
// tile are TV/8 vector accumulators over d; the (rows, V) score matrix never exists.
//
// The hot loop is compiled twice (AVX2+FMA and the baseline ISA) and picked at run time,
// because the build's flags target the baseline x86-64 only.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "rp_quantize.h"
#include "sslfast/bind.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace sslfast {
namespace rpq {
namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));
constexpr int kUnroll = 4;  // vectors of codewords scored together: reuses each broadcast y_j
constexpr int kTileQuantum = 16 * kUnroll;  // codewords per tile: a multiple of either group
constexpr int kAlign = 64;

// Instruction sets of the scoring loop; the best the CPU has is used unless a test forces one.
enum Isa : int { kIsaAuto = -1, kIsaBase = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
int g_forced_isa = kIsaAuto;

struct Problem {
  const void* x;
  int x_dtype;
  int64_t B, T, F, k, rows_per_seq, rows, in_dim;
  const float* proj;  // (in_dim, H * d) fp32, or null: y = the row itself (H = 1, d = in_dim)
  const void* cb;
  int cb_dtype;
  int64_t H, V, d;
  bool layernorm;
  int metric;
  const uint8_t* mask;  // (rows,) or null
  int64_t* out;         // (rows, H)
};

// Codewords per tile: the transposed tile (d * TV floats) stays within about 64 KB.
int64_t tile_size(int64_t d, int64_t V) {
  int64_t tv = (16384 / std::max<int64_t>(d, 1)) / kTileQuantum * kTileQuantum;
  tv = std::max<int64_t>(tv, kTileQuantum);
  const int64_t v_pad = (V + kTileQuantum - 1) / kTileQuantum * kTileQuantum;
  return std::min(tv, std::max<int64_t>(v_pad, kTileQuantum));
}

// Fills the (d, TV) transposed tile of codewords v0 .. v0+TV-1 of head h (zeros past V) and
// their score coefficients (a = 0, b = -inf past V, so padding never wins). Templated on the
// storage type so the conversion is inlined: the tile is rebuilt once per row block.
template <int kDtype>
void load_tile_t(const Problem& p, int64_t h, int64_t v0, int64_t TV, float* ct, float* a, float* b) {
  const int64_t n = std::min(TV, p.V - v0);
  const int64_t base = (h * p.V + v0) * p.d;
  // j outer: the transposed writes run contiguously (v inner); with v outer they would stride
  // by TV floats, a power of two that maps every write of a codeword to one cache set.
  for (int64_t v = 0; v < TV; ++v) a[v] = 0.0f;  // |c|^2 accumulates here first
  for (int64_t j = 0; j < p.d; ++j) {
    float* row = ct + j * TV;
    for (int64_t v = 0; v < n; ++v) {
      const float c = load_float(p.cb, base + v * p.d + j, kDtype);
      row[v] = c;
      a[v] += c * c;
    }
    for (int64_t v = n; v < TV; ++v) row[v] = 0.0f;
  }
  for (int64_t v = 0; v < n; ++v) codeword_coeffs(a[v], p.metric, &a[v], &b[v]);
  for (int64_t v = n; v < TV; ++v) {
    a[v] = 0.0f;
    b[v] = -std::numeric_limits<float>::infinity();
  }
}

void load_tile(const Problem& p, int64_t h, int64_t v0, int64_t TV, float* ct, float* a, float* b) {
  switch (p.cb_dtype) {
    case static_cast<int>(DType::f16):
      return load_tile_t<static_cast<int>(DType::f16)>(p, h, v0, TV, ct, a, b);
    case static_cast<int>(DType::bf16):
      return load_tile_t<static_cast<int>(DType::bf16)>(p, h, v0, TV, ct, a, b);
    default:
      return load_tile_t<static_cast<int>(DType::f32)>(p, h, v0, TV, ct, a, b);
  }
}

// Scores one row y (d floats) against a transposed tile and updates its running best.
// Vec is 8 or 16 fp32 lanes; a group is kUnroll vectors of consecutive codewords.
template <typename Vec>
__attribute__((always_inline)) inline void score_row_tile(const float* y, int64_t d, const float* ct, const float* a,
                                                          const float* b, int64_t TV, int64_t v0, float* best,
                                                          int64_t* best_index) {
  constexpr int L = sizeof(Vec) / sizeof(float);
  constexpr int G = L * kUnroll;
  const Vec* ctv = reinterpret_cast<const Vec*>(ct);
  const Vec* av = reinterpret_cast<const Vec*>(a);
  const Vec* bv = reinterpret_cast<const Vec*>(b);
  const int64_t nvec = TV / L;
  alignas(kAlign) float s[G];
  for (int64_t g = 0; g < nvec; g += kUnroll) {
    Vec acc[kUnroll];
    for (int u = 0; u < kUnroll; ++u) acc[u] = Vec{};
    for (int64_t j = 0; j < d; ++j) {
      const Vec yj = Vec{} + y[j];
      const Vec* row = ctv + j * nvec + g;
      for (int u = 0; u < kUnroll; ++u) acc[u] += yj * row[u];
    }
    Vec top = acc[0] * av[g] + bv[g];
    reinterpret_cast<Vec*>(s)[0] = top;
    for (int u = 1; u < kUnroll; ++u) {
      const Vec su = acc[u] * av[g + u] + bv[g + u];
      reinterpret_cast<Vec*>(s)[u] = su;
      top = top > su ? top : su;
    }
    float m = top[0];
    for (int l = 1; l < L; ++l) m = top[l] > m ? top[l] : m;
    // Most groups cannot beat the running best: scan in order only when one can, which keeps
    // the lowest index among equal scores.
    if (m > *best) {
      for (int l = 0; l < G; ++l) {
        if (s[l] > *best) {
          *best = s[l];
          *best_index = v0 + g * L + l;
        }
      }
    }
  }
}

template <typename Vec>
__attribute__((always_inline)) inline void score_block_impl(const Problem& p, int64_t h, const float* y, int64_t ldy,
                                                            const int64_t* rows, int64_t nrows, float* ct, float* a,
                                                            float* b, int64_t TV, float* best, int64_t* best_index) {
  for (int64_t r = 0; r < nrows; ++r) {
    best[r] = -std::numeric_limits<float>::infinity();
    best_index[r] = 0;
  }
  for (int64_t v0 = 0; v0 < p.V; v0 += TV) {
    load_tile(p, h, v0, TV, ct, a, b);
    for (int64_t r = 0; r < nrows; ++r) {
      score_row_tile<Vec>(y + r * ldy + h * p.d, p.d, ct, a, b, TV, v0, &best[r], &best_index[r]);
    }
  }
  for (int64_t r = 0; r < nrows; ++r) p.out[rows[r] * p.H + h] = best_index[r];
}

#define SSLFAST_RPQ_BLOCK_ARGS                                                                                   \
  const Problem &p, int64_t h, const float *y, int64_t ldy, const int64_t *rows, int64_t nrows, float *ct, float *a, \
      float *b, int64_t TV, float *best, int64_t *best_index
#define SSLFAST_RPQ_BLOCK_CALL p, h, y, ldy, rows, nrows, ct, a, b, TV, best, best_index

void score_block_base(SSLFAST_RPQ_BLOCK_ARGS) { score_block_impl<v8f>(SSLFAST_RPQ_BLOCK_CALL); }

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SSLFAST_RPQ_X86 1
__attribute__((target("avx2,fma"))) void score_block_avx2(SSLFAST_RPQ_BLOCK_ARGS) {
  score_block_impl<v8f>(SSLFAST_RPQ_BLOCK_CALL);
}
__attribute__((target("avx512f,avx2,fma"))) void score_block_avx512(SSLFAST_RPQ_BLOCK_ARGS) {
  score_block_impl<v16f>(SSLFAST_RPQ_BLOCK_CALL);
}
#endif

int best_isa() {
#ifdef SSLFAST_RPQ_X86
  static const int isa = __builtin_cpu_supports("avx512f")                                   ? kIsaAvx512
                         : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? kIsaAvx2
                                                                                             : kIsaBase;
  return isa;
#else
  return kIsaBase;
#endif
}

int active_isa() { return g_forced_isa == kIsaAuto ? best_isa() : std::min(g_forced_isa, best_isa()); }

void score_block(int isa, SSLFAST_RPQ_BLOCK_ARGS) {
#ifdef SSLFAST_RPQ_X86
  if (isa == kIsaAvx512) return score_block_avx512(SSLFAST_RPQ_BLOCK_CALL);
  if (isa == kIsaAvx2) return score_block_avx2(SSLFAST_RPQ_BLOCK_CALL);
#endif
  score_block_base(SSLFAST_RPQ_BLOCK_CALL);
}

// Loads, normalises and projects the active rows of one block into y (nrows, H * d).
void prepare_rows(const Problem& p, const int64_t* rows, int64_t nrows, float* xb, float* y) {
  const int64_t hd = p.H * p.d;
  for (int64_t r = 0; r < nrows; ++r) {
    float* xr = xb + r * p.in_dim;
    const int64_t off = stacked_row_offset(rows[r], p.rows_per_seq, p.T, p.F, p.k);
    for (int64_t i = 0; i < p.in_dim; ++i) xr[i] = load_float(p.x, off + i, p.x_dtype);
    if (p.layernorm) {
      float sum = 0.0f;
      for (int64_t i = 0; i < p.in_dim; ++i) sum += xr[i];
      const float mean = sum / static_cast<float>(p.in_dim);
      float m2 = 0.0f;
      for (int64_t i = 0; i < p.in_dim; ++i) m2 += (xr[i] - mean) * (xr[i] - mean);
      const float rstd = layernorm_rstd(m2, p.in_dim, kLayerNormEps);
      for (int64_t i = 0; i < p.in_dim; ++i) xr[i] = (xr[i] - mean) * rstd;
    }
  }
  if (p.proj != nullptr) {
    // y = xb @ P with P's rows streamed once per block (i outer), each reused by every row.
    std::fill(y, y + nrows * hd, 0.0f);
    for (int64_t i = 0; i < p.in_dim; ++i) {
      const float* pi = p.proj + i * hd;
      for (int64_t r = 0; r < nrows; ++r) {
        const float xi = xb[r * p.in_dim + i];
        float* yr = y + r * hd;
        for (int64_t c = 0; c < hd; ++c) yr[c] += xi * pi[c];
      }
    }
  } else {
    std::copy(xb, xb + nrows * p.in_dim, y);
  }
  if (p.metric == kCosine) {
    for (int64_t r = 0; r < nrows; ++r) {
      for (int64_t h = 0; h < p.H; ++h) {
        float* v = y + r * hd + h * p.d;
        float ss = 0.0f;
        for (int64_t j = 0; j < p.d; ++j) ss += v[j] * v[j];
        const float scale = normalize_scale(ss);
        for (int64_t j = 0; j < p.d; ++j) v[j] *= scale;
      }
    }
  }
}

void run(const Problem& p) {
  if (p.rows == 0) return;
  const int64_t hd = p.H * p.d;
  const int64_t TV = tile_size(p.d, p.V);
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  // Enough blocks to balance the threads, few enough that each codebook tile, converted and
  // transposed once per block, is reused by many rows.
  int64_t R = (p.rows + 2 * threads - 1) / (2 * threads);
  R = std::max<int64_t>(16, std::min<int64_t>(256, R));
  const int64_t nblocks = (p.rows + R - 1) / R;
  const int isa = active_isa();
#pragma omp parallel
  {
    std::vector<float> xb(R * p.in_dim), y(R * hd), best(R);
    std::vector<int64_t> rows(R), best_index(R);
    // Over-allocated so the tile can start on a kAlign boundary (vector loads of ct, a, b).
    std::vector<float> tile_buf(p.d * TV + 2 * TV + kAlign);
    float* base = tile_buf.data();
    float* ct = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(base) + kAlign - 1) &
                                         ~std::uintptr_t(kAlign - 1));
    float* a = ct + p.d * TV;
    float* b = a + TV;
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t r0 = blk * R, r1 = std::min(p.rows, r0 + R);
      int64_t nrows = 0;
      for (int64_t n = r0; n < r1; ++n) {
        if (p.mask != nullptr && p.mask[n] == 0) {
          for (int64_t h = 0; h < p.H; ++h) p.out[n * p.H + h] = -1;
        } else {
          rows[nrows++] = n;
        }
      }
      if (nrows == 0) continue;
      prepare_rows(p, rows.data(), nrows, xb.data(), y.data());
      for (int64_t h = 0; h < p.H; ++h) {
        score_block(isa, p, h, y.data(), hd, rows.data(), nrows, ct, a, b, TV, best.data(), best_index.data());
      }
    }
  }
}

// x: contiguous (B, T, F) of dtype x_dtype; rows = B * (T // k); proj: fp32 (F*k, H*d) or 0;
// codebooks: contiguous (H, V, d) of cb_dtype; mask: uint8 (rows,) or 0; out: int64 (rows, H).
void rp_quantize_cpu(std::uintptr_t x, int x_dtype, int64_t B, int64_t T, int64_t F, int64_t k, std::uintptr_t proj,
                     std::uintptr_t cb, int cb_dtype, int64_t H, int64_t V, int64_t d, bool layernorm, int metric,
                     std::uintptr_t mask, std::uintptr_t out) {
  Problem p;
  p.x = as_ptr<const void>(x);
  p.x_dtype = x_dtype;
  p.B = B;
  p.T = T;
  p.F = F;
  p.k = k;
  p.rows_per_seq = T / k;
  p.rows = B * p.rows_per_seq;
  p.in_dim = F * k;
  p.proj = proj ? as_ptr<const float>(proj) : nullptr;
  p.cb = as_ptr<const void>(cb);
  p.cb_dtype = cb_dtype;
  p.H = H;
  p.V = V;
  p.d = d;
  p.layernorm = layernorm;
  p.metric = metric;
  p.mask = mask ? as_ptr<const uint8_t>(mask) : nullptr;
  p.out = as_ptr<int64_t>(out);
  py::gil_scoped_release release;
  run(p);
}

}  // namespace
}  // namespace rpq

void bind_rp_quantize(py::module_& m) {
  m.def("rp_quantize", &rpq::rp_quantize_cpu, py::arg("x"), py::arg("x_dtype"), py::arg("B"), py::arg("T"),
        py::arg("F"), py::arg("k"), py::arg("proj"), py::arg("codebooks"), py::arg("cb_dtype"), py::arg("H"),
        py::arg("V"), py::arg("d"), py::arg("layernorm"), py::arg("metric"), py::arg("mask"), py::arg("out"));
  // Which scoring loop runs (0 baseline, 1 AVX2, 2 AVX-512), and a switch for the tests to
  // force a narrower one (-1: the best this CPU has), so every compiled variant is checked.
  m.def("rp_quantize_isa", &rpq::active_isa);
  m.def("rp_quantize_force_isa", [](int isa) { rpq::g_forced_isa = isa; }, py::arg("isa"));
}

}  // namespace sslfast
