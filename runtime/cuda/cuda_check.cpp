#include "runtime/cuda/cuda_check.hpp"

#include "runtime/log.hpp"

namespace meshtrain::cuda::detail {

void fail_cuda(cudaError_t err, const char* call, const char* file, int line) {
  int device = -1;
  cudaGetDevice(&device);  // best effort: the message matters more than this call's status
  throw CudaError(fmt::format("{} failed: {} ({}) at {} [{}, cuda:{}]", call,
                              cudaGetErrorString(err), static_cast<int>(err),
                              ::meshtrain::detail::source_location(file, line), log::rank_label(),
                              device));
}

}  // namespace meshtrain::cuda::detail
