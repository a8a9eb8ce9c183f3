// Check macros for CUDA runtime and cuBLAS calls. Every vendor call sits in one; the message
// names the call, file:line, the rank and the device. Only CUDA targets include this header.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "runtime/error.hpp"

namespace meshtrain::cuda::detail {
[[noreturn]] void fail_cuda(cudaError_t err, const char* call, const char* file, int line);
}  // namespace meshtrain::cuda::detail

#define MT_CUDA_CHECK(call)                                                     \
  do {                                                                          \
    const cudaError_t mt_err_ = (call);                                         \
    if (mt_err_ != cudaSuccess) [[unlikely]]                                    \
      ::meshtrain::cuda::detail::fail_cuda(mt_err_, #call, __FILE__, __LINE__); \
  } while (0)

// After every kernel launch: reports launch-configuration errors at the launch site.
#define MT_CUDA_LAUNCH_CHECK() MT_CUDA_CHECK(cudaGetLastError())
