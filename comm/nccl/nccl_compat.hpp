// Every NCCL version difference meshtrain cares about, in one place, and the NCCL check macros.
// Internal to comm/nccl/: the only header besides the .cpp that sees nccl.h.
//
//   2.10  ncclBfloat16, ncclAvg                       (required)
//   2.13  ncclGetLastError                           (else: the result string only)
//   2.14  ncclCommFinalize                           (else: ncclCommDestroy alone)
//   2.18  ncclCommSplit                              (else: a fresh ncclUniqueId per subgroup)
#pragma once

#include <nccl.h>

#include <string>
#include <string_view>

#include "runtime/cuda/cuda_check.hpp"

#define MT_NCCL_AT_LEAST(major, minor) (NCCL_VERSION_CODE >= NCCL_VERSION(major, minor, 0))

#if !MT_NCCL_AT_LEAST(2, 10)
#error "meshtrain needs NCCL >= 2.10 (ncclBfloat16 and ncclAvg); install a newer libnccl-dev"
#endif

namespace meshtrain::comm::nccl_compat {

inline constexpr bool kHasCommSplit = MT_NCCL_AT_LEAST(2, 18);

// NCCL's own description of the last error on `comm` ("" where NCCL cannot say).
inline const char* last_error(ncclComm_t comm) {
#if MT_NCCL_AT_LEAST(2, 13)
  const char* s = comm ? ncclGetLastError(comm) : nullptr;
  return s ? s : "";
#else
  (void)comm;
  return "";
#endif
}

// Flushes the operations issued on a (blocking) communicator before ncclCommDestroy.
inline ncclResult_t finalize(ncclComm_t comm) {
#if MT_NCCL_AT_LEAST(2, 14)
  return ncclCommFinalize(comm);
#else
  (void)comm;
  return ncclSuccess;
#endif
}

// ncclCommSplit where it exists; callers check kHasCommSplit first.
inline ncclResult_t split(ncclComm_t parent, int color, int key, ncclComm_t* child) {
#if MT_NCCL_AT_LEAST(2, 18)
  return ncclCommSplit(parent, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, child, nullptr);
#else
  (void)parent, (void)color, (void)key, (void)child;
  return ncclInvalidUsage;
#endif
}

// NCCL's description of a result, with the communicator's last error when there is one:
// "unhandled system error: socket connect failed". `comm` may be nullptr.
struct ErrorText {
  ncclComm_t comm;
  std::string operator()(ncclResult_t result) const {
    const std::string detail = last_error(comm);
    return std::string(ncclGetErrorString(result)) + (detail.empty() ? "" : ": " + detail);
  }
};

// The sinks of MT_NCCL_CHECK and MT_NCCL_LOG: the message of the CUDA checks
// (runtime/cuda/cuda_check.hpp), thrown as NcclError or logged.
[[noreturn]] void fail_nccl(const char* call, int status, std::string_view text, const char* file,
                            int line);
void log_nccl(const char* call, int status, std::string_view text, const char* file,
              int line) noexcept;

}  // namespace meshtrain::comm::nccl_compat

// The CUDA check generator with NCCL's sinks. `nccl_comm` (whose last error joins the message)
// may be nullptr: calls that have none yet, or after it was aborted.
#define MT_NCCL_CHECK(call, nccl_comm)                                     \
  MT_GPU_CHECK_GEN(::meshtrain::comm::nccl_compat::fail_nccl, ncclSuccess, \
                   (::meshtrain::comm::nccl_compat::ErrorText{(nccl_comm)}), call)
#define MT_NCCL_LOG(call, nccl_comm)                                      \
  MT_GPU_CHECK_GEN(::meshtrain::comm::nccl_compat::log_nccl, ncclSuccess, \
                   (::meshtrain::comm::nccl_compat::ErrorText{(nccl_comm)}), call)
