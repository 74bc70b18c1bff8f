// sslfast._C._testing: the CUDA kernels' device code run on the host, for the tests.
//
// The kernels of masking_cuda.cu, negatives_cuda.cu, gumbel_quantize_cuda.cu,
// rp_quantize_cuda.cu, contrastive_cuda.cu, apply_mask_cuda.cu and masked_prediction_cuda.cu
// are built from SSLFAST_HD phases in their csrc/<family>.h, each what one thread (or one lane
// of a warp) does between two barriers (or shuffles). The functions here run a kernel's blocks
// one after another and, inside a block, each phase for every thread index the kernel uses
// before the next phase (what the barrier guarantees), so tests/test_cuda_device_code.py
// compares the CUDA algorithm with the reference on a CPU. Only the warp intrinsics are
// replaced: shuffle reductions by the same xor butterflies over the 32 lanes' values,
// __any_sync and __ballot_sync by the or / the in-order list they compute, block scans and
// atomics by plain sums.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <vector>

#include "apply_mask.h"
#include "contrastive.h"
#include "gumbel_quantize.h"
#include "masked_prediction.h"
#include "masking.h"
#include "negatives.h"
#include "rp_quantize.h"
#include "sslfast/bind.h"
#include "sslfast/launch.h"

namespace py = pybind11;

