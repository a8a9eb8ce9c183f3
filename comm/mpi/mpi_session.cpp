#include <mpi.h>

#include <cstdlib>

#include "comm/mpi.hpp"
#include "comm/mpi/liveness.hpp"
#include "comm/mpi/mpi_backend.hpp"
#include "comm/mpi/mpi_check.hpp"
#include "comm/mpi/progress.hpp"
#include "runtime/log.hpp"

namespace meshtrain::comm {

MpiSession::MpiSession(int* argc, char*** argv, MpiThreads threads) {
  const int required =
      threads == MpiThreads::kMultiple ? MPI_THREAD_MULTIPLE : MPI_THREAD_SERIALIZED;
  int initialized = 0;
  MT_MPI_CHECK(MPI_Initialized(&initialized));
  int provided = MPI_THREAD_SINGLE;
  if (initialized) {
    // The embedding program started MPI: use it, leave finalizing to it.
    MT_MPI_CHECK(MPI_Query_thread(&provided));
  } else {
    MT_MPI_CHECK(MPI_Init_thread(argc, argv, required, &provided));
    owns_ = true;
  }
  if (provided < required) {
    throw MpiError(fmt::format(
        "MPI provides thread level {} but meshtrain needs {} ({}); use an "
        "MPI built with thread support",
        provided, required,
        required == MPI_THREAD_MULTIPLE ? "MPI_THREAD_MULTIPLE" : "MPI_THREAD_SERIALIZED"));
  }
  // Errors on the world come back as codes (and then MpiError) instead of aborting the job.
  MT_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  MT_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank_));
  MT_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &size_));
  MPI_Comm node = MPI_COMM_NULL;
  MT_MPI_CHECK(
      MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node));
  MT_MPI_CHECK(MPI_Comm_rank(node, &local_rank_));
  MT_MPI_CHECK(MPI_Comm_size(node, &local_size_));
  MT_MPI_CHECK(MPI_Comm_free(&node));
  // Every node holds fewer than all ranks exactly when the job spans nodes: the same answer on
  // every rank.
  detail::set_auto_poll_us(local_size_ == size_ ? detail::kPollUsOneNode : detail::kPollUsNodes);
  // Initialised here: every MPI call of the process is comm/'s, made under its lock, so the
  // progress thread may call MPI at MPI_THREAD_SERIALIZED.
  if (owns_) {
    detail::mark_mpi_owned(true);
    liveness_ = std::make_unique<detail::Liveness>();
  }
  log::set_rank(rank_, size_);
}

MpiSession::MpiSession(MpiSession&& o) noexcept
    : owns_(o.owns_),
      liveness_(std::move(o.liveness_)),
      rank_(o.rank_),
      size_(o.size_),
      local_rank_(o.local_rank_),
      local_size_(o.local_size_) {
  o.owns_ = false;
}

MpiSession::~MpiSession() {
  if (!owns_) return;
  try {
    finalize();
  } catch (const std::exception& e) {
    log::error("MPI_Finalize failed: {}", e.what());
  }
}

Communicator MpiSession::world(const CommOptions& options, const MpiOptions& mpi) const {
  return Communicator(
      detail::make_mpi_backend(static_cast<std::int32_t>(MPI_Comm_c2f(MPI_COMM_WORLD)), "world",
                               options, mpi),
      options);
}

void MpiSession::finalize() {
  if (!owns_) return;
  owns_ = false;
  detail::progress_shutdown();
  if (liveness_) liveness_->release();
  detail::mark_mpi_owned(false);
  int finalized = 0;
  MT_MPI_CHECK(MPI_Finalized(&finalized));
  if (!finalized) MT_MPI_CHECK(MPI_Finalize());
}

void MpiSession::abort(int code) {
  log::error("aborting the job (MPI_Abort, code {})", code);
  owns_ = false;
  detail::progress_shutdown();
  int finalized = 0;
  MT_MPI_LOG(MPI_Finalized(&finalized));
  // After MPI_Finalize (a failure inside it) MPI_Abort is erroneous; exiting is all that is left.
  if (!finalized) MT_MPI_LOG(MPI_Abort(MPI_COMM_WORLD, code == 0 ? 1 : code));
  std::_Exit(code == 0 ? 1 : code);  // MPI_Abort does not return; the job must end regardless
}

Communicator mpi_communicator(std::int32_t fortran_comm, std::string name,
                              const CommOptions& options, const MpiOptions& mpi) {
  return Communicator(detail::make_mpi_backend(fortran_comm, std::move(name), options, mpi),
                      options);
}

}  // namespace meshtrain::comm
