// Error checking for CUDA runtime calls: a failed call raises a Python RuntimeError that
// names the call, the file and the line, instead of leaving a sticky error for later.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define SSLFAST_CUDA_CHECK(expr)                                                              \
  do {                                                                                        \
    const cudaError_t sslfast_err_ = (expr);                                                  \
    if (sslfast_err_ != cudaSuccess) {                                                        \
      throw std::runtime_error(std::string("sslfast CUDA error: ") + cudaGetErrorString(sslfast_err_) + \
                               " in " #expr " at " __FILE__ ":" + std::to_string(__LINE__));  \
    }                                                                                         \
  } while (0)
