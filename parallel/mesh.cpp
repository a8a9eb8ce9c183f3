#include "parallel/mesh.hpp"

#include "runtime/error.hpp"

namespace meshtrain::parallel {

Mesh::Mesh(comm::Communicator& world, int tp, int pp) {
  MT_CHECK(world.valid(), "Mesh: the world communicator is not valid");
  MT_CHECK(tp >= 1, "Mesh: the tensor-parallel size must be >= 1, got {}", tp);
  MT_CHECK(pp >= 1, "Mesh: the pipeline-parallel size must be >= 1, got {}", pp);
  if (pp == 1) {
    MT_CHECK(world.size() % tp == 0,
             "Mesh: the world size ({}) must be a multiple of the tensor-parallel size ({})",
             world.size(), tp);
  } else {
    MT_CHECK(world.size() % (tp * pp) == 0,
             "Mesh: the world size ({}) must be a multiple of tensor-parallel size x "
             "pipeline-parallel size ({} x {} = {}); the data-parallel size is what divides the "
             "rest",
             world.size(), tp, pp, tp * pp);
  }
  tp_size_ = tp;
  pp_size_ = pp;
  dp_size_ = world.size() / (tp * pp);
  const int r = world.rank();
  tp_rank_ = r % tp;
  dp_rank_ = (r / tp) % dp_size_;
  pp_rank_ = r / (tp * dp_size_);
  MT_ASSERT(world_rank() == r, "mesh coordinates ({}, {}, {}) of world rank {}", pp_rank_, dp_rank_,
            tp_rank_, r);
  // Every split on every rank, in the same order: split is collective over the world. The colors
  // number the groups; with pp = 1 they are the DP x TP mesh's (DP: the TP rank, TP: the DP rank),
  // so that the groups keep their names.
  dp_ = world.split(/*color=*/pp_rank_ * tp + tp_rank_, /*key=*/dp_rank_);
  tp_ = world.split(/*color=*/pp_rank_ * dp_size_ + dp_rank_, /*key=*/tp_rank_);
  if (pp > 1) {
    const int pipeline = dp_rank_ * tp + tp_rank_;
    pp_ = world.split(/*color=*/pipeline, /*key=*/pp_rank_);
    const bool ends = is_first_stage() || is_last_stage();
    embedding_ = world.split(/*color=*/ends ? pipeline : -1, /*key=*/pp_rank_);
    for (int s = 0; s < pp; ++s) {
      if (s != pp_rank_) pp_.set_peer_label(s, fmt::format("pipeline stage {}", s));
    }
  }
  MT_ASSERT(dp_.size() == dp_size_ && dp_.rank() == dp_rank_, "DP group {} of {}", dp_.rank(),
            dp_.size());
  MT_ASSERT(tp_.size() == tp_size_ && tp_.rank() == tp_rank_, "TP group {} of {}", tp_.rank(),
            tp_.size());
  MT_ASSERT(pp == 1 || (pp_.size() == pp_size_ && pp_.rank() == pp_rank_), "PP group {} of {}",
            pp_.valid() ? pp_.rank() : -1, pp_.valid() ? pp_.size() : 0);
}

int Mesh::world_rank_of(int pp_rank, int dp_rank, int tp_rank) const {
  MT_CHECK(pp_rank >= 0 && pp_rank < pp_size_ && dp_rank >= 0 && dp_rank < dp_size_ &&
               tp_rank >= 0 && tp_rank < tp_size_,
           "Mesh::world_rank_of({}, {}, {}): outside the mesh of PP {} x DP {} x TP {}", pp_rank,
           dp_rank, tp_rank, pp_size_, dp_size_, tp_size_);
  return (pp_rank * dp_size_ + dp_rank) * tp_size_ + tp_rank;
}

void Mesh::finalize() {
  if (dp_.valid()) dp_.finalize();
  if (tp_.valid()) tp_.finalize();
  if (pp_.valid()) pp_.finalize();
  if (embedding_.valid()) embedding_.finalize();
}

void Mesh::abort(int code) noexcept {
  if (dp_.valid()) {
    dp_.abort(code);
  } else if (tp_.valid()) {
    tp_.abort(code);
  } else if (pp_.valid()) {
    pp_.abort(code);
  }
}

}  // namespace meshtrain::parallel
