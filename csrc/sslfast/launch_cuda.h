// CUDA side of csrc/sslfast/launch.h: a Launch's grid as dim3 (checked against the hardware
// limits), the shared-memory opt-in, and the device facts the configurations depend on.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "sslfast/cuda_check.h"
#include "sslfast/launch.h"

namespace sslfast {

inline dim3 grid_of(const Launch& l) {
  if (l.grid_x < 1 || l.grid_x > 2147483647LL || l.grid_y < 1 || l.grid_y > 65535 || l.grid_z < 1 || l.grid_z > 65535)
    throw std::invalid_argument(std::string("sslfast: the launch of ") + l.kernel + " needs a grid of (" +
                                std::to_string(l.grid_x) + ", " + std::to_string(l.grid_y) + ", " +
                                std::to_string(l.grid_z) + ") blocks, beyond CUDA's limits");
  return dim3(static_cast<unsigned>(l.grid_x), static_cast<unsigned>(l.grid_y), static_cast<unsigned>(l.grid_z));
}

// Raises the kernel's dynamic shared memory limit to l.dyn_smem where the launch needs it.
template <class Kernel>
void prepare(Kernel kernel, const Launch& l) {
  if (l.opt_in)
    SSLFAST_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(l.dyn_smem)));
}

// Bytes of static shared memory of a kernel (what ptxas reports as smem).
template <class Kernel>
int64_t static_smem(Kernel kernel) {
  cudaFuncAttributes a;
  SSLFAST_CUDA_CHECK(cudaFuncGetAttributes(&a, kernel));
  return static_cast<int64_t>(a.sharedSizeBytes);
}

// The current device's opt-in maximum of shared memory per block, in bytes.
inline int64_t smem_optin() {
  int dev = 0, v = 0;
  SSLFAST_CUDA_CHECK(cudaGetDevice(&dev));
  SSLFAST_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return v;
}

}  // namespace sslfast
