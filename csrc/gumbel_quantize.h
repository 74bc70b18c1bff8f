// Gumbel-softmax vector quantizer: the per-element and per-row math shared by the C++ CPU
// kernels (gumbel_quantize_cpu.cpp) and the CUDA kernels (gumbel_quantize_cuda.cu).
//
// Layout: logits (N, G*V), codebook (G*V, d), row (n, g) = logits[n, g*V:(g+1)*V].
// The Gumbel noise of logits element (n, pos) is word pos % 4 of
// philox(c0 = pos / 4, c1 = n, c2 = Stream::GUMBEL, c3 = 0): one Philox call serves four
// consecutive positions, on every backend (sslfast/reference/gumbel_quantize.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "sslfast/common.h"
#include "sslfast/dtype.h"
#include "sslfast/launch.h"
#include "sslfast/philox.h"

namespace sslfast {
namespace gq {

constexpr uint32_t kStreamGumbel = 32;  // sslfast.random.Stream.GUMBEL
// 2^-24: excludes u == 0 (tl.rand's mapping returns it) and u == 1; 1 - 2^-24 is the
// largest float below 1, so the clamp is exact in every language.
constexpr float kULo = 5.9604644775390625e-08f;

// Gumbel(0, 1) from one Philox word. The two logs run in double and round once to float:
// float log implementations differ by an ulp between glibc, CUDA, Triton and torch, and a
// different ulp in the noise could flip an argmax between near-equal candidates.
SSLFAST_HD float gumbel_from_word(uint32_t w) {
  const double u = static_cast<double>(uint_to_open_uniform(w, kULo));
  return static_cast<float>(-log(-log(u)));
}

SSLFAST_HD float gumbel_at(uint64_t seed, int64_t row, int64_t pos) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(pos >> 2), static_cast<uint32_t>(row), kStreamGumbel, 0u,
                                  seed);
  return gumbel_from_word(philox_word(r, pos & 3));
}

// Running (max, first argmax) of a row: a later equal value never replaces the first.
struct MaxArg {
  float m;
  int64_t i;
};

SSLFAST_HD void maxarg_update(MaxArg& acc, float v, int64_t i) {
  if (v > acc.m || (v == acc.m && i < acc.i)) {
    acc.m = v;
    acc.i = i;
  }
}

// Gradient of one logit through softmax(y), y = x / scale_div: s * (a - sum(s a)) / scale_div.
SSLFAST_HD float softmax_grad(float s, float a, float sa, float scale_div) { return s * (a - sa) / scale_div; }

// Soft quantization (hard=False): one unnormalised weight of softmax((l + g) / tau) given the
// row maximum ym of l + g. Subtracting the max before the division keeps it finite for tiny
// tau and logits near the fp32 limit (the reference does the same).
SSLFAST_HD float tempered_weight(float y, float ym, float tau) { return expf((y - ym) / tau); }

// Soft codebook gradient plan: grad_codebook[g*V + v] = sum_n p[n, g, v] grad_q[n, g] is summed
// over fixed chunks of frames, each chunk into its own (G*V, d) fp32 partial, and the partials
// are added in chunk order. The chunks depend on N only (not on threads or blocks), so the
// sum is deterministic; at most kSoftMaxChunks partials bound the extra memory, and a chunk
// is a multiple of `align` frames (the kernel's row tile).
constexpr int64_t kSoftMinChunkRows = 64;
constexpr int64_t kSoftMaxChunks = 32;

SSLFAST_HD int64_t soft_chunk_rows(int64_t N, int64_t align) {
  int64_t rows = (N + kSoftMaxChunks - 1) / kSoftMaxChunks;
  rows = rows < kSoftMinChunkRows ? kSoftMinChunkRows : rows;
  return (rows + align - 1) / align * align;
}

SSLFAST_HD int64_t soft_num_chunks(int64_t N, int64_t align) {
  const int64_t rows = soft_chunk_rows(N, align);
  return (N + rows - 1) / rows;
}

// Floats of the CUDA soft backward's workspace: (N, G, 2) row statistics, then the chunk
// partials of soft_codebook_kernel.
SSLFAST_HD int64_t soft_workspace_floats(int64_t N, int64_t G, int64_t V, int64_t D) {
  return N * G * 2 + soft_num_chunks(N, gumbel_launch::kSoftCbRows) * G * V * D;
}

// ---- The CUDA kernels' per-thread phases (gumbel_quantize_cuda.cu). A warp owns a row (n, g)
// of V logits from `base`; lane `lane` takes v = lane, lane + 32, ...; the kernels reduce the
// lanes' results with shuffles between the phases. csrc/testing_cpu.cpp runs them for every
// lane on the host.
constexpr int kLanes = 32;

