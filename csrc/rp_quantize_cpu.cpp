// CPU kernels of random-projection quantization and nearest-codeword assignment.
//
// One call: load the stacked rows (straight from the (B, T, F) input, no stacked copy),
// LayerNorm, project, normalise, then for each (block of rows, head) stream the head's
// codebook in tiles of TV codewords and keep a running best per row. Each tile is converted
// once per call to fp32 and transposed to (d, TV), so the scores of one row against a tile
// are TV/L vector accumulators over d; the (rows, V) score matrix never exists.
//
// The scoring loop is compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and picked
// at run time, because the build's flags target the baseline ISA only.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <thread>
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
constexpr int kUnroll = 4;  // vectors of codewords per group: each broadcast y_j feeds kUnroll FMAs
constexpr int kTileQuantum = 16 * kUnroll;  // codewords per tile: a multiple of either group
constexpr int kAlign = 64;
// Rows per work item: each precomputed codebook tile is reused by this many rows while hot.
constexpr int64_t kRowBlock = 32;

// Instruction sets of the scoring loop; the best the CPU has is used unless a test forces one.
enum Isa : int { kIsaAuto = -1, kIsaBase = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
int g_forced_isa = kIsaAuto;


// Codewords per tile: the transposed tile (d * TV floats) stays within about 64 KB.
int64_t tile_size(int64_t d, int64_t V) {
  int64_t tv = (16384 / std::max<int64_t>(d, 1)) / kTileQuantum * kTileQuantum;
  tv = std::max<int64_t>(tv, kTileQuantum);
  const int64_t v_pad = (V + kTileQuantum - 1) / kTileQuantum * kTileQuantum;
  return std::min(tv, std::max<int64_t>(v_pad, kTileQuantum));
}

// Fills the (d, TV) transposed tile of codewords v0 .. v0+TV-1 of head h (zeros past V) and
// their score coefficients (a = 0, b = -inf past V, so padding never wins). Templated on the
// storage type so the conversion is inlined. Built once per call (run(), phase 1).
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

template <typename Vec>
struct IndexVec;
template <>
struct IndexVec<v8f> {
  typedef int32_t type __attribute__((vector_size(32)));
};
template <>
struct IndexVec<v16f> {
  typedef int32_t type __attribute__((vector_size(64)));
};

// Scores NR rows (y[r], d floats each) against a transposed tile and updates their running
// bests. Vec is L = 8 or 16 fp32 lanes; a group is kUnroll vectors of consecutive codewords.
// The NR x kUnroll accumulators stay in registers, so each tile load feeds NR FMAs (a single
// row would be load-bound for wide rows such as 768-dim k-means features).
//
// The running best is kept per lane (lane_best / lane_base: L scores and the index of the
// vector each came from) with vector compares and blends only; score_block_impl reduces the
// lanes at the end. Every lane sees its codewords in increasing index order and only a
// strictly greater score replaces, so each lane keeps its lowest-index maximum and the final
// reduction (better(): ties to the lower index) yields the lowest-index maximum overall.
template <typename Vec, int NR>
__attribute__((always_inline)) inline void score_rows_tile(const float* const* y, int nrows, int64_t d,
                                                           const float* ct, const float* a, const float* b,
                                                           int64_t TV, int64_t v0, float* lane_best,
                                                           int32_t* lane_base) {
  typedef typename IndexVec<Vec>::type IVec;
  constexpr int L = sizeof(Vec) / sizeof(float);
  const Vec* ctv = reinterpret_cast<const Vec*>(ct);
  const Vec* av = reinterpret_cast<const Vec*>(a);
  const Vec* bv = reinterpret_cast<const Vec*>(b);
  const int64_t nvec = TV / L;
  for (int64_t g = 0; g < nvec; g += kUnroll) {
    Vec acc[NR][kUnroll];
    for (int r = 0; r < NR; ++r)
      for (int u = 0; u < kUnroll; ++u) acc[r][u] = Vec{};
    for (int64_t j = 0; j < d; ++j) {
      const Vec* row = ctv + j * nvec + g;
      Vec c[kUnroll];
      for (int u = 0; u < kUnroll; ++u) c[u] = row[u];
      for (int r = 0; r < NR; ++r) {
        const Vec yj = Vec{} + y[r][j];
        for (int u = 0; u < kUnroll; ++u) acc[r][u] += yj * c[u];
      }
    }
    const int32_t base = static_cast<int32_t>(v0 + g * L);
    for (int r = 0; r < nrows; ++r) {
      Vec m = acc[r][0] * av[g] + bv[g];
      IVec mi = IVec{} + base;
      for (int u = 1; u < kUnroll; ++u) {
        const Vec su = acc[r][u] * av[g + u] + bv[g + u];
        const IVec gt = su > m;
        m = gt ? su : m;
        mi = gt ? (IVec{} + (base + u * L)) : mi;
      }
      Vec& best = *reinterpret_cast<Vec*>(lane_best + r * L);
      IVec& best_base = *reinterpret_cast<IVec*>(lane_base + r * L);
      const IVec gt = m > best;
      best = gt ? m : best;
      best_base = gt ? mi : best_base;
    }
  }
}

// Labels of one head for a block of rows (y: their projections on the head, ldy floats apart):
// every precomputed tile of the head's codebook is scored against every row while it is hot.
template <typename Vec, int NR>
__attribute__((always_inline)) inline void score_block_impl(const Problem& p, int64_t h, const float* y, int64_t ldy,
                                                            const int64_t* rows, int64_t nrows, const float* tiles,
                                                            int64_t TV, int64_t ntiles, float* lane_best,
                                                            int32_t* lane_base) {
  constexpr int L = sizeof(Vec) / sizeof(float);
  for (int64_t i = 0; i < nrows * L; ++i) {
    lane_best[i] = -std::numeric_limits<float>::infinity();
    lane_base[i] = 0;
  }
  const int64_t tile_floats = (p.d + 2) * TV;
  for (int64_t t = 0; t < ntiles; ++t) {
    const float* ct = tiles + t * tile_floats;
    const float* a = ct + p.d * TV;
    const float* b = a + TV;
    for (int64_t r0 = 0; r0 < nrows; r0 += NR) {
      const int n = static_cast<int>(std::min<int64_t>(NR, nrows - r0));
      const float* ys[NR];
      for (int r = 0; r < NR; ++r) ys[r] = y + (r0 + std::min(r, n - 1)) * ldy;  // tail: repeat a row
      score_rows_tile<Vec, NR>(ys, n, p.d, ct, a, b, TV, t * TV, lane_best + r0 * L, lane_base + r0 * L);
    }
  }
  for (int64_t r = 0; r < nrows; ++r) {
    // A lane never updated holds (-inf, base 0): it loses to any real score and, when every
    // score is -inf or NaN, lane 0 gives label 0.
    float best = -std::numeric_limits<float>::infinity();
    int64_t best_index = std::numeric_limits<int64_t>::max();
    for (int l = 0; l < L; ++l) {
      const float s = lane_best[r * L + l];
      const int64_t idx = static_cast<int64_t>(lane_base[r * L + l]) + l;
      if (better(s, idx, best, best_index)) {
        best = s;
        best_index = idx;
      }
    }
    p.out[rows[r] * p.H + h] = best_index;
  }
}

#define SSLFAST_RPQ_BLOCK_ARGS                                                                              \
  const Problem &p, int64_t h, const float *y, int64_t ldy, const int64_t *rows, int64_t nrows,            \
      const float *tiles, int64_t TV, int64_t ntiles, float *lane_best, int32_t *lane_base
#define SSLFAST_RPQ_BLOCK_CALL p, h, y, ldy, rows, nrows, tiles, TV, ntiles, lane_best, lane_base

// Rows per register block: AVX-512 has 32 vector registers (4 x 4 accumulators fit), the
// others 16.
void score_block_base(SSLFAST_RPQ_BLOCK_ARGS) { score_block_impl<v8f, 2>(SSLFAST_RPQ_BLOCK_CALL); }

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SSLFAST_RPQ_X86 1
__attribute__((target("avx2,fma"))) void score_block_avx2(SSLFAST_RPQ_BLOCK_ARGS) {
  score_block_impl<v8f, 2>(SSLFAST_RPQ_BLOCK_CALL);
}
__attribute__((target("avx512f,avx2,fma"))) void score_block_avx512(SSLFAST_RPQ_BLOCK_ARGS) {
  score_block_impl<v16f, 4>(SSLFAST_RPQ_BLOCK_CALL);
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

// Loads and normalises the rows of one block into xb (nrows, in_dim), then projects them on
// head h's d columns into y (nrows, d) and unit-normalises them (cosine). Without a
// projection y is the row itself (H = 1, d = in_dim).
void prepare_rows(const Problem& p, int64_t h, const int64_t* rows, int64_t nrows, float* xb, float* y) {
  const int64_t hd = p.H * p.d;
  float* dst = p.proj != nullptr ? xb : y;
  for (int64_t r = 0; r < nrows; ++r) {
    float* xr = dst + r * p.in_dim;
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
    // i outer: each row of the head's slice of P is read once per block, reused by every row.
    std::fill(y, y + nrows * p.d, 0.0f);
    for (int64_t i = 0; i < p.in_dim; ++i) {
      const float* pi = p.proj + i * hd + h * p.d;
      for (int64_t r = 0; r < nrows; ++r) {
        const float xi = xb[r * p.in_dim + i];
        float* yr = y + r * p.d;
        for (int64_t j = 0; j < p.d; ++j) yr[j] += xi * pi[j];
      }
    }
  }
  if (p.metric == kCosine) {
    for (int64_t r = 0; r < nrows; ++r) {
      float* v = y + r * p.d;
      float ss = 0.0f;
      for (int64_t j = 0; j < p.d; ++j) ss += v[j] * v[j];
      const float scale = normalize_scale(ss);
      for (int64_t j = 0; j < p.d; ++j) v[j] *= scale;
    }
  }
}

float* align_up(float* ptr) {
  return reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(ptr) + kAlign - 1) & ~std::uintptr_t(kAlign - 1));
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();  // honours OMP_NUM_THREADS
#else
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
#endif
}

