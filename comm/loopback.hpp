// The loopback backend: threads as ranks in one process.
//
// A LoopbackWorld creates N communicators that share state; each is used by its own thread. The
// semantics are those of the MPI backend (sequence numbers, timeouts naming the ranks that never
// arrived, the debug signature check, split), so that the communicator test suite runs in every
// build without mpirun, and so that parallel layers can be tested in one process.
//
// Numerics: reductions accumulate every rank's input in fp32, in rank order, and round once to
// the tensor's dtype (avg divides the fp32 sum). Results are bitwise identical on every rank.
//
// A collective runs when its last rank arrives, on that rank's thread. Loopback always checks
// that the ranks' calls match (it costs nothing here); a mismatch fails the collective on every
// rank with InvalidArgument.
//
// Point-to-point: a message is copied when the second of its send and recv is posted, on that
// rank's thread, and both works complete then (sends are rendezvous: a send waited on before
// its recv is posted does not complete, which is what NCCL does with large messages). dtype and
// shape are always compared; a mismatch fails both works with InvalidArgument. abort() cannot end
// the job from a thread: it fails every pending and future collective of the world on every rank
// instead.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "comm/communicator.hpp"

namespace meshtrain::comm {

namespace detail {
struct LoopbackState;
struct LoopbackGroup;
}  // namespace detail

class LoopbackWorld {
 public:
  // A world of `size` ranks (>= 1) whose communicators use `options`.
  explicit LoopbackWorld(int size, CommOptions options = CommOptions::from_settings());
  ~LoopbackWorld();
  LoopbackWorld(LoopbackWorld&&) noexcept;
  LoopbackWorld& operator=(LoopbackWorld&&) noexcept;
  LoopbackWorld(const LoopbackWorld&) = delete;
  LoopbackWorld& operator=(const LoopbackWorld&) = delete;

  int size() const { return size_; }
  // The world communicator of `rank`; each rank's can be taken once. The communicators may
  // outlive the LoopbackWorld (they share its state).
  Communicator take(int rank);
  // Runs fn(rank's communicator) on one thread per rank and joins them. The communicators are
  // finalized when fn returns; if fn throws on any rank, the first exception (by rank) is
  // rethrown here after every thread has ended.
  void run(const std::function<void(Communicator&)>& fn);

 private:
  int size_ = 0;
  CommOptions options_;
  std::shared_ptr<detail::LoopbackState> state_;
  std::shared_ptr<detail::LoopbackGroup> world_group_;
  std::vector<bool> taken_;
};

}  // namespace meshtrain::comm
