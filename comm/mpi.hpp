// The MPI backend (CPU memory) and the MPI session that bootstraps a job.
//
// Ownership runs main -> MpiSession -> communicators: every communicator is finalized (or
// destroyed) before the session, and the session is created before any of them. Nothing with
// static lifetime owns a communicator.
//
// Collectives are MPI non-blocking collectives (or our rings) on a private duplicate of the
// group's MPI communicator, advanced by Work::test()/wait(), by every new collective, and by the
// process's progress thread while the caller computes (comm/mpi/progress.hpp; every MPI call of
// comm/ holds one mutex, so MPI_THREAD_SERIALIZED suffices; MESHTRAIN_COMM_PROGRESS=caller
// turns it off). Errors come back as MpiError (the communicators use MPI_ERRORS_RETURN).
//
// Large allreduces and reduce-scatters run as rings over point-to-point messages, advanced by
// the same calls (comm/mpi/ring.hpp: faster than Open MPI's non-blocking collectives there).
//
// 16-bit reductions (bf16, fp16) accumulate in fp32, in one of two ways (Reduce16):
//  - kWireOp: 16-bit data on the wire, combined in fp32 and rounded at every step: by MPI
//    user-defined ops below the ring threshold, by the ring's own loop above it. Half the bytes
//    of fp32; a reduction over n ranks rounds up to ceil(log2 n) (tree) or n - 1 (ring) times,
//    as NCCL does.
//  - kConvert: convert to fp32, reduce fp32, convert back. One rounding, twice the bytes.
// The default is the faster one on the benchmark (bench/results/comm.md).
//
// Tensors on a non-CPU device are staged through host memory with the device's copies (ordered
// on its compute stream): that is how several ranks can share one GPU in tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "comm/communicator.hpp"

namespace meshtrain::comm {

namespace detail {
class Liveness;
}

enum class Reduce16 : std::uint8_t { kWireOp, kConvert };

struct MpiOptions {
  Reduce16 reduce16 = Reduce16::kWireOp;
  // Allreduce and reduce-scatter of at least this many bytes run as a ring over point-to-point
  // messages (comm/mpi/ring.hpp); smaller ones as MPI non-blocking collectives, whose latency
  // is lower. SIZE_MAX: never a ring (the benchmark's comparison).
  std::size_t ring_min_bytes = 64u << 10;
};

// This process among the processes of its node: its rank there, which picks its GPU (modulo
// the GPUs it sees), and their number, among which the node's cores are divided.
struct NodeLocal {
  int rank = 0;
  int size = 1;
};

enum class MpiThreads : std::uint8_t {
  // One thread makes MPI calls at a time (one thread per rank: meshtrain's default).
  kSerialized,
  // Communicators may be used from several threads at once.
  kMultiple,
};

// MPI_Init_thread on construction, MPI_Finalize on finalize() or destruction. One per process;
// created by main before anything that communicates. Sets the rank shown in log lines.
class MpiSession {
 public:
  // argc/argv may be null. Throws MpiError if MPI cannot provide `threads`, or if MPI was
  // already initialised by someone else.
  explicit MpiSession(int* argc = nullptr, char*** argv = nullptr,
                      MpiThreads threads = MpiThreads::kSerialized);
  // Finalizes MPI unless aborted or already finalized; errors are logged.
  ~MpiSession();
  MpiSession(MpiSession&& o) noexcept;
  MpiSession& operator=(MpiSession&&) = delete;
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  // Rank among the processes of this node (MPI_Comm_split_type with MPI_COMM_TYPE_SHARED), and
  // their number: what picks a GPU.
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  NodeLocal node_local() const { return NodeLocal{local_rank_, local_size_}; }

  // A new communicator over every process (a duplicate of MPI_COMM_WORLD, named "world").
  // Collective: every rank calls it.
  Communicator world(const CommOptions& options = CommOptions::from_settings(),
                     const MpiOptions& mpi = {}) const;

  // MPI_Finalize. Every communicator must be finalized or destroyed first. Collective.
  void finalize();
  // MPI_Abort(MPI_COMM_WORLD, code): ends every process of the job. Never returns.
  [[noreturn]] void abort(int code = 1);

 private:
  bool owns_ = false;
  // The channel on which this process answers, and sends, liveness checks after a timeout
  // (comm/mpi/liveness.hpp); only when the session started MPI.
  std::unique_ptr<detail::Liveness> liveness_;
  int rank_ = 0;
  int size_ = 1;
  int local_rank_ = 0;
  int local_size_ = 1;
};

// A new communicator over an existing MPI communicator of the embedding program, given by its
// Fortran handle (MPI_Comm_c2f(comm)), so that this header needs no mpi.h. The communicator is
// duplicated; the caller keeps ownership of its own. Collective over `fortran_comm`.
Communicator mpi_communicator(std::int32_t fortran_comm, std::string name,
                              const CommOptions& options = CommOptions::from_settings(),
                              const MpiOptions& mpi = {});

}  // namespace meshtrain::comm