namespace sslfast {
namespace {

// mask_rows_kernel then (fairseq style with require_same_masks or mask_dropout)
// mask_equalize_kernel, `nt` threads a block; arguments as compute_mask_indices_cuda.
void masking_kernels(std::uintptr_t lengths_ptr, std::uintptr_t pad_ptr, int64_t B, int64_t T, double mask_prob,
                     int64_t L, int64_t vmin, std::uintptr_t thr_ptr, int64_t n_thr, int64_t min_masks,
                     int require_same, double dropout, int hf, uint64_t seed, std::uintptr_t seed_ptr,
                     int no_overlap, int64_t min_space, int64_t n_cap, int64_t r_cap, int64_t nt,
                     std::uintptr_t out_ptr) {
  // both kernels begin with p.seed = load_seed(seed_ptr, p.seed): a CPU seed tensor here
  const masking::Params p{B, T, mask_prob, L, vmin, as_ptr<const int64_t>(thr_ptr), n_thr, min_masks, require_same,
                          dropout, hf, load_seed(as_ptr<const int64_t>(seed_ptr), seed), no_overlap, min_space};
  const int64_t* lengths = as_ptr<const int64_t>(lengths_ptr);
  const uint8_t* pad = as_ptr<const uint8_t>(pad_ptr);
  uint8_t* out = as_ptr<uint8_t>(out_ptr);
  std::vector<int64_t> lens_ws(B * n_cap), counts(B);
  std::vector<uint64_t> keys_ws(B * r_cap);
  for (int64_t b = 0; b < B; ++b) {  // mask_rows_kernel, block b
    uint8_t* row = out + b * T;
    int64_t* lens = lens_ws.data() + b * n_cap;
    uint64_t* keys = keys_ws.data() + b * r_cap;
    for (int64_t t = 0; t < T; ++t) row[t] = 0;
    const masking::RowPlan plan = masking::row_plan(p, b, lengths[b], lens, reinterpret_cast<int64_t*>(keys), row);
    for (int64_t tid = 0; tid < nt; ++tid) masking::row_keys(p, b, plan.R, keys, tid, nt);
    for (int64_t tid = 0; tid < nt; ++tid) masking::row_paint(plan, keys, lens, row, tid, nt);
    int64_t c = 0;
    for (int64_t tid = 0; tid < nt; ++tid) c += masking::row_unpad_count(row, pad ? pad + b * T : nullptr, T, tid, nt);
    counts[b] = c;
  }
  if (masking_launch::plan(B, T, hf, require_same, dropout).size() < 2) return;
  const int64_t batch_min = masking::min_count(counts.data(), B);
  for (int64_t b = 0; b < B; ++b) {  // mask_equalize_kernel, block b
    uint8_t* row = out + b * T;
    uint64_t* keys = keys_ws.data() + b * r_cap;
    const masking::KeepPlan k = masking::keep_plan(p, counts[b], batch_min);
    const int64_t keeps[2] = {k.equalize, k.dropout};
    const uint32_t streams[2] = {masking::kStreamEqualize, masking::kStreamDropout};
    for (int step = 0; step < 2; ++step) {
      if (keeps[step] < 0) continue;
      for (int64_t tid = 0; tid < nt; ++tid) masking::keep_keys(p, b, row, keys, streams[step], tid, nt);
      for (int64_t tid = 0; tid < nt; ++tid) masking::keep_drop(p, keys, keeps[step], row, tid, nt);
    }
  }
}

// The block's Prefix of negatives_one_pass_kernel<false>: count_prefix summed over nt threads.
py::tuple negatives_prefix(std::uintptr_t mask, std::uintptr_t pad, int from_masked_only, int64_t end, int64_t first,
                           int64_t row_base, int64_t row_end, int64_t nt) {
  negatives::Prefix s{0, 0, 0, 0, 0};
  for (int64_t tid = 0; tid < nt; ++tid) {
    const negatives::Prefix a = negatives::count_prefix(as_ptr<const uint8_t>(mask), as_ptr<const uint8_t>(pad),
                                                        from_masked_only, end, first, row_base, row_end, tid, nt);
    s.m_first += a.m_first;
    s.c_first += a.c_first;
    s.c_row += a.c_row;
    s.c_end += a.c_end;
    s.c_all += a.c_all;
  }
  return py::make_tuple(s.m_first, s.c_first, s.c_row, s.c_end, s.c_all);
}

// negatives_one_pass_kernel<hf> for every block (b, chunk), kChunk threads; the block scans
// are prefix sums here.
void negatives_one_pass(std::uintptr_t mask_ptr, std::uintptr_t pad_ptr, int from_masked_only, int64_t B, int64_t T,
                        int64_t K, int64_t Kc, bool hf, uint64_t seed_value, std::uintptr_t seed_ptr,
                        int64_t n_rows, std::uintptr_t out_ptr) {
  constexpr int64_t nt = negatives_launch::kChunk;
  const uint8_t* mask = as_ptr<const uint8_t>(mask_ptr);
  const uint8_t* pad = as_ptr<const uint8_t>(pad_ptr);
  int64_t* out = as_ptr<int64_t>(out_ptr);
  std::vector<int32_t> pos(T), own(nt);
  std::vector<int64_t> out_row(nt);
  const int64_t chunks = (T + nt - 1) / nt;
  for (int64_t blk = 0; blk < B * chunks; ++blk) {
    const int64_t b = blk / chunks, t0 = (blk % chunks) * nt, row_base = b * T;
    int64_t row_start = 0, n_row = 0, total = 0, own0 = 0, masked_before = 0;
    if (hf) {
      int64_t run = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (t == t0) own0 = run;
        if (negatives::candidate1(mask, pad, from_masked_only, row_base + t)) pos[run++] = static_cast<int32_t>(t);
      }
      n_row = run;
    } else {
      const int64_t end = Kc > 0 ? B * T : row_base + T;
      int64_t r[5] = {0, 0, 0, 0, 0};
      for (int64_t tid = 0; tid < nt; ++tid) {
        const negatives::Prefix a =
            negatives::count_prefix(mask, pad, from_masked_only, end, row_base + t0, row_base, row_base + T, tid, nt);
        r[0] += a.m_first;
        r[1] += a.c_first;
        r[2] += a.c_row;
        r[3] += a.c_end;
        r[4] += a.c_all;
      }
      masked_before = r[0];
      row_start = r[2];
      own0 = r[1] - r[2];
      n_row = r[3] - r[2];
      total = r[4];
    }
    int64_t c_incl = 0, m_incl = 0;
    for (int64_t tid = 0; tid < nt; ++tid) {
      const int64_t t = t0 + tid;
      const uint32_t m = t < T && mask[row_base + t] != 0;
      const uint32_t c = t < T ? negatives::candidate1(mask, pad, from_masked_only, row_base + t) : 0u;
      c_incl += c;
      m_incl += m;
      own[tid] = static_cast<int32_t>(own0 + c_incl - 1);
      int64_t row = -1;
      if (m) {
        row = hf ? row_base + t : masked_before + m_incl - 1;
        if (!hf && row >= n_rows) row = -1;
      }
      out_row[tid] = row;
    }
    const uint64_t seed = load_seed(as_ptr<const int64_t>(seed_ptr), seed_value);  // as the kernel, per block
    for (int64_t tid = 0; tid < nt; ++tid)
      negatives::one_pass_draws(hf, seed, T, K, Kc, b, t0, row_start, n_row, total, own.data(), out_row.data(),
                                pos.data(), out, tid, nt);
  }
}

// negatives_scan_kernel (one block of nt threads) then negatives_draw_kernel (every item).
void negatives_two_pass(std::uintptr_t mask_ptr, std::uintptr_t pad_ptr, int from_masked_only, int64_t B, int64_t T,
                        int64_t K, int64_t Kc, bool hf, uint64_t seed_value, std::uintptr_t seed_ptr,
                        int64_t n_rows, std::uintptr_t out_ptr) {
  const uint8_t* mask = as_ptr<const uint8_t>(mask_ptr);
  const uint8_t* pad = as_ptr<const uint8_t>(pad_ptr);
  std::vector<int32_t> ws32(3 * B * T);
  std::vector<int64_t> ws64(4 * B + 1);
  int32_t *rank = ws32.data(), *mrank = rank + B * T, *pos = mrank + B * T;
  for (int64_t b = 0; b < B; ++b)
    negatives::scan_row(mask + b * T, pad ? pad + b * T : nullptr, from_masked_only, T, rank + b * T, mrank + b * T,
                        pos + b * T, &ws64[b], &ws64[B + b]);
  negatives::scan_prefixes(B, ws64.data());
  const Launches plan = negatives_launch::plan(B, T, K, Kc, hf, 0, 0);  // 0 bytes of opt-in: the two-launch path
  if (plan.size() < 2) return;
  const int64_t items = plan[1].grid_x * plan[1].threads;
  const int64_t* key = as_ptr<const int64_t>(seed_ptr);
  for (int64_t i = 0; i < items; ++i)  // each thread of the kernel loads the key
    negatives::draw_item(B, T, K, Kc, hf, load_seed(key, seed_value), rank, mrank, pos, ws64.data(), n_rows,
                         as_ptr<int64_t>(out_ptr), i);
}

// ---- Warp kernels (gumbel_quantize_cuda.cu, rp_quantize_cuda.cu): each kernel's blocks in
// turn, each warp's phases for its 32 lanes, the shuffle reductions as the same butterflies
// (so the sums round as on the GPU).
using Lanes = std::array<float, gq::kLanes>;
static_assert(gq::kLanes == rpq::kWarp, "one warp width");

float warp_sum(Lanes v) {
  for (int o = gq::kLanes / 2; o > 0; o >>= 1) {
    Lanes t;
    for (int l = 0; l < gq::kLanes; ++l) t[l] = v[l] + v[l ^ o];
    v = t;
  }
  return v[0];
}

float warp_max(Lanes v) {
  for (int o = gq::kLanes / 2; o > 0; o >>= 1) {
    Lanes t;
    for (int l = 0; l < gq::kLanes; ++l) t[l] = std::fmax(v[l], v[l ^ o]);
    v = t;
  }
  return v[0];
}

gq::MaxArg warp_maxarg(std::array<gq::MaxArg, gq::kLanes> a) {
  for (int o = gq::kLanes / 2; o > 0; o >>= 1) {
    std::array<gq::MaxArg, gq::kLanes> t = a;
    for (int l = 0; l < gq::kLanes; ++l) gq::maxarg_update(t[l], a[l ^ o].m, a[l ^ o].i);
    a = t;
  }
  return a[0];
}

// tempered_row of the .cu: the row's weights in buf, *ym its max of l + g; returns 1 / sum.
float gumbel_tempered_row(const void* logits, int ldtype, int64_t base, int64_t V, int64_t n, int64_t g, float tau,
                          uint64_t seed, float* buf, float* ym) {
  Lanes m, z;
  for (int l = 0; l < gq::kLanes; ++l) m[l] = gq::lane_noisy_logits(logits, ldtype, base, V, n, g, seed, l, buf);
  *ym = warp_max(m);
  for (int l = 0; l < gq::kLanes; ++l) z[l] = gq::lane_tempered_weights(V, *ym, tau, l, buf);
  return 1.0f / warp_sum(z);
}

// forward_kernel, soft_forward_kernel (hard=False in training), reduce_partials_kernel:
// the arguments of the CUDA module's gumbel_quantize_forward, less the stream. The key is
// loaded as each kernel loads it (a seed tensor's pointer is a CPU tensor's here).
void gumbel_forward(std::uintptr_t logits_p, int ldtype, std::uintptr_t codebook_p, int cdtype, int64_t N, int64_t G,
                    int64_t V, int64_t D, bool training, bool hard, double tau_d, uint64_t seed,
                    std::uintptr_t seed_p, std::uintptr_t mask_p, std::uintptr_t quant_p, std::uintptr_t codes_p,
                    std::uintptr_t partial_p, std::uintptr_t sums_p) {
  using namespace gumbel_launch;
  seed = load_seed(as_ptr<const int64_t>(seed_p), seed);
  const Launches plan = forward(N, G, V, training, hard);
  if (plan.empty()) return;
  const void* logits = as_ptr<const void>(logits_p);
  const uint8_t* mask = as_ptr<const uint8_t>(mask_p);
  int64_t* codes = as_ptr<int64_t>(codes_p);
  float* partial = as_ptr<float>(partial_p);
  const bool soft = training && !hard, gather = !soft;
  const float tau = static_cast<float>(tau_d);
  const int esize = cdtype == 0 ? 4 : 2;
  const int64_t chunks = num_chunks(N);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t g = 0; g < G; ++g) {  // forward_kernel, block (chunk, g)
      float s_m[kChunk], s_inv_z[kChunk];
      int64_t s_am[kChunk];
      int s_sel[kChunk];
      for (int i = 0; i < kChunk; ++i) {  // warp i % kForwardWarps's row i
        const int64_t n = chunk * kChunk + i;
        if (n >= N) {
          s_sel[i] = 0;
          continue;
        }
        const int64_t base = n * G * V + g * V;
        std::array<gq::MaxArg, gq::kLanes> ml, mz;
        for (int l = 0; l < gq::kLanes; ++l) {
          ml[l] = {-INFINITY, V};
          mz[l] = {-INFINITY, V};
          gq::lane_maxargs(logits, ldtype, base, V, n, g, training, seed, l, ml[l], mz[l]);
        }
        gq::MaxArg a = warp_maxarg(ml);
        if (a.i == V) a.i = 0;
        int64_t code = a.i;
        if (training) {
          const gq::MaxArg b = warp_maxarg(mz);
          code = b.i == V ? 0 : b.i;
        }
        Lanes z;
        for (int l = 0; l < gq::kLanes; ++l) z[l] = gq::lane_exp_sum(logits, ldtype, base, V, a.m, l);
        gq::record_row(n, G, g, code, a, warp_sum(z), mask, i, codes, s_m, s_inv_z, s_am, s_sel);
        if (!gather) continue;
        for (int l = 0; l < gq::kLanes; ++l)
          gq::lane_copy_code(as_ptr<const char>(codebook_p), esize, (g * V + code) * D, (n * G + g) * D, D, l,
                             as_ptr<char>(quant_p));
      }
      const int nt = kForwardWarps * 32;
      for (int tid = 0; tid < nt; ++tid)
        gq::chunk_marginals(logits, ldtype, chunk, g, G, V, s_m, s_inv_z, s_am, s_sel, tid, nt, partial);
    }
  }
  if (soft) {  // soft_forward_kernel, blocks of `rows` frames x group g
    const int64_t rows = soft_rows(V);
    std::vector<float> s_p(rows * V);
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t nt = N - n0 < rows ? N - n0 : rows;
        for (int64_t t = 0; t < nt; ++t) {
          float ym;
          float* p = s_p.data() + t * V;
          const float inv_z = gumbel_tempered_row(logits, ldtype, (n0 + t) * G * V + g * V, V, n0 + t, g, tau, seed,
                                                  p, &ym);
          for (int l = 0; l < gq::kLanes; ++l) gq::lane_scale(V, inv_z, l, p);
        }
        for (int64_t i = 0; i < nt * D; ++i) {
          const int64_t t = i / D, k = i % D;
          store_float(as_ptr<void>(quant_p), ((n0 + t) * G + g) * D + k, cdtype,
                      gq::soft_q(s_p.data() + t * V, as_ptr<const void>(codebook_p), cdtype, g, V, D, k));
        }
      }
    }
  }
  for (int64_t j = 0; j < 2 * G * V; ++j) as_ptr<float>(sums_p)[j] = gq::sum_partials(partial, chunks, 2 * G * V, j);
}

