// Mesh: the ranks of a job laid out as DP x PP x TP, in Megatron's default order: TP innermost,
// so that consecutive world ranks form a TP group (TP peers share a node), then DP, and PP
// outermost, so that pipeline stage boundaries cross nodes.
//
//   world rank = (pp_rank * dp + dp_rank) * tp + tp_rank
//
// Groups (each a communicator made with Communicator::split, ordered by the rank it varies):
//   TP:        the ranks with the same pp and dp ranks (one model replica's shards of a stage);
//   DP:        the ranks with the same pp and tp ranks (gradients are averaged over it);
//   PP:        the ranks with the same dp and tp ranks, by stage (point-to-point between stages);
//              its rank is the stage, and each peer is labelled "pipeline stage S" in messages;
//   embedding: the first and last stage of each PP group (tied embeddings: the last stage's copy
//              of the word embedding has its gradient summed with the first stage's), ordered
//              first then last; valid only on those ranks, and only when PP > 1.
// With pp = 1 the mesh is the DP x TP mesh it always was (the same splits in the same order, the
// same group names): no PP or embedding communicator is made, and pp() and embedding() are not
// valid().
//
// A mesh without a world communicator (single process) has dp = pp = tp = 1 and invalid group
// communicators; nothing communicates.
//
// Lifetime: the mesh's communicators are independent of the world communicator passed in (split
// children); finalize() the mesh before the MPI session ends. Thread-safety: as Communicator.
#pragma once

#include "comm/communicator.hpp"

namespace meshtrain::parallel {

class Mesh {
 public:
  // The single-process mesh: dp = pp = tp = 1, no communicators.
  Mesh() = default;
  // Collective over `world`: splits it into TP, DP and (pp > 1) PP and embedding groups. tp and
  // pp must be >= 1 and world.size() a multiple of tp * pp (InvalidArgument naming the values
  // otherwise, on every rank, before any split).
  Mesh(comm::Communicator& world, int tp, int pp = 1);

  int world_rank() const { return (pp_rank_ * dp_size_ + dp_rank_) * tp_size_ + tp_rank_; }
  int world_size() const { return dp_size_ * pp_size_ * tp_size_; }
  int dp_rank() const { return dp_rank_; }
  int dp_size() const { return dp_size_; }
  int tp_rank() const { return tp_rank_; }
  int tp_size() const { return tp_size_; }
  int pp_rank() const { return pp_rank_; }
  int pp_size() const { return pp_size_; }
  bool distributed() const { return world_size() > 1; }

  // The world rank of the rank at (pp, dp, tp) of this mesh.
  int world_rank_of(int pp_rank, int dp_rank, int tp_rank) const;

  // Pipeline stages. The first stage holds the embeddings, the last the head and the loss.
  bool is_first_stage() const { return pp_rank_ == 0; }
  bool is_last_stage() const { return pp_rank_ == pp_size_ - 1; }
  // The previous and next stage as ranks of pp(), around the ring as Megatron's
  // get_pipeline_model_parallel_prev/next_rank: the first stage's previous is the last stage, the
  // last stage's next is the first (what the interleaved schedule sends between model chunks).
  // Guard with is_first_stage() / is_last_stage() where a pipeline ends.
  int prev_stage() const { return (pp_rank_ + pp_size_ - 1) % pp_size_; }
  int next_stage() const { return (pp_rank_ + 1) % pp_size_; }

  // The group of ranks holding the same TP shard of the same stage (gradients are averaged over
  // it); not valid() for the single-process mesh.
  comm::Communicator& dp() { return dp_; }
  // The ranks sharing one stage of one model replica; not valid() for the single-process mesh.
  comm::Communicator& tp() { return tp_; }
  // The stages of this rank's pipeline, by stage (send and recv activations and gradients on
  // it); valid() only when pp_size() > 1.
  comm::Communicator& pp() { return pp_; }
  // The first and last stage of this rank's pipeline (rank 0: the first); valid() only on those
  // ranks, and only when pp_size() > 1.
  comm::Communicator& embedding() { return embedding_; }

  // Finalizes every group communicator (collective, idempotent).
  void finalize();
  // Aborts the job through the first valid group communicator (DP, TP, PP). Never throws.
  void abort(int code = 1) noexcept;

 private:
  int dp_rank_ = 0, dp_size_ = 1, tp_rank_ = 0, tp_size_ = 1, pp_rank_ = 0, pp_size_ = 1;
  comm::Communicator dp_, tp_, pp_, embedding_;
};

}  // namespace meshtrain::parallel