// forward_kernel: the lane's running (max, first argmax) of the logits (ml) and, in training,
// of logits + noise (mz).
SSLFAST_HD void lane_maxargs(const void* logits, int ldtype, int64_t base, int64_t V, int64_t n, int64_t g,
                             bool training, uint64_t seed, int lane, MaxArg& ml, MaxArg& mz) {
  for (int64_t v = lane; v < V; v += kLanes) {
    const float l = load_float(logits, base + v, ldtype);
    maxarg_update(ml, l, v);
    if (training) maxarg_update(mz, l + gumbel_at(seed, n, g * V + v), v);
  }
}

// The lane's max of the row's logits.
SSLFAST_HD float lane_max(const void* logits, int ldtype, int64_t base, int64_t V, int lane) {
  float m = -INFINITY;
  for (int64_t v = lane; v < V; v += kLanes) m = fmaxf(m, load_float(logits, base + v, ldtype));
  return m;
}

// The lane's share of the softmax normaliser sum_v exp(l_v - m).
SSLFAST_HD float lane_exp_sum(const void* logits, int ldtype, int64_t base, int64_t V, float m, int lane) {
  float z = 0.0f;
  for (int64_t v = lane; v < V; v += kLanes) z += expf(load_float(logits, base + v, ldtype) - m);
  return z;
}

// forward_kernel (hard): the lane's share of copying codebook row `src` to output row `dst`
// (D elements of esize bytes).
SSLFAST_HD void lane_copy_code(const char* codebook, int esize, int64_t src, int64_t dst, int64_t D, int lane,
                               char* quant) {
  if (esize == 4) {
    const float* s = reinterpret_cast<const float*>(codebook);
    float* q = reinterpret_cast<float*>(quant);
    for (int64_t k = lane; k < D; k += kLanes) q[dst + k] = s[src + k];
  } else {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(codebook);
    uint16_t* q = reinterpret_cast<uint16_t*>(quant);
    for (int64_t k = lane; k < D; k += kLanes) q[dst + k] = s[src + k];
  }
}

// forward_kernel after its barrier, thread `tid` of `nt`: for its columns v of group g, the
// chunk's soft (softmax) and hard (argmax) marginals over the selected frames, in frame order,
// into the chunk's partial. m, inv_z, am, sel: each frame's row max, 1 / normaliser, argmax
// and selection.
SSLFAST_HD void chunk_marginals(const void* logits, int ldtype, int64_t chunk, int64_t g, int64_t G, int64_t V,
                                const float* m, const float* inv_z, const int64_t* am, const int* sel, unsigned tid,
                                unsigned nt, float* partial) {
  const int64_t GV = G * V;
  for (int64_t v = tid; v < V; v += nt) {
    float acc_p = 0.0f;
    float acc_c = 0.0f;
    for (int i = 0; i < gumbel_launch::kChunk; ++i) {
      if (!sel[i]) continue;
      const int64_t n = chunk * gumbel_launch::kChunk + i;
      acc_p += expf(load_float(logits, n * GV + g * V + v, ldtype) - m[i]) * inv_z[i];
      acc_c += am[i] == v ? 1.0f : 0.0f;
    }
    partial[(chunk * 2 + 0) * GV + g * V + v] = acc_p;
    partial[(chunk * 2 + 1) * GV + g * V + v] = acc_c;
  }
}

// Element j of the sum of n_chunks partials of `width` floats, added in chunk order.
SSLFAST_HD float sum_partials(const float* partial, int64_t n_chunks, int64_t width, int64_t j) {
  float acc = 0.0f;
  for (int64_t c = 0; c < n_chunks; ++c) acc += partial[c * width + j];
  return acc;
}

// Soft rows, first phase: buf[v] = l_v + g_v (the Gumbel-noised logits); returns the lane's max.
SSLFAST_HD float lane_noisy_logits(const void* logits, int ldtype, int64_t base, int64_t V, int64_t n, int64_t g,
                                   uint64_t seed, int lane, float* buf) {
  float m = -INFINITY;
  for (int64_t v = lane; v < V; v += kLanes) {
    const float y = load_float(logits, base + v, ldtype) + gumbel_at(seed, n, g * V + v);
    buf[v] = y;
    m = fmaxf(m, y);
  }
  return m;
}

// Second phase, given the row max ym: buf[v] = tempered_weight(buf[v], ym, tau); returns the
// lane's sum of the weights.
SSLFAST_HD float lane_tempered_weights(int64_t V, float ym, float tau, int lane, float* buf) {
  float z = 0.0f;
  for (int64_t v = lane; v < V; v += kLanes) {
    const float e = tempered_weight(buf[v], ym, tau);
    buf[v] = e;
    z += e;
  }
  return z;
}

