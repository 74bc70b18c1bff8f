// The CUDA extension module sslfast._C_cuda: one bind_<family> per op family
// (csrc/<family>_cuda.cu). Kernels take raw pointers and the caller's stream handle.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include "sslfast/cuda_check.h"

namespace py = pybind11;

#ifndef SSLFAST_CUDA_ARCHS
#define SSLFAST_CUDA_ARCHS ""
#endif

namespace sslfast {
void bind_random(py::module_& m);
void bind_negatives(py::module_& m);
void bind_masking(py::module_& m);
void bind_info_nce(py::module_& m);
void bind_rp_quantize(py::module_& m);
void bind_contrastive(py::module_& m);
void bind_gumbel_quantize(py::module_& m);
void bind_apply_mask(py::module_& m);
void bind_masked_prediction(py::module_& m);
}  // namespace sslfast

static int device_count() {
  int n = 0;
  // No driver or no device is not an error here: the module must import on any machine.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

static std::string runtime_error_string() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "sslfast CUDA kernels; raw pointers and stream handles in, no libtorch.";
  m.attr("archs") = SSLFAST_CUDA_ARCHS;
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  m.def("device_count", &device_count);
  m.def("runtime_error", &runtime_error_string);
  sslfast::bind_random(m);
  sslfast::bind_negatives(m);
  sslfast::bind_masking(m);
  sslfast::bind_info_nce(m);
  sslfast::bind_rp_quantize(m);
  sslfast::bind_contrastive(m);
  sslfast::bind_gumbel_quantize(m);
  sslfast::bind_apply_mask(m);
  sslfast::bind_masked_prediction(m);
}
