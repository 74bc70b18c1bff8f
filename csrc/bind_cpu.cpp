// The CPU extension module sslfast._C: one bind_<family> per op family (csrc/<family>_cpu.cpp).
#include <pybind11/pybind11.h>

#include "sslfast/parallel.h"

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
void bind_launch(py::module_& m);
void bind_testing(py::module_& m);
void bind_masked_prediction(py::module_& m);
}  // namespace sslfast

PYBIND11_MODULE(_C, m) {
  m.doc() = "sslfast CPU kernels (C++17, OpenMP); raw pointers in, no libtorch.";
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.def("_last_parallel_threads", [] {
    auto& pool = sslfast::parallel::Pool::get();
    return py::make_tuple(pool.last_threads(), pool.last_requested());
  }, "(team size used, team size asked for) of the last call through sslfast/parallel.h's pool (tests).");
  m.def("_max_threads", &sslfast::parallel::max_threads, "The thread count the kernels may use.");
  sslfast::bind_random(m);
  sslfast::bind_dtype(m);
  sslfast::bind_negatives(m);
  sslfast::bind_masking(m);
  sslfast::bind_info_nce(m);
  sslfast::bind_rp_quantize(m);
  sslfast::bind_contrastive(m);
  sslfast::bind_gumbel_quantize(m);
  sslfast::bind_apply_mask(m);
  sslfast::bind_launch(m);
  sslfast::bind_testing(m);
  sslfast::bind_masked_prediction(m);
}
