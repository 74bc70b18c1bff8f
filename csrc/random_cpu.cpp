// CPU entry points of the shared Philox stream, used by the tests to check that the
// C++/CUDA bits equal the Triton and PyTorch ones.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "sslfast/bind.h"
#include "sslfast/cpu_isa.h"
#include "sslfast/philox.h"
#include "sslfast/philox_cpu.h"

namespace py = pybind11;

namespace sslfast {

// out[i, j] = word j of philox(c0 = c0_start + i, c1 = row, c2 = stream, c3 = 0), as int64.
static void philox_fill_cpu(std::uintptr_t out_ptr, int64_t n, int64_t c0_start, int64_t row,
                            int64_t stream, uint64_t seed) {
  int64_t* out = as_ptr<int64_t>(out_ptr);
  for (int64_t i = 0; i < n; ++i) {
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(c0_start + i), static_cast<uint32_t>(row),
                                    static_cast<uint32_t>(stream), 0u, seed);
    for (int j = 0; j < 4; ++j) out[4 * i + j] = r.w[j];
  }
}

// The bulk generator (philox_cpu.h) at the SIMD level now in effect: words of blocks
// c0[j] (int32 tensor; or c0_start + j where c0 is 0) to out (int32 tensor of 4n words).
static void philox_bulk_cpu(std::uintptr_t out_ptr, int64_t n, std::uintptr_t c0_ptr, int64_t c0_start, int64_t row,
                            int64_t stream, uint64_t seed) {
  uint32_t* out = as_ptr<uint32_t>(out_ptr);
  if (c0_ptr)
    philox_blocks(as_ptr<const uint32_t>(c0_ptr), n, static_cast<uint32_t>(row), static_cast<uint32_t>(stream), seed,
                  out);
  else
    philox_range(static_cast<uint32_t>(c0_start), n, static_cast<uint32_t>(row), static_cast<uint32_t>(stream), seed,
                 out);
}

static void uniform_fill_cpu(std::uintptr_t words_ptr, std::uintptr_t out_ptr, int64_t n) {
  const int64_t* words = as_ptr<const int64_t>(words_ptr);
  float* out = as_ptr<float>(out_ptr);
  for (int64_t i = 0; i < n; ++i) out[i] = uint_to_uniform(static_cast<uint32_t>(words[i]));
}

static std::string set_cpu_isa_py(const std::string& name) {
  Isa cap;
  if (name == "scalar") cap = Isa::scalar;
  else if (name == "avx2") cap = Isa::avx2;
  else if (name == "avx512") cap = Isa::avx512;
  else throw std::invalid_argument("isa must be 'scalar', 'avx2' or 'avx512', got '" + name + "'");
  return isa_name(set_cpu_isa(cap));
}

void bind_random(py::module_& m) {
  m.def("cpu_isa", [] { return std::string(isa_name(cpu_isa())); },
        "The SIMD level the C++ kernels use now: 'scalar', 'avx2' or 'avx512'.");
  m.def("cpu_isa_supported", [] { return std::string(isa_name(cpu_isa_supported())); },
        "The best SIMD level this CPU executes.");
  m.def("set_cpu_isa", &set_cpu_isa_py, py::arg("isa"),
        "Caps the SIMD level (every level returns the same bits; tests use this). Returns the level now used.");
  m.def("philox_fill", &philox_fill_cpu, py::arg("out"), py::arg("n"), py::arg("c0_start"),
        py::arg("row"), py::arg("stream"), py::arg("seed"));
  m.def("philox_bulk", &philox_bulk_cpu, py::arg("out"), py::arg("n"), py::arg("c0"), py::arg("c0_start"),
        py::arg("row"), py::arg("stream"), py::arg("seed"));
  m.def("uniform_fill", &uniform_fill_cpu, py::arg("words"), py::arg("out"), py::arg("n"));
}

}  // namespace sslfast
