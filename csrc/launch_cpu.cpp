// sslfast._C.launch: the launch configurations of the CUDA kernels (csrc/sslfast/launch.h),
// computed on the host by the same functions the CUDA host code launches with, for the
// compile tier (tests/test_compile_cuda.py) to check against ptxas's report without a GPU.
// Each function returns a list of dicts (kernel, grid, threads, dyn_smem, opt_in), one per
// launch in order, or raises ValueError where the CUDA host code rejects the sizes.
#include <pybind11/pybind11.h>

#include "apply_mask.h"
#include "gumbel_quantize.h"
#include "sslfast/launch.h"

namespace py = pybind11;

namespace sslfast {
namespace {

py::list to_py(const Launches& ls) {
  py::list out;
  for (const Launch& l : ls) {
    py::dict d;
    d["kernel"] = l.kernel;
    d["grid"] = py::make_tuple(l.grid_x, l.grid_y, l.grid_z);
    d["threads"] = l.threads;
    d["dyn_smem"] = l.dyn_smem;
    d["opt_in"] = l.opt_in;
    out.append(d);
  }
  return out;
}

}  // namespace

void bind_launch(py::module_& m) {
  py::module_ l = m.def_submodule("launch", "Launch configurations of the CUDA kernels (csrc/sslfast/launch.h).");
  l.attr("smem_default") = kSmemDefault;
  l.def("philox_fill", [](int64_t n) { return to_py({random_launch::philox_fill(n)}); }, py::arg("n"));
  l.def("sample_negatives",
        [](int64_t B, int64_t T, int64_t K, int64_t Kc, bool hf, int64_t static_smem, int64_t smem_optin) {
          return to_py(negatives_launch::plan(B, T, K, Kc, hf, static_smem, smem_optin));
        },
        py::arg("B"), py::arg("T"), py::arg("K"), py::arg("Kc"), py::arg("hf_layout"), py::arg("static_smem"),
        py::arg("smem_optin"));
  l.def("negatives_hf_one_pass_max_t", &negatives_launch::hf_one_pass_max_t, py::arg("static_smem"),
        py::arg("smem_optin"));
  l.def("compute_mask_indices",
        [](int64_t B, int64_t T, bool hf, bool require_same, double dropout) {
          return to_py(masking_launch::plan(B, T, hf, require_same, dropout));
        },
        py::arg("B"), py::arg("T"), py::arg("hf_style"), py::arg("require_same_masks"), py::arg("mask_dropout"));
  l.def("info_nce_forward", [](int64_t M) { return to_py(info_nce_launch::forward(M)); }, py::arg("M"));
  l.def("info_nce_backward",
        [](int64_t M, int64_t n_grad_cols, int64_t D) { return to_py(info_nce_launch::backward(M, n_grad_cols, D)); },
        py::arg("M"), py::arg("n_grad_cols"), py::arg("D"));
  l.def("rp_quantize",
        [](int64_t rows, int64_t smem_per_warp) { return to_py(rp_quantize_launch::plan(rows, smem_per_warp)); },
        py::arg("rows"), py::arg("smem_per_warp"));
  l.def("masked_prediction",
        [](int64_t N, int64_t H, int64_t Hx, int64_t V, int64_t D, bool backward) {
          return to_py(masked_prediction_launch::plan(N, H, Hx, V, D, backward));
        },
        py::arg("N"), py::arg("H"), py::arg("Hx"), py::arg("V"), py::arg("D"), py::arg("backward"));
  l.def("contrastive_forward", [](int64_t N) { return to_py({contrastive_launch::forward(N)}); }, py::arg("N"));
  l.def("contrastive_backward_rows", [](int64_t N) { return to_py({contrastive_launch::backward_rows(N)}); },
        py::arg("N"));
  l.def("contrastive_backward_segments", [](int64_t M) { return to_py({contrastive_launch::segments(M)}); },
        py::arg("M"));
  l.def("gumbel_quantize_forward",
        [](int64_t N, int64_t G, int64_t V, bool training, bool hard) {
          return to_py(gumbel_launch::forward(N, G, V, training, hard));
        },
        py::arg("N"), py::arg("G"), py::arg("V"), py::arg("training"), py::arg("hard"));
  l.def("gumbel_quantize_backward",
        [](int64_t N, int64_t G, int64_t V, int64_t D, bool training, bool hard, int64_t static_smem,
           int64_t smem_optin) {
          return to_py(gumbel_launch::backward(N, G, V, D, training, hard,
                                               gq::soft_num_chunks(N, gumbel_launch::kSoftCbRows), static_smem,
                                               smem_optin));
        },
        py::arg("N"), py::arg("G"), py::arg("V"), py::arg("D"), py::arg("training"), py::arg("hard"),
        py::arg("static_smem"), py::arg("smem_optin"));
  l.def("gumbel_quantize_backward_max_floats", &gumbel_launch::backward_max_floats, py::arg("static_smem"),
        py::arg("smem_optin"));
  l.def("apply_mask_forward", [](int64_t B, int64_t T, int64_t D) { return to_py(apply_mask_launch::forward(B, T, D)); },
        py::arg("B"), py::arg("T"), py::arg("D"));
  l.def("apply_mask_backward",
        [](int64_t B, int64_t T, int64_t D, bool need_fill) {
          return to_py(apply_mask_launch::backward(B, T, D, need_fill, apply_mask::kGradChunk));
        },
        py::arg("B"), py::arg("T"), py::arg("D"), py::arg("need_fill"));
}

}  // namespace sslfast
