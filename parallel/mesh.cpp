#include "parallel/mesh.hpp"

#include "runtime/error.hpp"

namespace meshtrain::parallel {

Mesh::Mesh(comm::Communicator& world, int tp) {
  MT_CHECK(world.valid(), "Mesh: the world communicator is not valid");
  MT_CHECK(tp >= 1 && world.size() % tp == 0,
           "Mesh: the world size ({}) must be a multiple of the tensor-parallel size ({})",
           world.size(), tp);
  tp_size_ = tp;
  dp_size_ = world.size() / tp;
  tp_rank_ = world.rank() % tp;
  dp_rank_ = world.rank() / tp;
  // Both splits on every rank, in the same order: split is collective over the world.
  dp_ = world.split(/*color=*/tp_rank_, /*key=*/dp_rank_);
  tp_ = world.split(/*color=*/dp_rank_, /*key=*/tp_rank_);
  MT_ASSERT(dp_.size() == dp_size_ && dp_.rank() == dp_rank_, "DP group {} of {}", dp_.rank(),
            dp_.size());
  MT_ASSERT(tp_.size() == tp_size_ && tp_.rank() == tp_rank_, "TP group {} of {}", tp_.rank(),
            tp_.size());
}

void Mesh::finalize() {
  if (dp_.valid()) dp_.finalize();
  if (tp_.valid()) tp_.finalize();
}

void Mesh::abort(int code) noexcept {
  if (dp_.valid()) {
    dp_.abort(code);
  } else if (tp_.valid()) {
    tp_.abort(code);
  }
}

}  // namespace meshtrain::parallel