// Runs fn(item, worker) for item in [0, n) on `workers` threads (the caller is worker 0),
// items handed out one at a time. Plain threads joined at the end instead of an OpenMP
// region: with libgomp's default wait policy idle workers spin at barriers and after the
// region, and on a shared CPU (measured here: 2 cores, load ~6) that spinning took the time
// of the threads doing work (about 45 ms instead of 15 ms wall for a 5 ms-CPU call).
template <typename Fn>
void parallel_items(int64_t n, int workers, Fn&& fn) {
  std::atomic<int64_t> next{0};
  auto work = [&](int worker) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i, worker);
  };
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w) pool.emplace_back(work, w);
  work(0);
  for (auto& t : pool) t.join();
}

// Per-worker buffers: the block's loaded rows, their projection on one head, and the
// per-lane running bests (at most 16 lanes), vector-aligned.
struct Scratch {
  std::vector<float> xb, y, lane_best_store;
  std::vector<int32_t> lane_base_store;
  float* lane_best;
  int32_t* lane_base;
  Scratch(const Problem& p, int64_t R)
      : xb(p.proj != nullptr ? R * p.in_dim : 0), y(R * p.d), lane_best_store(R * 16 + kAlign),
        lane_base_store(R * 16 + kAlign) {
    lane_best = align_up(lane_best_store.data());
    lane_base = reinterpret_cast<int32_t*>(align_up(reinterpret_cast<float*>(lane_base_store.data())));
  }
  Scratch(Scratch&& o) noexcept
      : xb(std::move(o.xb)), y(std::move(o.y)), lane_best_store(std::move(o.lane_best_store)),
        lane_base_store(std::move(o.lane_base_store)), lane_best(o.lane_best), lane_base(o.lane_base) {}
};