// backward_logits_kernel, then soft_codebook_kernel and reduce_chunks_kernel (hard=False in
// training) or backward_codebook_kernel: gumbel_quantize_backward's arguments less the stream.
void gumbel_backward(std::uintptr_t grad_q_p, int gdtype, std::uintptr_t logits_p, int ldtype, std::uintptr_t cbt_p,
                     std::uintptr_t codes_p, std::uintptr_t mask_p, std::uintptr_t w_p, int64_t N, int64_t G,
                     int64_t V, int64_t D, bool training, bool hard, double tau_d, uint64_t seed,
                     std::uintptr_t seed_p, std::uintptr_t grad_logits_p, int cdtype, std::uintptr_t grad_cb_p,
                     std::uintptr_t workspace_p) {
  using namespace gumbel_launch;
  seed = load_seed(as_ptr<const int64_t>(seed_p), seed);
  if (N == 0) return;
  const void* grad_q = as_ptr<const void>(grad_q_p);
  const void* logits = as_ptr<const void>(logits_p);
  const uint8_t* mask = as_ptr<const uint8_t>(mask_p);
  const float* w = as_ptr<const float>(w_p);
  const bool soft = training && !hard;
  const float tau = static_cast<float>(tau_d);
  float* stats = soft ? as_ptr<float>(workspace_p) : nullptr;
  std::vector<float> smem(2 * V + D);
  for (int64_t row = 0; row < N * G; ++row) {  // backward_logits_kernel, warp of row
    const int64_t n = row / G, g = row % G, base = n * G * V + g * V;
    float* s_buf = smem.data();
    float* acc = s_buf + V;
    float* gq_row = acc + V;
    if (training) {
      float ym;
      const float inv_z = gumbel_tempered_row(logits, ldtype, base, V, n, g, tau, seed, s_buf, &ym);
      if (stats != nullptr) {
        stats[row * 2] = ym;
        stats[row * 2 + 1] = inv_z;
      }
      for (int l = 0; l < gq::kLanes; ++l) gq::lane_load(grad_q, gdtype, row * D, D, l, gq_row);
      const float* ct = as_ptr<const float>(cbt_p) + g * D * V;
      Lanes sa;
      for (int l = 0; l < gq::kLanes; ++l) sa[l] = gq::lane_soft_dot(gq_row, ct, V, D, inv_z, l, s_buf, acc);
      const float sa_sum = warp_sum(sa);
      for (int l = 0; l < gq::kLanes; ++l) gq::lane_softmax_grad(s_buf, sa_sum, tau, V, l, acc);
    } else {
      for (int64_t v = 0; v < V; ++v) acc[v] = 0.0f;
    }
    if ((mask == nullptr || mask[n] != 0) && w != nullptr) {
      Lanes part;
      for (int l = 0; l < gq::kLanes; ++l) part[l] = gq::lane_max(logits, ldtype, base, V, l);
      const float m = warp_max(part);
      for (int l = 0; l < gq::kLanes; ++l) part[l] = gq::lane_exp_sum(logits, ldtype, base, V, m, l);
      const float inv_z = 1.0f / warp_sum(part);
      const float* wg = w + g * V;
      for (int l = 0; l < gq::kLanes; ++l) part[l] = gq::lane_probs_dot(logits, ldtype, base, V, m, inv_z, wg, l, s_buf);
      const float pw = warp_sum(part);
      for (int l = 0; l < gq::kLanes; ++l) gq::lane_add_softmax_grad(s_buf, wg, pw, V, l, acc);
    }
    for (int l = 0; l < gq::kLanes; ++l) gq::lane_store(acc, V, base, ldtype, l, as_ptr<void>(grad_logits_p));
  }
  if (soft) {  // soft_codebook_kernel, blocks (chunk, g x codeword tile, dim tile), kSoftThreads threads
    const int64_t chunk_rows = gq::soft_chunk_rows(N, kSoftCbRows);
    const int64_t n_chunks = gq::soft_num_chunks(N, kSoftCbRows);
    float* partial = stats + N * G * 2;
    gq::SoftCbProbs s_p;
    gq::SoftCbGrads s_gq;
    float acc[kSoftThreads][gq::kSoftCbPerLane];
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t v0 = 0; v0 < V; v0 += kSoftCbVars)
          for (int64_t k0 = 0; k0 < D; k0 += kSoftCbDims) {
            const int64_t row_end = (chunk + 1) * chunk_rows < N ? (chunk + 1) * chunk_rows : N;
            std::fill(&acc[0][0], &acc[0][0] + kSoftThreads * gq::kSoftCbPerLane, 0.0f);
            for (int64_t r0 = chunk * chunk_rows; r0 < row_end; r0 += kSoftCbRows) {
              for (unsigned x = 0; x < kSoftThreads; ++x)
                gq::soft_cb_stage(grad_q, gdtype, logits, ldtype, stats, G, g, V, v0, D, k0, r0, row_end, tau, seed, x,
                                  s_p, s_gq);
              for (int x = 0; x < kSoftThreads; ++x)
                gq::soft_cb_accumulate(s_p, s_gq, x / 32, x % 32, acc[x]);
            }
            for (int x = 0; x < kSoftThreads; ++x)
              if (v0 + x / 32 < V)
                gq::soft_cb_store(acc[x], k0, D, x % 32, partial + (chunk * G * V + g * V + v0 + x / 32) * D);
          }
    for (int64_t j = 0; j < G * V * D; ++j)  // reduce_chunks_kernel
      store_float(as_ptr<void>(grad_cb_p), j, cdtype, gq::sum_partials(partial, n_chunks, G * V * D, j));
    return;
  }
  const int64_t* codes = as_ptr<const int64_t>(codes_p);
  std::vector<int64_t> list(kCodebookThreads);
  std::vector<float> acc(D);
  for (int64_t j = 0; j < G * V; ++j) {  // backward_codebook_kernel: codeword j, its frames in order
    const int64_t g = j / V, v = j % V;
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t n0 = 0; n0 < N; n0 += kCodebookThreads) {
      // the ballot: hit counts per warp, then each hit at its warp's offset + its rank in the warp
      int count[kCodebookThreads / 32] = {}, rank[kCodebookThreads / 32] = {}, offset, total;
      for (int64_t n = n0; n < n0 + kCodebookThreads && n < N; ++n) count[(n - n0) / 32] += codes[n * G + g] == v;
      for (int64_t n = n0; n < n0 + kCodebookThreads && n < N; ++n) {
        const int warp = static_cast<int>(n - n0) / 32;
        gq::warp_offsets(count, warp, offset, total);
        if (codes[n * G + g] == v) list[offset + rank[warp]++] = n;
      }
      for (int64_t k = 0; k < D; ++k) gq::add_listed(grad_q, gdtype, list.data(), total, G, g, D, k, acc[k]);
    }
    for (int64_t k = 0; k < D; ++k) store_float(as_ptr<void>(grad_cb_p), j * D + k, cdtype, acc[k]);
  }
}

