// The CPU extension module sslfast._C: one bind_<family> per op family (csrc/<family>_cpu.cpp).
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace sslfast {
void bind_random(py::module_& m);
void bind_gumbel_quantize(py::module_& m);
}  // namespace sslfast

PYBIND11_MODULE(_C, m) {
  m.doc() = "sslfast CPU kernels (C++17, OpenMP); raw pointers in, no libtorch.";
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  sslfast::bind_random(m);
  sslfast::bind_gumbel_quantize(m);
}
