#include "comm/mpi/mpi_check.hpp"

#include <mpi.h>

#include "runtime/log.hpp"

namespace meshtrain::comm::detail {

void fail_mpi(int err, const char* call, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  if (MPI_Error_string(err, text, &len) != MPI_SUCCESS) len = 0;
  int cls = err;
  MPI_Error_class(err, &cls);
  throw MpiError(fmt::format("{} failed: {} (MPI error class {}) at {} [{}]", call,
                             len > 0 ? std::string(text, len) : std::string("unknown error"), cls,
                             ::meshtrain::detail::source_location(file, line), log::rank_label()));
}

}  // namespace meshtrain::comm::detail