// rp_quantize_kernel, a warp per stacked row: rp_quantize's arguments less the stream.
void rp_quantize_rows(std::uintptr_t x, int x_dtype, int64_t B, int64_t T, int64_t F, int64_t k, std::uintptr_t proj,
                      std::uintptr_t cb, int cb_dtype, int64_t H, int64_t V, int64_t d, bool layernorm, int metric,
                      std::uintptr_t mask, std::uintptr_t out) {
  using namespace rpq;
  const Problem p = make_problem(x, x_dtype, B, T, F, k, proj, cb, cb_dtype, H, V, d, layernorm, metric, mask, out);
  if (rp_quantize_launch::plan(p.rows, p.smem_per_warp).empty()) return;
  std::vector<float> smem(p.smem_per_warp);
  Lanes part;
  for (int64_t n = 0; n < p.rows; ++n) {
    if (p.mask != nullptr && p.mask[n] == 0) {
      for (int l = 0; l < kWarp; ++l) lane_masked_row(p, n, l);
      continue;
    }
    float* xs = smem.data();
    float* y = p.proj != nullptr ? xs + p.in_dim : xs;
    const int64_t off = stacked_row_offset(n, p.rows_per_seq, p.T, p.F, p.k);
    for (int l = 0; l < kWarp; ++l) lane_stage_row(p, off, l, xs);
    if (p.layernorm) {
      for (int l = 0; l < kWarp; ++l) part[l] = lane_sum(xs, p.in_dim, l);
      const float mean = warp_sum(part) / static_cast<float>(p.in_dim);
      for (int l = 0; l < kWarp; ++l) part[l] = lane_centred_sumsq(xs, p.in_dim, mean, l);
      const float rstd = layernorm_rstd(warp_sum(part), p.in_dim, kLayerNormEps);
      for (int l = 0; l < kWarp; ++l) lane_layernorm(xs, p.in_dim, mean, rstd, l);
    }
    if (p.proj != nullptr)
      for (int l = 0; l < kWarp; ++l) lane_project(p, xs, l, y);
    for (int64_t h = 0; h < p.H; ++h) {
      float* yh = y + h * p.d;
      if (p.metric == kCosine) {
        for (int l = 0; l < kWarp; ++l) part[l] = lane_sumsq(yh, p.d, l);
        const float scale = normalize_scale(warp_sum(part));
        for (int l = 0; l < kWarp; ++l) lane_scale(yh, p.d, scale, l);
      }
      Lanes best;
      std::array<int64_t, kWarp> index;
      for (int l = 0; l < kWarp; ++l) {
        best[l] = -INFINITY;
        index[l] = kNoIndex;
        lane_best_codeword(p, yh, h, l, best[l], index[l]);
      }
      for (int o = kWarp / 2; o > 0; o >>= 1) {
        const Lanes b0 = best;
        const std::array<int64_t, kWarp> i0 = index;
        for (int l = 0; l < kWarp; ++l) merge_best(b0[l ^ o], i0[l ^ o], best[l], index[l]);
      }
      p.out[n * p.H + h] = label_of(index[0]);
    }
  }
}

// ---- contrastive_cuda.cu: a warp per row, its lanes' phases, the butterflies and the vote.
namespace ct = contrastive;

template <class S>
void contrastive_dot_sq(const typename S::T* xr, const typename S::T* t, int64_t D, float& dot, float& sq) {
  Lanes a, b;
  for (int l = 0; l < ct::kWarp; ++l) ct::lane_dot_sq<S>(xr, t, D, l, a[l], b[l]);
  dot = warp_sum(a);
  sq = warp_sum(b);
}

template <class S>
float contrastive_x_sq(const typename S::T* xr, int64_t D) {
  Lanes s;
  for (int l = 0; l < ct::kWarp; ++l) s[l] = ct::lane_sq<S>(xr, D, l);
  return warp_sum(s);
}

// candidate_masked of the .cu, __any_sync as an or over the lanes.
template <class S>
bool contrastive_masked(const ct::Args<S>& a, int64_t j, int64_t jp, float dot, float sq, float dot0, float sq0) {
  if (a.neg_mode == ct::kNegIndex) return j == jp;
  if (a.neg_mode != ct::kNegVector || !(sq == sq0 && dot == dot0)) return false;
  int differ = 0;
  for (int l = 0; l < ct::kWarp; ++l) differ |= ct::lane_rows_differ<S>(a.y + j * a.D, a.y + jp * a.D, a.D, l);
  return !differ;
}

