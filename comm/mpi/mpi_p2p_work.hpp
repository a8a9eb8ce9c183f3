// Internal to the MPI backend: MpiP2pWork, one posted send or recv (MPI_Isend / MPI_Irecv on
// the group's communicator), advanced by its owner and by the progress thread; the byte count
// and, in debug mode, the sender's dtype and shape are checked when a recv completes.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <condition_variable>
#include <functional>
#include <thread>

#include "comm/mpi/arrivals.hpp"
#include "comm/mpi/liveness.hpp"
#include "comm/mpi/mpi_check.hpp"
#include "comm/mpi/progress.hpp"
#include "comm/mpi/reduce16.hpp"
#include "comm/mpi/ring.hpp"
#include "runtime/log.hpp"

#include "comm/mpi/mpi_group.hpp"

namespace meshtrain::comm::detail {

// MPI_Test of a receive, made as MT_MPI_CHECK makes it (under mpi_mutex(); MpiError naming the
// call on failure), except for a message longer than the buffer: that error (class
// MPI_ERR_TRUNCATE) is the caller's mismatch, returned as a completion with *truncated set so
// that the work reports it as InvalidArgument. MPI_Error_class is made under the same lock.
bool test_receive(MPI_Request* request, MPI_Status* status, bool* truncated);

// One send or recv. As MpiWork, two threads may advance it: its owner (progress(), which
// finishes it: the byte count, the debug comparison, the copy to a device) and the progress
// thread (poll(), which only tests the request); `mu_` serialises them, the thread try-locks.
// A failure seen by either is kept and thrown by every later progress().
class MpiP2pWork final : public WorkImpl, public Pollable {
 public:
  MpiP2pWork(const Collective& c, Clock::time_point deadline, std::shared_ptr<MpiGroup> group,
             std::size_t bytes)
      : WorkImpl(c, deadline), group_(std::move(group)), bytes_(bytes) {}

  ~MpiP2pWork() override {
    if (!transferred_ && request_ != MPI_REQUEST_NULL) {
      // Only reachable when a communicator was abandoned; the buffers are leaked with it.
      log::warn("{} on group '{}' destroyed before it completed", collective().str(),
                group_->info.name);
    }
  }

  bool progress() override {
    std::lock_guard lock(mu_);
    if (done_) return true;
    rethrow();
    ring_progress_all();
    try {
      if (!transferred_ && !test()) return false;
      finish();
    } catch (const InvalidArgument& e) {
      failure_ = e.what();
      invalid_ = true;
      throw;
    } catch (const std::exception& e) {
      failure_ = e.what();
      throw;
    }
    return true;
  }

  void poll() noexcept override {
    if (group_->released.load(std::memory_order_acquire)) return;
    std::unique_lock lock(mu_, std::try_to_lock);
    if (!lock.owns_lock() || transferred_ || !failure_.empty()) return;
    try {
      if (!test()) return;
      progress_events().fetch_add(1, std::memory_order_relaxed);
    } catch (const std::exception& e) {
      failure_ = e.what();  // thrown by the owner's next progress()
    }
    done_cv_.notify_all();
  }

  // As MpiWork::wait_until: spins for a while, then sleeps until the progress thread reports the
  // transfer done (or 20 us .. 1 ms pass).
  bool wait_until(Clock::time_point until) override {
    constexpr auto kSpin = std::chrono::milliseconds(1);
    const auto start = Clock::now();
    auto nap = std::chrono::microseconds(20);
    for (;;) {
      if (progress()) return true;
      const auto now = Clock::now();
      if (now >= until) return false;
      if (now - start < kSpin) continue;
      if (!group_->engine) {
        liveness_serve();
        std::this_thread::yield();
        continue;
      }
      std::unique_lock lock(mu_);
      done_cv_.wait_for(lock, std::min<Clock::duration>(nap, until - now),
                        [&] { return transferred_ || !failure_.empty(); });
      nap = std::min(nap * 2, std::chrono::microseconds(1000));
    }
  }

  std::string describe_timeout() override {
    std::lock_guard lock(mu_);
    return group_->describe_p2p_timeout(collective());
  }

  MPI_Request* request() { return &request_; }
  void on_complete(std::function<void()> f) { finish_ = std::move(f); }
  void keep(const Tensor& t) { keep_.push_back(t); }

 private:
  void rethrow() const {
    if (failure_.empty()) return;
    if (invalid_) throw InvalidArgument(failure_);
    throw MpiError(failure_);
  }

  // Tests the request (mu_ held); true once the transfer is complete.
  bool test() {
    int flag = 0;
    if (collective().op == OpType::kRecv) {
      flag = test_receive(&request_, &status_, &truncated_) ? 1 : 0;
    } else {
      MT_MPI_CHECK(MPI_Test(&request_, &flag, MPI_STATUS_IGNORE));
    }
    if (!flag) return false;
    transferred_ = true;
    mark_completed();
    return true;
  }

  // After the transfer, on the owner's thread (mu_ held): a recv checks what it got against what
  // it expected, then the data goes to the device.
  void finish() {
    const Collective& c = collective();
    if (c.op == OpType::kRecv) {
      int got = 0;
      if (!truncated_) MT_MPI_CHECK(MPI_Get_count(&status_, MPI_BYTE, &got));
      if (truncated_ || static_cast<std::size_t>(got) != bytes_) {
        // What the sender posted, if its announcement is here: says which side is wrong.
        std::string sent;
        if (const auto peer = group_->board->p2p_peer(c, group_->grace()); peer.matching) {
          sent = fmt::format(" (its send #{} is {}{})", peer.matching->seq,
                             dtype_name(peer.matching->dtype), peer.matching->in_shape.str());
        }
        throw InvalidArgument(fmt::format(
            "{} on group '{}': rank {} sent {}{}, but this recv holds {} bytes (a send and its "
            "recv must have the same dtype and shape)",
            c.str(), group_->info.name, c.peer,
            truncated_ ? "more bytes" : fmt::format("{} bytes", got), sent, bytes_));
      }
      if (group_->options.debug) {
        // The sender announced its send before posting it; its announcement may still be on
        // the way when the data is here.
        const PeerP2p peer = group_->board->p2p_peer(c, group_->grace());
        if (peer.matching) {
          const std::string msg = p2p_mismatch(c, *peer.matching, group_->info.name);
          if (!msg.empty()) throw InvalidArgument(msg);
        }
      }
    }
    if (finish_) finish_();
    finish_ = nullptr;
    keep_.clear();
    done_ = true;
  }

  std::shared_ptr<MpiGroup> group_;
  std::size_t bytes_;
  std::mutex mu_;
  std::condition_variable done_cv_;
  MPI_Request request_ = MPI_REQUEST_NULL;
  MPI_Status status_{};
  std::function<void()> finish_;
  std::vector<Tensor> keep_;
  bool transferred_ = false;
  bool truncated_ = false;
  bool done_ = false;
  std::string failure_;
  bool invalid_ = false;  // failure_ is the caller's (InvalidArgument), not MPI's
};

}  // namespace meshtrain::comm::detail
