// The CPU extension module sslfast._C: one bind_<family> per op family (csrc/<family>_cpu.cpp).
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace sslfast {
void bind_random(py::module_& m);
void bind_dtype(py::module_& m);
void bind_negatives(py::module_& m);
void bind_masking(py::module_& m);
void bind_info_nce(py::module_& m);
void bind_rp_quantize(py::module_& m);
void bind_contrastive(py::module_& m);
void bind_gumbel_quantize(py::module_& m);
void bind_apply_mask(py::module_& m);
void bind_masked_prediction(py::module_& m);
}  // namespace sslfast

PYBIND11_MODULE(_C, m) {
  m.doc() = "sslfast CPU kernels (C++17, OpenMP); raw pointers in, no libtorch.";
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  sslfast::bind_random(m);
  sslfast::bind_dtype(m);
  sslfast::bind_negatives(m);
  sslfast::bind_masking(m);
  sslfast::bind_info_nce(m);
  sslfast::bind_rp_quantize(m);
  sslfast::bind_contrastive(m);
  sslfast::bind_gumbel_quantize(m);
  sslfast::bind_apply_mask(m);
  sslfast::bind_masked_prediction(m);
}