// forward_kernel: contrastive_forward's arguments less the stream.
void contrastive_forward(std::uintptr_t x, std::uintptr_t y, std::uintptr_t neg, int neg_itype, std::uintptr_t pos,
                         int pos_itype, std::uintptr_t loss, std::uintptr_t stats, std::uintptr_t correct, int64_t N,
                         int64_t M, int64_t D, int64_t K, int dtype, double temperature, int neg_mode, int precision) {
  ct::by_dtype(dtype, [&](auto s) {
    using S = decltype(s);
    const ct::Args<S> a =
        ct::make_args<S>(x, y, neg, neg_itype, pos, pos_itype, N, M, D, K, temperature, neg_mode, precision);
    for (int64_t i = 0; i < N; ++i) {
      const typename S::T* xr = a.x + i * D;
      const float nx = ct::clamped_norm(contrastive_x_sq<S>(xr, D));
      const int64_t jp = ct::candidate_index(a.neg, a.neg_itype, a.pos, a.pos_itype, i, 0, a.K, a.M);
      ct::RowState st = ct::row_init();
      float dot0 = 0.0f, sq0 = 0.0f;
      for (int64_t k = 0; k <= a.K; ++k) {
        const int64_t j = k == 0 ? jp : ct::candidate_index(a.neg, a.neg_itype, a.pos, a.pos_itype, i, k, a.K, a.M);
        float dot, sq;
        contrastive_dot_sq<S>(xr, a.y + j * D, D, dot, sq);
        if (k == 0) {
          dot0 = dot;
          sq0 = sq;
        }
        ct::push_candidate(a, st, k, k != 0 && contrastive_masked(a, j, jp, dot, sq, dot0, sq0), dot, sq, nx);
      }
      as_ptr<float>(loss)[i] = ct::row_loss(st);
      ct::save_row_stats(st, as_ptr<float>(stats), i, N);
      as_ptr<bool>(correct)[i] = ct::row_correct(st);
    }
  });
}

// backward_rows_kernel: contrastive_backward_rows's arguments less the stream (the atomics
// of the non-deterministic grad y as plain adds, row after row).
void contrastive_backward_rows(std::uintptr_t grad_rows, std::uintptr_t x, std::uintptr_t y, std::uintptr_t neg,
                               int neg_itype, std::uintptr_t pos, int pos_itype, std::uintptr_t stats_p,
                               std::uintptr_t grad_x, std::uintptr_t alpha_p, std::uintptr_t beta_p,
                               std::uintptr_t gy_acc_p, int64_t N, int64_t M, int64_t D, int64_t K, int dtype,
                               double temperature, int neg_mode, int precision) {
  ct::by_dtype(dtype, [&](auto s) {
    using S = decltype(s);
    const ct::Args<S> a =
        ct::make_args<S>(x, y, neg, neg_itype, pos, pos_itype, N, M, D, K, temperature, neg_mode, precision);
    float* alpha = as_ptr<float>(alpha_p);
    float* beta = as_ptr<float>(beta_p);
    float* gy_acc = as_ptr<float>(gy_acc_p);
    const int64_t K1 = K + 1;
    for (int64_t i = 0; i < N; ++i) {
      const typename S::T* xr = a.x + i * D;
      const float nx_sq = contrastive_x_sq<S>(xr, D);
      const float nx = ct::clamped_norm(nx_sq);
      const int64_t jp = ct::candidate_index(a.neg, a.neg_itype, a.pos, a.pos_itype, i, 0, a.K, a.M);
      const float go = as_ptr<const float>(grad_rows)[i];
      const ct::RowStats rs = ct::load_row_stats(as_ptr<const float>(stats_p), i, N);
      float sum_gc = 0.0f, dot0 = 0.0f, sq0 = 0.0f;
      for (int64_t k = 0; k < K1; ++k) {
        const int64_t j = k == 0 ? jp : ct::candidate_index(a.neg, a.neg_itype, a.pos, a.pos_itype, i, k, a.K, a.M);
        const typename S::T* t = a.y + j * D;
        float dot, sq;
        contrastive_dot_sq<S>(xr, t, D, dot, sq);
        if (k == 0) {
          dot0 = dot;
          sq0 = sq;
        }
        float al, be;
        ct::candidate_coeffs(a, k, k != 0 && contrastive_masked(a, j, jp, dot, sq, dot0, sq0), dot, sq, nx, rs,
                             go, al, be, sum_gc);
        alpha[i * K1 + k] = al;
        if (beta) beta[i * K1 + k] = be;
        if (gy_acc && (al != 0.0f || be != 0.0f))
          for (int64_t d = 0; d < D; ++d) gy_acc[j * D + d] += al * S::load(xr[d]) + be * S::load(t[d]);
      }
      for (int l = 0; l < ct::kWarp; ++l)
        ct::lane_grad_x(a, i, alpha, ct::x_self_coefficient(sum_gc, nx_sq), l, as_ptr<typename S::T>(grad_x));
    }
  });
}

// segments_kernel: contrastive_backward_segments's arguments less the stream.
void contrastive_backward_segments(std::uintptr_t x, std::uintptr_t y, std::uintptr_t alpha, std::uintptr_t beta,
                                   std::uintptr_t order_p, std::uintptr_t offsets_p, std::uintptr_t grad_y, int64_t M,
                                   int64_t D, int64_t K, int dtype) {
  ct::by_dtype(dtype, [&](auto s) {
    using S = decltype(s);
    using T = typename S::T;
    const int64_t* order = as_ptr<const int64_t>(order_p);
    const int64_t* offsets = as_ptr<const int64_t>(offsets_p);
    for (int64_t j = 0; j < M; ++j) {
      const float bsum = ct::segment_beta_sum(as_ptr<const float>(beta), order, offsets[j], offsets[j + 1]);
      for (int l = 0; l < ct::kWarp; ++l)
        ct::lane_segment_grad<S>(as_ptr<const T>(x), as_ptr<const T>(y), as_ptr<const float>(alpha), order,
                                 offsets[j], offsets[j + 1], j, D, K + 1, bsum, l, as_ptr<T>(grad_y));
    }
  });
}

// ---- apply_mask_cuda.cu: every thread of each launch (the plan's grid x threads).
template <class F>
void apply_mask_by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case static_cast<int>(DType::f32): return f(F32{});
    case static_cast<int>(DType::f16): return f(F16{});
    case static_cast<int>(DType::bf16): return f(BF16{});
    default: throw std::invalid_argument("apply_mask: unknown dtype code");
  }
}

// apply_mask_forward_kernel: apply_mask_forward's arguments less the stream (a seed tensor's
// pointer is a CPU tensor's here; every thread loads the key as the kernel's do).
void apply_mask_forward(std::uintptr_t x, int64_t sxb, int64_t sxt, int64_t sxd, std::uintptr_t out, int64_t sob,
                        int64_t sot, int64_t sod, std::uintptr_t mask, std::uintptr_t fill, int dtype, int64_t B,
                        int64_t T, int64_t D, float std, uint64_t seed, std::uintptr_t seed_ptr) {
  if (B == 0 || T == 0 || D == 0) return;
  const apply_mask::Strides sx{sxb, sxt, sxd}, so{sob, sot, sod};
  const Launch l = apply_mask_launch::forward(B, T, D)[0];
  const int64_t work = B * T * ((D + 3) / 4);
  apply_mask_by_dtype(dtype, [&](auto s) {
    using S = decltype(s);
    using E = typename S::T;
    for (int64_t i = 0; i < l.grid_x * l.threads; ++i)
      if (i < work)
        apply_mask::forward_item<S>(as_ptr<const E>(x), sx, as_ptr<E>(out), so, as_ptr<const uint8_t>(mask),
                                    as_ptr<const E>(fill), T, D, std,
                                    load_seed(as_ptr<const int64_t>(seed_ptr), seed), x == out, i);
  });
}

