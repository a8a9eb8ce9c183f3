#include "runtime/cuda/cuda_check.hpp"

#include "runtime/error.hpp"
#include "runtime/log.hpp"

namespace meshtrain::cuda::detail {

std::string describe_failure(const char* call, int status, std::string_view text, const char* file,
                             int line) {
  int device = -1;
  // The reporter's own call is not checked: its failure only makes the message poorer.
  if (cudaGetDevice(&device) != cudaSuccess) device = -1;
  return fmt::format("{} failed: {} ({}) at {} [{}, cuda:{}]", call, text, status,
                     ::meshtrain::detail::source_location(file, line), log::rank_label(), device);
}

void fail_call(const char* call, int status, std::string_view text, const char* file, int line) {
  throw CudaError(describe_failure(call, status, text, file, line));
}

void log_call(const char* call, int status, std::string_view text, const char* file,
              int line) noexcept {
  try {
    log::error("{}", describe_failure(call, status, text, file, line));
  } catch (...) {
    // Logging itself failed (out of memory): nothing left to report with.
  }
}

}  // namespace meshtrain::cuda::detail
