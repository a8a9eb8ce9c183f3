// Every NCCL version difference meshtrain cares about, in one place, and the NCCL check macro.
// Internal to comm/nccl/: the only header besides the .cpp that sees nccl.h.
//
//   2.10  ncclBfloat16, ncclAvg                       (required)
//   2.13  ncclGetLastError                           (else: the result string only)
//   2.14  ncclCommFinalize                           (else: ncclCommDestroy alone)
//   2.18  ncclCommSplit                              (else: a fresh ncclUniqueId per subgroup)
#pragma once

#include <nccl.h>

#include "runtime/error.hpp"

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

// Throws NcclError naming the call, file:line, rank, device and NCCL's description.
[[noreturn]] void fail_nccl(ncclResult_t result, ncclComm_t comm, const char* call,
                            const char* file, int line);

}  // namespace meshtrain::comm::nccl_compat

// `nccl_comm` may be nullptr (calls that have none yet).
#define MT_NCCL_CHECK(call, nccl_comm)                                                      \
  do {                                                                                      \
    const ncclResult_t mt_nccl_res_ = (call);                                               \
    if (mt_nccl_res_ != ncclSuccess) [[unlikely]]                                           \
      ::meshtrain::comm::nccl_compat::fail_nccl(mt_nccl_res_, (nccl_comm), #call, __FILE__, \
                                                __LINE__);                                  \
  } while (0)
