// Helpers for the pybind11 bindings. The extension never links libtorch: Python passes
// data pointers (as integers), sizes and, for CUDA, the stream handle; sslfast/_ext.py
// validates the tensors before it hands their pointers over.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace sslfast {

template <typename T>
inline T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace sslfast
