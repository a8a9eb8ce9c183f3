// The check macros of every CUDA-side vendor call: one generator, MT_GPU_CHECK_GEN, gives
//
//            throws CudaError      logs, for destructors and noexcept paths
//   CUDA     MT_CUDA_CHECK(call)   MT_CUDA_LOG(call)     (and MT_CUDA_LAUNCH_CHECK() after a
//   launch) cuBLASLt MT_CUBLAS_CHECK(call) MT_CUBLAS_LOG(call) cuDNN    MT_CUDNN_CHECK(call)
//   MT_CUDNN_LOG(call)
//
// and comm/nccl/nccl_compat.hpp builds MT_NCCL_CHECK and MT_NCCL_LOG (NcclError) on it. Every
// message reads "CALL failed: TEXT (STATUS) at FILE:LINE [rank R/N, cuda:D]": the call as
// written, the vendor's own description and code, our source location, the rank (runtime/log's,
// set once at start-up) and the current device.
//
// This header is free of fmt and of the vendor headers other than cuda_runtime.h, so that the
// .cu files use it as it is: the status is turned into text by the vendor's function at the call
// site (cublasLtGetStatusString, cudnnGetErrorString, whose header the caller includes for the
// call itself), and the sinks below take plain types.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <string_view>

namespace meshtrain::cuda::detail {

// "CALL failed: TEXT (STATUS) at FILE:LINE [rank R/N, cuda:D]".
std::string describe_failure(const char* call, int status, std::string_view text, const char* file,
                             int line);
// Throws CudaError with describe_failure's message.
[[noreturn]] void fail_call(const char* call, int status, std::string_view text, const char* file,
                            int line);
// Logs describe_failure's message at error level. Never throws.
void log_call(const char* call, int status, std::string_view text, const char* file,
              int line) noexcept;

// The status of a CUDA call that is success or `allowed`, an outcome the caller handles itself
// (cudaErrorNotReady from a query, cudaErrorMemoryAllocation before a retry); any other status
// fails as MT_CUDA_CHECK does.
inline cudaError_t allow_status(cudaError_t status, cudaError_t allowed, const char* call,
                                const char* file, int line) {
  if (status != cudaSuccess && status != allowed)
    fail_call(call, static_cast<int>(status), cudaGetErrorString(status), file, line);
  return status;
}

}  // namespace meshtrain::cuda::detail

// Evaluates `call` once; a status other than `success` goes to
// sink(#call, int status, to_text(status), __FILE__, __LINE__).
#define MT_GPU_CHECK_GEN(sink, success, to_text, call)                                            \
  do {                                                                                            \
    const auto mt_gpu_status_ = (call);                                                           \
    if (mt_gpu_status_ != (success))                                                              \
      sink(#call, static_cast<int>(mt_gpu_status_), to_text(mt_gpu_status_), __FILE__, __LINE__); \
  } while (0)

#define MT_CUDA_CHECK(call) \
  MT_GPU_CHECK_GEN(::meshtrain::cuda::detail::fail_call, cudaSuccess, cudaGetErrorString, call)
#define MT_CUDA_LOG(call) \
  MT_GPU_CHECK_GEN(::meshtrain::cuda::detail::log_call, cudaSuccess, cudaGetErrorString, call)
// After every kernel launch: reports launch-configuration errors at the launch site.
#define MT_CUDA_LAUNCH_CHECK() MT_CUDA_CHECK(cudaGetLastError())
// An expression: the status of `call`, which may be cudaSuccess or `allowed`.
#define MT_CUDA_ALLOW(call, allowed) \
  ::meshtrain::cuda::detail::allow_status((call), (allowed), #call, __FILE__, __LINE__)

#define MT_CUBLAS_CHECK(call)                                                   \
  MT_GPU_CHECK_GEN(::meshtrain::cuda::detail::fail_call, CUBLAS_STATUS_SUCCESS, \
                   cublasLtGetStatusString, call)
#define MT_CUBLAS_LOG(call)                                                    \
  MT_GPU_CHECK_GEN(::meshtrain::cuda::detail::log_call, CUBLAS_STATUS_SUCCESS, \
                   cublasLtGetStatusString, call)

#define MT_CUDNN_CHECK(call)                                                   \
  MT_GPU_CHECK_GEN(::meshtrain::cuda::detail::fail_call, CUDNN_STATUS_SUCCESS, \
                   cudnnGetErrorString, call)
#define MT_CUDNN_LOG(call)                                                                         \
  MT_GPU_CHECK_GEN(::meshtrain::cuda::detail::log_call, CUDNN_STATUS_SUCCESS, cudnnGetErrorString, \
                   call)
