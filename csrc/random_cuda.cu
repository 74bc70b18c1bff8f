// CUDA entry points of the shared Philox stream (the bits the tests compare across backends).
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include "sslfast/bind.h"
#include "sslfast/cuda_check.h"
#include "sslfast/launch_cuda.h"
#include "sslfast/philox.h"

namespace py = pybind11;

namespace sslfast {

__global__ void philox_fill_kernel(int64_t* out, int64_t n, int64_t c0_start, int64_t row, int64_t stream,
                                   uint64_t seed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(c0_start + i), static_cast<uint32_t>(row),
                                  static_cast<uint32_t>(stream), 0u, seed);
  for (int j = 0; j < 4; ++j) out[4 * i + j] = r.w[j];
}

static void philox_fill_cuda(std::uintptr_t out_ptr, int64_t n, int64_t c0_start, int64_t row, int64_t stream,
                             uint64_t seed, std::uintptr_t stream_handle) {
  if (n == 0) return;
  const Launch l = random_launch::philox_fill(n);
  philox_fill_kernel<<<grid_of(l), l.threads, l.dyn_smem, reinterpret_cast<cudaStream_t>(stream_handle)>>>(
      as_ptr<int64_t>(out_ptr), n, c0_start, row, stream, seed);
  SSLFAST_CUDA_CHECK(cudaGetLastError());
}

void bind_random(py::module_& m) {
  m.def("philox_fill", &philox_fill_cuda, py::arg("out"), py::arg("n"), py::arg("c0_start"), py::arg("row"),
        py::arg("stream"), py::arg("seed"), py::arg("cuda_stream"));
}

}  // namespace sslfast