// apply_mask_backward_kernel then apply_mask_sum_partials_kernel: apply_mask_backward's
// arguments less the stream.
void apply_mask_backward(std::uintptr_t g, int64_t sgb, int64_t sgt, int64_t sgd, std::uintptr_t gx,
                         std::uintptr_t mask, int dtype, int64_t B, int64_t T, int64_t D, std::uintptr_t partial,
                         std::uintptr_t gfill) {
  if (B == 0 || T == 0 || D == 0) return;
  const apply_mask::Strides sg{sgb, sgt, sgd};
  const int64_t n = B * T, chunks = (n + apply_mask::kGradChunk - 1) / apply_mask::kGradChunk;
  const Launches plan = apply_mask_launch::backward(B, T, D, gfill != 0, apply_mask::kGradChunk);
  apply_mask_by_dtype(dtype, [&](auto s) {
    using S = decltype(s);
    using E = typename S::T;
    for (int64_t c = 0; c < plan[0].grid_x; ++c)
      for (int64_t d = 0; d < plan[0].grid_y * plan[0].threads; ++d)
        if (d < D)
          apply_mask::backward_item<S>(as_ptr<const E>(g), sg, as_ptr<E>(gx), as_ptr<const uint8_t>(mask), T, D, n,
                                       as_ptr<float>(partial), c, d);
  });
  if (plan.size() < 2) return;
  for (int64_t d = 0; d < plan[1].grid_x * plan[1].threads; ++d)
    if (d < D) as_ptr<float>(gfill)[d] = apply_mask::sum_partials(as_ptr<const float>(partial), chunks, D, d);
}

// ---- masked_prediction_cuda.cu: each block's threads phase by phase (the barriers).
// dot_tile<target> of the .cu for every thread of a block: the logit tile into s.z, or (target,
// kGumbel) the target-logit tile into s.q.
void mpl_dot_tile(const mpl::Args& a, const mpl::Targets& t, mpl::Smem& s, int64_t h, int64_t n0, int64_t v0,
                  bool target, uint64_t seed) {
  const int64_t hr = target ? (t.Hy == 1 ? 0 : h) : (a.Hx == 1 ? 0 : h);
  const int64_t K = target ? t.Dt : a.D;
  float tile[mpl::THREADS][2][2] = {};
  for (int64_t k0 = 0; k0 < K; k0 += mpl::BK) {
    for (unsigned tid = 0; tid < mpl::THREADS; ++tid) {
      if (target)
        mpl::stage_target_slice(a, t, s, h, hr, n0, v0, k0, tid);
      else
        mpl::stage_slice(a, s, h, hr, n0, v0, k0, tid);
    }
    for (unsigned tid = 0; tid < mpl::THREADS; ++tid) mpl::fma_slice(s, tile[tid], tid);
  }
  for (unsigned tid = 0; tid < mpl::THREADS; ++tid) {
    if (target)
      mpl::write_target_tile(a, t, s, tile[tid], h, n0, v0, seed, tid);
    else
      mpl::write_tile(a, s, tile[tid], h, v0, tid);
  }
}

// dlogit_tile<mode> of the .cu for every thread of a block.
void mpl_dlogit_tile(const mpl::Args& a, const mpl::Targets& t, mpl::Smem& s, int64_t h, int64_t n0, int64_t v0,
                     const mpl::Saved& sv, const float* grad, float* dq, int mode) {
  for (unsigned tid = 0; tid < mpl::THREADS; ++tid) {
    if (mode == mpl::kGumbel)
      mpl::dlogit_items_gumbel(a, t, s, h, n0, v0, sv, grad, tid);
    else
      mpl::dlogit_items(a, s, h, n0, v0, sv, grad, dq, tid, mode == mpl::kSoft);
  }
}

// forward_kernel<mode>, then with a gradient dx_kernel<mode> and dw_kernel<mode>, every block.
void mpl_kernels(int mode, const mpl::Args& a, const mpl::Targets& gt, const mpl::Saved& sv, const float* grad,
                 float* loss, uint8_t* top, float* dx, float* dw, float* db, float* dq, float* dyh, float* dc) {
  using namespace mpl;
  const int64_t N = a.N, H = a.H, Hx = a.Hx, V = a.V, D = a.D;
  const bool soft = mode == kSoft, gumbel = mode == kGumbel;
  const uint64_t seed = gumbel ? load_seed(gt.seed_ptr, gt.seed) : 0;
  const Launches plan = masked_prediction_launch::plan(N, H, Hx, V, D, grad != nullptr);
  auto s = std::make_unique<Smem>();
  for (int64_t bx = 0; bx < plan[0].grid_x; ++bx)
    for (int64_t h = 0; h < plan[0].grid_y; ++h) {  // forward_kernel, block (row block, head)
      const int64_t n0 = bx * BM;
      RowState st[BM], tst[BM];
      float acc[BM][3] = {};
      float m_t[BM] = {}, l_t[BM] = {};
      int64_t t[BM];
      for (int r = 0; r < BM; ++r) {
        st[r] = row_init(mode != kHard);
        tst[r] = row_init(true);
        t[r] = mode == kHard && n0 + r < N ? a.targets[(n0 + r) * H + h] : -1;
      }
      if (gumbel) {
        for (int64_t v0 = 0; v0 < V; v0 += BV) {
          mpl_dot_tile(a, gt, *s, h, n0, v0, true, seed);
          for (int r = 0; r < BM; ++r) fold_target_stats(*s, tst[r], r, v0, V);
        }
        for (int r = 0; r < BM; ++r) {
          m_t[r] = tst[r].m;
          l_t[r] = row_denominator(tst[r]);
        }
      }
      for (int64_t v0 = 0; v0 < V; v0 += BV) {
        if (soft)
          for (unsigned tid = 0; tid < THREADS; ++tid) stage_targets(a, *s, h, n0, v0, tid);
        if (gumbel) mpl_dot_tile(a, gt, *s, h, n0, v0, true, seed);
        mpl_dot_tile(a, gt, *s, h, n0, v0, false, 0);
        for (int r = 0; r < BM; ++r) {
          if (gumbel)
            fold_tile_gumbel(*s, st[r], acc[r], r, v0, V, m_t[r], l_t[r]);
          else
            fold_tile(*s, st[r], r, v0, V, t[r], soft);
        }
      }
      for (int r = 0; r < BM; ++r) {
        if (n0 + r >= N) continue;
        if (gumbel)
          gumbel_row_out(a, st[r], acc[r], m_t[r], l_t[r], n0 + r, h, loss, sv, top);
        else
          forward_row_out(a, st[r], n0 + r, h, soft || t[r] >= 0, loss, sv, top);
      }
    }
  if (grad == nullptr) return;
  float acc[THREADS][BD / 8];
  for (int64_t bx = 0; bx < plan[1].grid_x; ++bx)  // dx_kernel, block (row block, feature block, head of x)
    for (int64_t by = 0; by < plan[1].grid_y; ++by)
      for (int64_t hx = 0; hx < plan[1].grid_z; ++hx) {
        const int64_t n0 = bx * BM, d0 = by * BD;
        std::fill(&acc[0][0], &acc[0][0] + THREADS * (BD / 8), 0.0f);
        const int64_t heads = Hx == 1 ? H : 1;
        for (int64_t i = 0; i < heads; ++i) {
          const int64_t h = hx + i;
          for (int64_t v0 = 0; v0 < V; v0 += BV) {
            if (gumbel) mpl_dot_tile(a, gt, *s, h, n0, v0, true, seed);
            mpl_dot_tile(a, gt, *s, h, n0, v0, false, 0);
            mpl_dlogit_tile(a, gt, *s, h, n0, v0, sv, grad, by == 0 ? dq : nullptr, mode);
            for (int tid = 0; tid < THREADS; ++tid) {
              dx_tile(a, *s, acc[tid], h, v0, d0, tid / 8, tid % 8);
              if (gumbel && by == 0 && n0 + tid / 8 < N) dy_tile(a, gt, *s, dyh, h, v0, n0 + tid / 8, tid / 8, tid % 8);
            }
          }
        }
        for (int tid = 0; tid < THREADS; ++tid) {
          const int64_t n = n0 + tid / 8;
          if (n < N) store_features(acc[tid], dx, (n * Hx + hx) * D, d0, tid % 8, D);
        }
      }
  float dbias[THREADS];
  for (int64_t bx = 0; bx < plan[2].grid_x; ++bx)  // dw_kernel, block (class block, feature block, head)
    for (int64_t by = 0; by < plan[2].grid_y; ++by)
      for (int64_t h = 0; h < plan[2].grid_z; ++h) {
        const int64_t v0 = bx * BV, d0 = by * BD, hx = Hx == 1 ? 0 : h, hy = gt.Hy == 1 ? 0 : h;
        std::fill(&acc[0][0], &acc[0][0] + THREADS * (BD / 8), 0.0f);
        std::fill(dbias, dbias + THREADS, 0.0f);
        for (int64_t n0 = 0; n0 < N; n0 += BM) {
          if (gumbel) mpl_dot_tile(a, gt, *s, h, n0, v0, true, seed);
          mpl_dot_tile(a, gt, *s, h, n0, v0, false, 0);
          mpl_dlogit_tile(a, gt, *s, h, n0, v0, sv, grad, nullptr, mode);
          for (int tid = 0; tid < THREADS; ++tid) {
            dw_tile(a, *s, acc[tid], dbias[tid], hx, n0, d0, tid / 8, tid % 8);
            if (gumbel && by == 0 && v0 + tid / 8 < V)
              dc_tile(a, gt, *s, dc, h, hy, n0, v0 + tid / 8, tid / 8, tid % 8);
          }
        }
        for (int tid = 0; tid < THREADS; ++tid) {
          const int64_t v = v0 + tid / 8;
          if (v >= V) continue;
          store_features(acc[tid], dw, (h * V + v) * D, d0, tid % 8, D);
          if (db != nullptr && by == 0 && tid % 8 == 0) db[h * V + v] = dbias[tid] / a.scale;
        }
      }
}

