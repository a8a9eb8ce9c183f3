// The MPI backend, for comm/ only (the public API is comm/mpi.hpp). No mpi.h here: MPI
// communicators cross this header as Fortran handles (MPI_Comm_c2f), which MPI defines as int.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "comm/communicator.hpp"
#include "comm/mpi.hpp"

namespace meshtrain::comm::detail {

// A backend over a duplicate of `fortran_comm` (collective over it; fails with CommTimeout
// after options.timeout_s if a rank never comes).
std::unique_ptr<Backend> make_mpi_backend(std::int32_t fortran_comm, std::string name,
                                          const CommOptions& options, const MpiOptions& mpi);

// The Fortran handle of the MPI communicator under an MPI-backed communicator, for bootstraps
// that run over it (NCCL). Throws InvalidArgument for another backend.
std::int32_t mpi_fortran_handle(Communicator& comm);

}  // namespace meshtrain::comm::detail