// buf[v] *= s over the lane's v.
SSLFAST_HD void lane_scale(int64_t V, float s, int lane, float* buf) {
  for (int64_t v = lane; v < V; v += kLanes) buf[v] *= s;
}

// out[k] = element off + k of src (dtype) over the lane's k < len.
SSLFAST_HD void lane_load(const void* src, int dtype, int64_t off, int64_t len, int lane, float* out) {
  for (int64_t k = lane; k < len; k += kLanes) out[k] = load_float(src, off + k, dtype);
}

// backward_logits_kernel (training): a_v = sum_k grad_q[k] C_g[v, k] (ct: C_g transposed,
// (D, V)) into acc[v], s_v = w_v * inv_z (w_v the tempered weight in s[v]) into s[v]; returns
// the lane's share of sum_v s_v a_v.
SSLFAST_HD float lane_soft_dot(const float* gq_row, const float* ct, int64_t V, int64_t D, float inv_z, int lane,
                               float* s, float* acc) {
  float sa = 0.0f;
  for (int64_t v = lane; v < V; v += kLanes) {
    float a = 0.0f;
    for (int64_t k = 0; k < D; ++k) a += gq_row[k] * ct[k * V + v];
    const float sv = s[v] * inv_z;
    s[v] = sv;
    acc[v] = a;
    sa += sv * a;
  }
  return sa;
}

// acc[v] = softmax_grad(s[v], acc[v], sa, scale_div) over the lane's v.
SSLFAST_HD void lane_softmax_grad(const float* s, float sa, float scale_div, int64_t V, int lane, float* acc) {
  for (int64_t v = lane; v < V; v += kLanes) acc[v] = softmax_grad(s[v], acc[v], sa, scale_div);
}

// backward_logits_kernel (prob perplexity): p_v = exp(l_v - m) * inv_z into p[v]; returns the
// lane's share of sum_v p_v w_v.
SSLFAST_HD float lane_probs_dot(const void* logits, int ldtype, int64_t base, int64_t V, float m, float inv_z,
                                const float* w, int lane, float* p) {
  float pw = 0.0f;
  for (int64_t v = lane; v < V; v += kLanes) {
    const float pv = expf(load_float(logits, base + v, ldtype) - m) * inv_z;
    p[v] = pv;
    pw += pv * w[v];
  }
  return pw;
}

// acc[v] += softmax_grad(p[v], w[v], pw, 1) over the lane's v.
SSLFAST_HD void lane_add_softmax_grad(const float* p, const float* w, float pw, int64_t V, int lane, float* acc) {
  for (int64_t v = lane; v < V; v += kLanes) acc[v] += softmax_grad(p[v], w[v], pw, 1.0f);
}

// backward_codebook_kernel: acc += grad_q[(list[i], g), k] for the `total` frames of list in
// order.
SSLFAST_HD void add_listed(const void* grad_q, int gdtype, const int64_t* list, int total, int64_t G, int64_t g,
                           int64_t D, int64_t k, float& acc) {
  for (int i = 0; i < total; ++i) acc += load_float(grad_q, (list[i] * G + g) * D + k, gdtype);
}

// soft_forward_kernel: element k of q[n, g] = sum_v p[v] C[g*V + v, k], in v order.
SSLFAST_HD float soft_q(const float* p, const void* codebook, int cdtype, int64_t g, int64_t V, int64_t D,
                        int64_t k) {
  float acc = 0.0f;
  for (int64_t v = 0; v < V; ++v) acc += p[v] * load_float(codebook, (g * V + v) * D + k, cdtype);
  return acc;
}

// soft_codebook_kernel: element k of grad_q[n, g], 0 past the chunk's frames or the dims.
SSLFAST_HD float soft_grad_q_at(const void* grad_q, int gdtype, int64_t n, int64_t row_end, int64_t G, int64_t g,
                                int64_t D, int64_t k) {
  return n < row_end && k < D ? load_float(grad_q, (n * G + g) * D + k, gdtype) : 0.0f;
}

// soft_codebook_kernel: probability p[n, g, v] rebuilt from the row's statistics (max of l + g,
// 1 / normaliser) that backward_logits_kernel wrote.
SSLFAST_HD float soft_prob(const void* logits, int ldtype, const float* stats, int64_t n, int64_t G, int64_t g,
                           int64_t V, int64_t v, float tau, uint64_t seed) {
  const int64_t row = n * G + g;
  const float y = load_float(logits, n * G * V + g * V + v, ldtype) + gumbel_at(seed, n, g * V + v);
  return tempered_weight(y, stats[row * 2], tau) * stats[row * 2 + 1];
}

