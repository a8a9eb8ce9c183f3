#include "comm/mpi/mpi_check.hpp"

#include <mpi.h>

#include "runtime/log.hpp"

namespace meshtrain::comm::detail {

std::mutex& mpi_mutex() {
  static std::mutex mu;  // owns nothing but itself
  return mu;
}

namespace {
std::string describe(int err, const char* call, const char* file, int line) {
  // The two calls that describe an error cannot themselves be checked: their failure only
  // makes the description poorer.
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  int cls = err;
  {
    std::lock_guard lock(mpi_mutex());
    if (MPI_Error_string(err, text, &len) != MPI_SUCCESS) len = 0;
    if (MPI_Error_class(err, &cls) != MPI_SUCCESS) cls = err;
  }
  return fmt::format("{} failed: {} (MPI error class {}) at {} [{}]", call,
                     len > 0 ? std::string(text, len) : std::string("unknown error"), cls,
                     ::meshtrain::detail::source_location(file, line), log::rank_label());
}
}  // namespace

void fail_mpi(int err, const char* call, const char* file, int line) {
  throw MpiError(describe(err, call, file, line));
}

void log_mpi(int err, const char* call, const char* file, int line) noexcept {
  try {
    log::error("{}", describe(err, call, file, line));
  } catch (...) {
    // Logging itself failed (out of memory): nothing left to report with.
  }
}

}  // namespace meshtrain::comm::detail
