// The check macro every MPI call sits in. Needs no mpi.h: MPI_SUCCESS is 0 by the standard.
// Internal to comm/.
#pragma once

#include "runtime/error.hpp"

namespace meshtrain::comm::detail {
// Throws MpiError naming the call, file:line, the rank and MPI's own description of `err`.
[[noreturn]] void fail_mpi(int err, const char* call, const char* file, int line);
// The same message, logged: for paths that must not throw (destructors, abandon, abort).
void log_mpi(int err, const char* call, const char* file, int line) noexcept;
}  // namespace meshtrain::comm::detail

#define MT_MPI_CHECK(call)                                                         \
  do {                                                                             \
    const int mt_mpi_err_ = (call);                                                \
    if (mt_mpi_err_ != 0) [[unlikely]]                                             \
      ::meshtrain::comm::detail::fail_mpi(mt_mpi_err_, #call, __FILE__, __LINE__); \
  } while (0)

// For paths that must not throw: a failure is logged and execution continues.
#define MT_MPI_LOG(call)                                                          \
  do {                                                                            \
    const int mt_mpi_err_ = (call);                                               \
    if (mt_mpi_err_ != 0) [[unlikely]]                                            \
      ::meshtrain::comm::detail::log_mpi(mt_mpi_err_, #call, __FILE__, __LINE__); \
  } while (0)
