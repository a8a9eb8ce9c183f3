// MPI_Test of a receive for MpiP2pWork (comm/mpi/mpi_p2p_work.hpp).
#include "comm/mpi/mpi_p2p_work.hpp"

#include <mpi.h>

#include <mutex>

#include "comm/mpi/mpi_check.hpp"

namespace meshtrain::comm::detail {

// MPI_Test of a receive, made as MT_MPI_CHECK makes it (under mpi_mutex(); MpiError naming the
// call on failure), except for a message longer than the buffer: that error (class
// MPI_ERR_TRUNCATE) is the caller's mismatch, returned as a completion with *truncated set so
// that the work reports it as InvalidArgument. MPI_Error_class is made under the same lock.
bool test_receive(MPI_Request* request, MPI_Status* status, bool* truncated) {
  int flag = 0;
  int err = MPI_SUCCESS;
  int cls = MPI_SUCCESS;
  {
    std::lock_guard lock(mpi_mutex());
    err = MPI_Test(request, &flag, status);
    if (err != MPI_SUCCESS && MPI_Error_class(err, &cls) != MPI_SUCCESS) cls = err;
  }
  if (err == MPI_SUCCESS) return flag != 0;
  if (cls == MPI_ERR_TRUNCATE) {
    *truncated = true;
    return true;
  }
  fail_mpi(err, "MPI_Test(request, &flag, status)", __FILE__, __LINE__);
}

}  // namespace meshtrain::comm::detail
