// The NCCL backend (library meshtrain_comm_nccl, built with MESHTRAIN_CUDA=ON): collectives on
// CUDA tensors. This header compiles with a plain C++ compiler; CUDA handles cross it as void*.
//
// Bootstrap over MPI: rank 0 of the bootstrap communicator creates the ncclUniqueId and
// broadcasts it; subgroups come from ncclCommSplit (NCCL >= 2.18; older NCCLs bootstrap the
// child the same way). Collectives run on a dedicated stream, ordered after the compute stream
// with an event; Work::wait() blocks the host until the collective is complete (polling
// ncclCommGetAsyncError, so that an NCCL failure or a peer that never arrives raises instead of
// hanging) and orders the compute stream after it. On a timeout or an asynchronous NCCL error
// the NCCL communicator is aborted (ncclCommAbort), which ends its kernels, and the error
// (CommTimeout naming the ranks that never arrived, or NcclError) is thrown. abort() aborts the
// NCCL communicator and then ends the job through MPI_Abort.
//
// Each collective is also announced over MPI to the group's peers (comm/mpi/arrivals.hpp): that
// is how a timeout names the ranks that never arrived, and how debug mode compares signatures.
//
// NCCL allows one rank per GPU per communicator: several ranks sharing one GPU use the MPI
// backend, which stages CUDA tensors through host memory.
#pragma once

#include "comm/communicator.hpp"

namespace meshtrain::comm {

struct NcclOptions {
  // The cudaStream_t that produces and consumes the tensors (the runtime's compute stream).
  // Collectives wait for the work queued on it before they start, and Work::wait() makes it
  // wait for them. nullptr is the legacy default stream. runtime/cuda/cuda_device.hpp's
  // compute_stream(device) gives a CUDA device's.
  void* compute_stream = nullptr;
  // The CUDA device of this rank; -1 keeps the current device.
  int device = -1;
};

// A communicator over the same ranks as `bootstrap`, which must be MPI-backed. Collective over
// `bootstrap` (every rank calls it). The NCCL communicator keeps a private duplicate of the
// bootstrap's MPI communicator for its side channel; `bootstrap` stays the caller's.
Communicator nccl_communicator(Communicator& bootstrap, const NcclOptions& nccl = {},
                               const CommOptions& options = CommOptions::from_settings());

}  // namespace meshtrain::comm
