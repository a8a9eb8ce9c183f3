// The check macro every MPI call sits in. Needs no mpi.h: MPI_SUCCESS is 0 by the standard.
// Both macros make the call holding mpi_mutex(). Internal to comm/.
#pragma once

#include <mutex>

#include "runtime/error.hpp"

namespace meshtrain::comm::detail {
// Held around every MPI call of comm/: no two MPI calls of this process overlap, which is what
// lets the progress thread (comm/mpi/progress.hpp) call MPI under MPI_THREAD_SERIALIZED. Held
// for one call only, never while taking another lock.
std::mutex& mpi_mutex();
// Throws MpiError naming the call, file:line, the rank and MPI's own description of `err`.
[[noreturn]] void fail_mpi(int err, const char* call, const char* file, int line);
// The same message, logged: for paths that must not throw (destructors, abandon, abort).
void log_mpi(int err, const char* call, const char* file, int line) noexcept;
}  // namespace meshtrain::comm::detail

#define MT_MPI_CHECK(call)                                                         \
  do {                                                                             \
    int mt_mpi_err_ = 0;                                                           \
    {                                                                              \
      std::lock_guard mt_mpi_lock_(::meshtrain::comm::detail::mpi_mutex());        \
      mt_mpi_err_ = (call);                                                        \
    }                                                                              \
    if (mt_mpi_err_ != 0) [[unlikely]]                                             \
      ::meshtrain::comm::detail::fail_mpi(mt_mpi_err_, #call, __FILE__, __LINE__); \
  } while (0)

// For paths that must not throw: a failure is logged and execution continues.
#define MT_MPI_LOG(call)                                                          \
  do {                                                                            \
    int mt_mpi_err_ = 0;                                                          \
    {                                                                             \
      std::lock_guard mt_mpi_lock_(::meshtrain::comm::detail::mpi_mutex());       \
      mt_mpi_err_ = (call);                                                       \
    }                                                                             \
    if (mt_mpi_err_ != 0) [[unlikely]]                                            \
      ::meshtrain::comm::detail::log_mpi(mt_mpi_err_, #call, __FILE__, __LINE__); \
  } while (0)