// soft_codebook_kernel's block: frames in steps of kSoftCbRows, codewords v0 .. v0 + kSoftCbVars,
// dims k0 .. k0 + kSoftCbDims; thread tid = 32 vv + lane owns codeword v0 + vv, dims k0 + lane + 32 i.
using SoftCbProbs = float[gumbel_launch::kSoftCbRows][gumbel_launch::kSoftCbVars];
using SoftCbGrads = float[gumbel_launch::kSoftCbRows][gumbel_launch::kSoftCbDims];
constexpr int kSoftCbPerLane = gumbel_launch::kSoftCbDims / 32;

// Staging of the frames r0 ..: thread tid's probability (frame tid / kSoftCbVars, codeword
// tid % kSoftCbVars) and its share of the grad_q slice, 0 past the chunk's frames, V or D.
SSLFAST_HD void soft_cb_stage(const void* grad_q, int gdtype, const void* logits, int ldtype, const float* stats,
                              int64_t G, int64_t g, int64_t V, int64_t v0, int64_t D, int64_t k0, int64_t r0,
                              int64_t row_end, float tau, uint64_t seed, unsigned tid, SoftCbProbs& s_p,
                              SoftCbGrads& s_gq) {
  using namespace gumbel_launch;
  {
    const int t = tid / kSoftCbVars;
    const int u = tid % kSoftCbVars;
    const int64_t n = r0 + t;
    const int64_t v = v0 + u;
    float p = 0.0f;
    if (n < row_end && v < V) p = soft_prob(logits, ldtype, stats, n, G, g, V, v, tau, seed);
    s_p[t][u] = p;
  }
  for (int i = tid; i < kSoftCbRows * kSoftCbDims; i += kSoftThreads) {
    const int t = i / kSoftCbDims;
    const int kk = i % kSoftCbDims;
    const int64_t n = r0 + t;
    s_gq[t][kk] = soft_grad_q_at(grad_q, gdtype, n, row_end, G, g, D, k0 + kk);
  }
}

// After the barrier: acc[i] += p[t, vv] grad_q[t, lane + 32 i] over the staged frames.
SSLFAST_HD void soft_cb_accumulate(const SoftCbProbs& s_p, const SoftCbGrads& s_gq, int vv, int lane,
                                   float (&acc)[kSoftCbPerLane]) {
  for (int t = 0; t < gumbel_launch::kSoftCbRows; ++t) {
    const float p = s_p[t][vv];
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int i = 0; i < kSoftCbPerLane; ++i) acc[i] += p * s_gq[t][lane + 32 * i];
  }
}

// The thread's sums into its codeword's row `out` of the chunk partial (dims < D).
SSLFAST_HD void soft_cb_store(const float (&acc)[kSoftCbPerLane], int64_t k0, int64_t D, int lane, float* out) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < kSoftCbPerLane; ++i) {
    const int64_t k = k0 + lane + 32 * i;
    if (k < D) out[k] = acc[i];
  }
}

// forward_kernel, lane 0 of row (n, g) = frame i of the chunk: the code, and the row's max,
// 1 / normaliser, argmax and selection for the chunk's marginals.
SSLFAST_HD void record_row(int64_t n, int64_t G, int64_t g, int64_t code, const MaxArg& ml, float z,
                           const uint8_t* mask, int i, int64_t* codes, float* m, float* inv_z, int64_t* am, int* sel) {
  codes[n * G + g] = code;
  m[i] = ml.m;
  inv_z[i] = 1.0f / z;
  am[i] = ml.i;
  sel[i] = mask == nullptr ? 1 : (mask[n] != 0);
}

// backward_logits_kernel: out[base + v] = acc[v] (in dtype) over the lane's v.
SSLFAST_HD void lane_store(const float* acc, int64_t V, int64_t base, int dtype, int lane, void* out) {
  for (int64_t v = lane; v < V; v += kLanes) store_float(out, base + v, dtype, acc[v]);
}

// backward_codebook_kernel: from the hit counts of the block's warps, this warp's offset in
// the frame list (the hits of the warps before it) and the block's total.
SSLFAST_HD void warp_offsets(const int* count, int warp, int& offset, int& total) {
  offset = 0;
  total = 0;
  for (int q = 0; q < gumbel_launch::kCodebookThreads / 32; ++q) {
    if (q < warp) offset += count[q];
    total += count[q];
  }
}

}  // namespace gq
}  // namespace sslfast
