// Mesh: the ranks of a job laid out as DP x TP, TP innermost, so that consecutive world ranks
// form a TP group (TP peers share a node) and ranks with the same TP rank form a DP group.
//
//   world rank = dp_rank * tp + tp_rank
//
// The mesh owns one communicator per group this rank belongs to, made with Communicator::split.
// A mesh without a world communicator (single process) has dp = tp = 1 and invalid group
// communicators; nothing communicates.
//
// Lifetime: the mesh's communicators are independent of the world communicator passed in (split
// children); finalize() the mesh before the MPI session ends. Thread-safety: as Communicator.
#pragma once

#include "comm/communicator.hpp"

namespace meshtrain::parallel {

class Mesh {
 public:
  // The single-process mesh: dp = tp = 1, no communicators.
  Mesh() = default;
  // Collective over `world`: splits it into DP and TP groups. world.size() must be a multiple of
  // tp (InvalidArgument otherwise).
  Mesh(comm::Communicator& world, int tp);

  int world_rank() const { return dp_rank_ * tp_size_ + tp_rank_; }
  int world_size() const { return dp_size_ * tp_size_; }
  int dp_rank() const { return dp_rank_; }
  int dp_size() const { return dp_size_; }
  int tp_rank() const { return tp_rank_; }
  int tp_size() const { return tp_size_; }
  bool distributed() const { return world_size() > 1; }

  // The group of ranks holding the same TP shard (gradients are averaged over it); not valid()
  // for the single-process mesh.
  comm::Communicator& dp() { return dp_; }
  // The ranks sharing one model replica; not valid() for the single-process mesh.
  comm::Communicator& tp() { return tp_; }

  // Finalizes both group communicators (collective, idempotent).
  void finalize();
  // Aborts the job through the DP (else TP) communicator. Never throws.
  void abort(int code = 1) noexcept;

 private:
  int dp_rank_ = 0, dp_size_ = 1, tp_rank_ = 0, tp_size_ = 1;
  comm::Communicator dp_, tp_;
};

}  // namespace meshtrain::parallel
