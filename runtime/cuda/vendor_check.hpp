// Check macro for cuBLAS(Lt) calls: the message names the call, the status, file:line, the
// rank and the device, as MT_CUDA_CHECK does. (cuDNN calls are checked in attention.cpp.)
#pragma once

#include <cublasLt.h>

#include "runtime/cuda/cuda_check.hpp"

namespace meshtrain::cuda::detail {
[[noreturn]] void fail_cublas(cublasStatus_t status, const char* call, const char* file, int line);
}  // namespace meshtrain::cuda::detail

#define MT_CUBLAS_CHECK(call)                                                    \
  do {                                                                           \
    const cublasStatus_t mt_st_ = (call);                                        \
    if (mt_st_ != CUBLAS_STATUS_SUCCESS) [[unlikely]]                            \
      ::meshtrain::cuda::detail::fail_cublas(mt_st_, #call, __FILE__, __LINE__); \
  } while (0)
