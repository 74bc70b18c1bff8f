// sslfast._C._testing: the CUDA kernels' device code run on the host, for the tests.
//
// The kernels of masking_cuda.cu and negatives_cuda.cu are built from SSLFAST_HD phases in
// csrc/masking.h and csrc/negatives.h, each what one thread does between two barriers. The
// functions here run a kernel's blocks one after another and, inside a block, each phase for
// every thread index the kernel uses before the next phase (what the barrier guarantees), so
// tests/test_cuda_device_code.py compares the CUDA algorithm with the reference on a CPU.
// Only the warp intrinsics of the one-pass negatives kernel (block_scan, warp_sum) are
// replaced, by the plain sums they compute.
#include <pybind11/pybind11.h>

#include <vector>

#include "gumbel_quantize.h"
#include "masking.h"
#include "negatives.h"
#include "sslfast/bind.h"
#include "sslfast/launch.h"

namespace py = pybind11;

namespace sslfast {
namespace {

// mask_rows_kernel then (fairseq style with require_same_masks or mask_dropout)
// mask_equalize_kernel, `nt` threads a block; arguments as compute_mask_indices_cuda.
void masking_kernels(std::uintptr_t lengths_ptr, std::uintptr_t pad_ptr, int64_t B, int64_t T, double mask_prob,
                     int64_t L, int64_t vmin, std::uintptr_t thr_ptr, int64_t n_thr, int64_t min_masks,
                     int require_same, double dropout, int hf, uint64_t seed, int no_overlap, int64_t min_space,
                     int64_t n_cap, int64_t r_cap, int64_t nt, std::uintptr_t out_ptr) {
  const masking::Params p{B, T, mask_prob, L, vmin, as_ptr<const int64_t>(thr_ptr), n_thr, min_masks, require_same,
                          dropout, hf, seed, no_overlap, min_space};
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
                        int64_t K, int64_t Kc, bool hf, uint64_t seed, int64_t n_rows, std::uintptr_t out_ptr) {
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
    for (int64_t tid = 0; tid < nt; ++tid)
      negatives::one_pass_draws(hf, seed, T, K, Kc, b, t0, row_start, n_row, total, own.data(), out_row.data(),
                                pos.data(), out, tid, nt);
  }
}

// negatives_scan_kernel (one block of nt threads) then negatives_draw_kernel (every item).
void negatives_two_pass(std::uintptr_t mask_ptr, std::uintptr_t pad_ptr, int from_masked_only, int64_t B, int64_t T,
                        int64_t K, int64_t Kc, bool hf, uint64_t seed, int64_t n_rows, std::uintptr_t out_ptr) {
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
  for (int64_t i = 0; i < items; ++i)
    negatives::draw_item(B, T, K, Kc, hf, seed, rank, mrank, pos, ws64.data(), n_rows, as_ptr<int64_t>(out_ptr), i);
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
        py::arg("seed"), py::arg("no_overlap"), py::arg("min_space"), py::arg("n_cap"), py::arg("r_cap"),
        py::arg("threads"), py::arg("out"));
  t.def("negatives_prefix", &negatives_prefix, py::arg("mask"), py::arg("padding_mask"), py::arg("from_masked_only"),
        py::arg("end"), py::arg("first"), py::arg("row_base"), py::arg("row_end"), py::arg("threads"));
  t.def("negatives_one_pass", &negatives_one_pass, py::arg("mask"), py::arg("padding_mask"),
        py::arg("from_masked_only"), py::arg("B"), py::arg("T"), py::arg("K"), py::arg("Kc"), py::arg("hf_layout"),
        py::arg("seed"), py::arg("n_rows"), py::arg("out"));
  t.def("negatives_two_pass", &negatives_two_pass, py::arg("mask"), py::arg("padding_mask"),
        py::arg("from_masked_only"), py::arg("B"), py::arg("T"), py::arg("K"), py::arg("Kc"), py::arg("hf_layout"),
        py::arg("seed"), py::arg("n_rows"), py::arg("out"));
  t.def("gumbel_tempered_weight", &gumbel_tempered_weight, py::arg("y"), py::arg("ym"), py::arg("n"), py::arg("tau"),
        py::arg("out"));
}

}  // namespace sslfast
