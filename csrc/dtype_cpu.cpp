// Entry points of the shared fp16/bf16 conversions (csrc/sslfast/dtype.h), for the tests
// that check them bit for bit against torch.
#include <pybind11/pybind11.h>

#include "sslfast/bind.h"
#include "sslfast/dtype.h"

namespace py = pybind11;

namespace sslfast {

static void load_floats(std::uintptr_t src, std::uintptr_t dst, int64_t n, int dtype) {
  float* out = as_ptr<float>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = load_float(as_ptr<const void>(src), i, dtype);
}

static void store_floats(std::uintptr_t src, std::uintptr_t dst, int64_t n, int dtype) {
  const float* in = as_ptr<const float>(src);
  for (int64_t i = 0; i < n; ++i) store_float(as_ptr<void>(dst), i, dtype, in[i]);
}

void bind_dtype(py::module_& m) {
  m.def("load_floats", &load_floats, py::arg("src"), py::arg("dst"), py::arg("n"), py::arg("dtype"));
  m.def("store_floats", &store_floats, py::arg("src"), py::arg("dst"), py::arg("n"), py::arg("dtype"));
}

}  // namespace sslfast