// masked_prediction_forward_backward less the stream (soft: the kSoft instantiations).
void masked_prediction(std::uintptr_t x, int x_dtype, std::uintptr_t w, int w_dtype, std::uintptr_t bias, int b_dtype,
                       std::uintptr_t targets, std::uintptr_t q, int q_dtype, std::uintptr_t grad, int64_t N,
                       int64_t H, int64_t Hx, int64_t V, int64_t D, double scale, double eps, std::uintptr_t loss,
                       std::uintptr_t row_max, std::uintptr_t log_l, std::uintptr_t mass, std::uintptr_t top,
                       std::uintptr_t dx, std::uintptr_t dw, std::uintptr_t db, std::uintptr_t dq) {
  if (N == 0) return;
  mpl::Args a;
  mpl::Saved sv;
  mpl::host_args(x, x_dtype, w, w_dtype, bias, b_dtype, targets, q, q_dtype, N, H, Hx, V, D, scale, eps, row_max,
                 log_l, mass, &a, &sv);
  mpl_kernels(q != 0 ? mpl::kSoft : mpl::kHard, a, mpl::Targets{}, sv, as_ptr<const float>(grad), as_ptr<float>(loss),
              as_ptr<uint8_t>(top), as_ptr<float>(dx), as_ptr<float>(dw), as_ptr<float>(db), as_ptr<float>(dq),
              nullptr, nullptr);
}

// masked_prediction_gumbel_forward_backward less the stream (the kGumbel instantiations; seed_ptr
// a CPU int64 here).
void masked_prediction_gumbel(std::uintptr_t x, int x_dtype, std::uintptr_t w, int w_dtype, std::uintptr_t bias,
                              int b_dtype, std::uintptr_t y, std::uintptr_t c, int64_t Hy, int64_t Dt,
                              std::uintptr_t seed_ptr, double tgt_scale, double noise_scale, std::uintptr_t grad,
                              int64_t N, int64_t H, int64_t Hx, int64_t V, int64_t D, double scale, double eps,
                              std::uintptr_t loss, std::uintptr_t row_max, std::uintptr_t log_l, std::uintptr_t mass,
                              std::uintptr_t m_t, std::uintptr_t l_t, std::uintptr_t zbest, std::uintptr_t dbar,
                              std::uintptr_t top,
                              std::uintptr_t dx, std::uintptr_t dw, std::uintptr_t db, std::uintptr_t dyh,
                              std::uintptr_t dc) {
  if (N == 0) return;
  mpl::Args a;
  mpl::Targets gt;
  mpl::Saved sv;
  mpl::host_args(x, x_dtype, w, w_dtype, bias, b_dtype, 0, 0, 0, N, H, Hx, V, D, scale, eps, row_max, log_l, 0, &a,
                 &sv);
  mpl::gumbel_args(y, c, Hy, Dt, tgt_scale, noise_scale, seed_ptr, mass, m_t, l_t, zbest, dbar, &gt, &sv);
  mpl_kernels(mpl::kGumbel, a, gt, sv, as_ptr<const float>(grad), as_ptr<float>(loss), as_ptr<uint8_t>(top),
              as_ptr<float>(dx), as_ptr<float>(dw), as_ptr<float>(db), nullptr, as_ptr<float>(dyh),
              as_ptr<float>(dc));
}

// tempered_weight over arrays, as soft_forward_kernel and soft_codebook_kernel call it.
void gumbel_tempered_weight(std::uintptr_t y, std::uintptr_t ym, int64_t n, float tau, std::uintptr_t out) {
  for (int64_t i = 0; i < n; ++i)
    as_ptr<float>(out)[i] = gq::tempered_weight(as_ptr<const float>(y)[i], as_ptr<const float>(ym)[i], tau);
}

}  // namespace