// One parallel loop over (head, block of rows) items, head-major, with no barrier inside: an
// item loads, normalises and projects its rows on its head, then scores them against the
// head's codebook tiles. The first item of a head to run converts the head's tiles (fp32,
// transposed, with score coefficients: one pass over the codebook per call); items of that
// head which start meanwhile wait for it. Small dynamic items and no phase barriers keep the
// threads busy when the machine is shared and one of them is descheduled.
void run(const Problem& p) {
  if (p.rows == 0) return;
  const int64_t TV = tile_size(p.d, p.V);
  const int64_t ntiles = (p.V + TV - 1) / TV;
  const int64_t tile_floats = (p.d + 2) * TV;
  // Scratch kept per calling thread between calls: fresh multi-MB buffers would page-fault
  // on every call, which costs as much as the codebook pass itself.
  thread_local std::vector<float> tile_store;
  thread_local std::vector<int64_t> active_store;
  active_store.resize(p.rows);
  int64_t nactive = 0;
  for (int64_t n = 0; n < p.rows; ++n) {
    if (p.mask != nullptr && p.mask[n] == 0) {
      for (int64_t h = 0; h < p.H; ++h) p.out[n * p.H + h] = -1;
    } else {
      active_store[nactive++] = n;
    }
  }
  if (nactive == 0) return;
  tile_store.resize(p.H * ntiles * tile_floats + kAlign);
  float* tiles = align_up(tile_store.data());
  const int64_t* active = active_store.data();
  std::unique_ptr<std::atomic<int>[]> head_state(new std::atomic<int>[p.H]);  // 0 todo, 1 building, 2 ready
  for (int64_t h = 0; h < p.H; ++h) head_state[h].store(0);
  const int64_t R = kRowBlock;
  const int64_t nblocks = (nactive + R - 1) / R;
  const int64_t nitems = p.H * nblocks;
  const int isa = active_isa();
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads(), nitems)));
  std::vector<Scratch> scratch;
  for (int w = 0; w < workers; ++w) scratch.emplace_back(p, R);
  parallel_items(nitems, workers, [&](int64_t item, int worker) {
    Scratch& sc = scratch[worker];
    const int64_t h = item / nblocks, blk = item % nblocks;
    const int64_t r0 = blk * R, nr = std::min(R, nactive - r0);
    float* head_tiles = tiles + h * ntiles * tile_floats;
    int expected = 0;
    if (head_state[h].compare_exchange_strong(expected, 1)) {
      for (int64_t t = 0; t < ntiles; ++t) {
        float* ct = head_tiles + t * tile_floats;
        load_tile(p, h, t * TV, TV, ct, ct + p.d * TV, ct + (p.d + 1) * TV);
      }
      head_state[h].store(2, std::memory_order_release);
    }
    prepare_rows(p, h, active + r0, nr, sc.xb.data(), sc.y.data());
    while (head_state[h].load(std::memory_order_acquire) != 2) std::this_thread::yield();
    score_block(isa, p, h, sc.y.data(), p.d, active + r0, nr, head_tiles, TV, ntiles, sc.lane_best, sc.lane_base);
  });
}

// x: contiguous (B, T, F) of dtype x_dtype; rows = B * (T // k); proj: fp32 (F*k, H*d) or 0;
// codebooks: contiguous (H, V, d) of cb_dtype; mask: uint8 (rows,) or 0; out: int64 (rows, H).
void rp_quantize_cpu(std::uintptr_t x, int x_dtype, int64_t B, int64_t T, int64_t F, int64_t k, std::uintptr_t proj,
                     std::uintptr_t cb, int cb_dtype, int64_t H, int64_t V, int64_t d, bool layernorm, int metric,
                     std::uintptr_t mask, std::uintptr_t out) {
  const Problem p = make_problem(x, x_dtype, B, T, F, k, proj, cb, cb_dtype, H, V, d, layernorm, metric, mask, out);
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