void bind_testing(py::module_& m) {
  py::module_ t = m.def_submodule("_testing", "The CUDA kernels' device code run on the host (tests only).");
  t.def("masking_kernels", &masking_kernels, py::arg("lengths"), py::arg("padding_mask"), py::arg("B"), py::arg("T"),
        py::arg("mask_prob"), py::arg("mask_length"), py::arg("vmin"), py::arg("thresholds"), py::arg("n_thresholds"),
        py::arg("min_masks"), py::arg("require_same_masks"), py::arg("mask_dropout"), py::arg("hf_style"),
        py::arg("seed"), py::arg("seed_ptr"), py::arg("no_overlap"), py::arg("min_space"), py::arg("n_cap"),
        py::arg("r_cap"), py::arg("threads"), py::arg("out"));
  t.def("negatives_prefix", &negatives_prefix, py::arg("mask"), py::arg("padding_mask"), py::arg("from_masked_only"),
        py::arg("end"), py::arg("first"), py::arg("row_base"), py::arg("row_end"), py::arg("threads"));
  t.def("negatives_one_pass", &negatives_one_pass, py::arg("mask"), py::arg("padding_mask"),
        py::arg("from_masked_only"), py::arg("B"), py::arg("T"), py::arg("K"), py::arg("Kc"), py::arg("hf_layout"),
        py::arg("seed"), py::arg("seed_ptr"), py::arg("n_rows"), py::arg("out"));
  t.def("negatives_two_pass", &negatives_two_pass, py::arg("mask"), py::arg("padding_mask"),
        py::arg("from_masked_only"), py::arg("B"), py::arg("T"), py::arg("K"), py::arg("Kc"), py::arg("hf_layout"),
        py::arg("seed"), py::arg("seed_ptr"), py::arg("n_rows"), py::arg("out"));
  t.def("gumbel_num_chunks", &gumbel_launch::num_chunks, py::arg("n"));
  t.def("gumbel_soft_workspace", &gq::soft_workspace_floats, py::arg("n"), py::arg("groups"), py::arg("num_vars"),
        py::arg("dim"));
  t.def("gumbel_forward", &gumbel_forward, py::arg("logits"), py::arg("ldtype"), py::arg("codebook"),
        py::arg("cdtype"), py::arg("n"), py::arg("groups"), py::arg("num_vars"), py::arg("dim"), py::arg("training"),
        py::arg("hard"), py::arg("tau"), py::arg("seed"), py::arg("seed_ptr"), py::arg("mask"), py::arg("quantized"),
        py::arg("codes"), py::arg("partial"), py::arg("sums"));
  t.def("gumbel_backward", &gumbel_backward, py::arg("grad_q"), py::arg("gdtype"), py::arg("logits"),
        py::arg("ldtype"), py::arg("codebook_t"), py::arg("codes"), py::arg("mask"), py::arg("w"), py::arg("n"),
        py::arg("groups"), py::arg("num_vars"), py::arg("dim"), py::arg("training"), py::arg("hard"), py::arg("tau"),
        py::arg("seed"), py::arg("seed_ptr"), py::arg("grad_logits"), py::arg("cdtype"), py::arg("grad_codebook"),
        py::arg("workspace"));
  t.def("rp_quantize", &rp_quantize_rows, py::arg("x"), py::arg("x_dtype"), py::arg("B"), py::arg("T"), py::arg("F"),
        py::arg("k"), py::arg("proj"), py::arg("codebooks"), py::arg("cb_dtype"), py::arg("H"), py::arg("V"),
        py::arg("d"), py::arg("layernorm"), py::arg("metric"), py::arg("mask"), py::arg("out"));
  t.def("contrastive_forward", &contrastive_forward, py::arg("x"), py::arg("y"), py::arg("neg"),
        py::arg("neg_itype"), py::arg("pos"), py::arg("pos_itype"), py::arg("loss"), py::arg("stats"),
        py::arg("correct"), py::arg("N"), py::arg("M"), py::arg("D"), py::arg("K"), py::arg("dtype"),
        py::arg("temperature"), py::arg("neg_mode"), py::arg("precision"));
  t.def("contrastive_backward_rows", &contrastive_backward_rows, py::arg("grad_rows"), py::arg("x"), py::arg("y"),
        py::arg("neg"), py::arg("neg_itype"), py::arg("pos"), py::arg("pos_itype"), py::arg("stats"),
        py::arg("grad_x"), py::arg("alpha"), py::arg("beta"), py::arg("gy_acc"), py::arg("N"), py::arg("M"),
        py::arg("D"), py::arg("K"), py::arg("dtype"), py::arg("temperature"), py::arg("neg_mode"),
        py::arg("precision"));
  t.def("contrastive_backward_segments", &contrastive_backward_segments, py::arg("x"), py::arg("y"),
        py::arg("alpha"), py::arg("beta"), py::arg("order"), py::arg("offsets"), py::arg("grad_y"), py::arg("M"),
        py::arg("D"), py::arg("K"), py::arg("dtype"));
  t.def("apply_mask_forward", &apply_mask_forward, py::arg("x"), py::arg("sxb"), py::arg("sxt"), py::arg("sxd"),
        py::arg("out"), py::arg("sob"), py::arg("sot"), py::arg("sod"), py::arg("mask"), py::arg("fill"),
        py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("D"), py::arg("std"), py::arg("seed"),
        py::arg("seed_ptr"));
  t.def("apply_mask_backward", &apply_mask_backward, py::arg("grad"), py::arg("sgb"), py::arg("sgt"), py::arg("sgd"),
        py::arg("grad_x"), py::arg("mask"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("D"),
        py::arg("partial"), py::arg("grad_fill"));
  t.attr("apply_mask_grad_chunk") = apply_mask::kGradChunk;
  t.def("masked_prediction", &masked_prediction, py::arg("x"), py::arg("x_dtype"), py::arg("w"), py::arg("w_dtype"),
        py::arg("bias"), py::arg("b_dtype"), py::arg("targets"), py::arg("q"), py::arg("q_dtype"), py::arg("grad"),
        py::arg("N"), py::arg("H"), py::arg("Hx"), py::arg("V"), py::arg("D"), py::arg("scale"), py::arg("eps"),
        py::arg("loss"), py::arg("row_max"), py::arg("log_l"), py::arg("mass"), py::arg("top"), py::arg("dx"),
        py::arg("dw"), py::arg("db"), py::arg("dq"));
  t.def("masked_prediction_gumbel", &masked_prediction_gumbel, py::arg("x"), py::arg("x_dtype"), py::arg("w"),
        py::arg("w_dtype"), py::arg("bias"), py::arg("b_dtype"), py::arg("y"), py::arg("c"), py::arg("Hy"),
        py::arg("Dt"), py::arg("seed_ptr"), py::arg("tgt_scale"), py::arg("noise_scale"), py::arg("grad"),
        py::arg("N"), py::arg("H"), py::arg("Hx"), py::arg("V"), py::arg("D"), py::arg("scale"), py::arg("eps"),
        py::arg("loss"), py::arg("row_max"), py::arg("log_l"), py::arg("mass"), py::arg("m_t"), py::arg("l_t"),
        py::arg("zbest"), py::arg("dbar"), py::arg("top"), py::arg("dx"), py::arg("dw"), py::arg("db"), py::arg("dy"),
        py::arg("dc"));
  t.def("gumbel_tempered_weight", &gumbel_tempered_weight, py::arg("y"), py::arg("ym"), py::arg("n"), py::arg("tau"),
        py::arg("out"));
}

}  // namespace sslfast
