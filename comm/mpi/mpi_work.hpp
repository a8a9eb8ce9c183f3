// Internal to the MPI backend: MpiWork, one posted collective (an MPI non-blocking collective or
// one of our rings), advanced by its owner and by the progress thread.
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

// One posted collective. Two threads may advance it: its owner (progress(), which finishes it)
// and the progress thread (poll(), which only moves the transfer and records when it completed).
// `mu_` serialises them; the thread only try-locks it.
class MpiWork final : public WorkImpl, public Pollable {
 public:
  MpiWork(const Collective& c, Clock::time_point deadline, std::shared_ptr<MpiGroup> group)
      : WorkImpl(c, deadline), group_(std::move(group)) {}

  ~MpiWork() override {
    if (request_ != MPI_REQUEST_NULL || (ring_ && !ring_->done())) {
      // Only reachable when a communicator was abandoned; the buffers are leaked with it.
      log::warn("{} on group '{}' destroyed before it completed", collective().str(),
                group_->info.name);
    }
  }

  bool progress() override {
    std::lock_guard lock(mu_);
    if (done_) return true;
    // Every ring in flight, of any group: a peer may be waiting for one this rank is not.
    ring_progress_all();
    if (!transferred_) {
      if (ring_) {
        if (!ring_->advance()) return false;
      } else {
        int flag = 0;
        MT_MPI_CHECK(MPI_Test(&request_, &flag, MPI_STATUS_IGNORE));
        if (!flag) return false;
      }
      transferred_ = true;
      mark_completed();
    }
    if (finish_) finish_();
    finish_ = nullptr;
    keep_.clear();
    done_ = true;
    return true;
  }

  // From the progress thread: advance the transfer; never runs finish_ (device copies and
  // conversions stay on the owner's thread). Errors are left for the owner's progress().
  void poll() noexcept override {
    if (group_->released.load(std::memory_order_acquire)) return;
    std::unique_lock lock(mu_, std::try_to_lock);
    if (!lock.owns_lock() || transferred_) return;
    try {
      if (ring_) {
        if (!ring_->done()) return;  // ring_progress_all() has just advanced it
      } else {
        int flag = 0;
        MT_MPI_CHECK(MPI_Test(&request_, &flag, MPI_STATUS_IGNORE));
        if (!flag) return;
      }
      transferred_ = true;
      mark_completed();
      progress_events().fetch_add(1, std::memory_order_relaxed);
      done_cv_.notify_all();
    } catch (const std::exception& e) {
      // MPI_Test failed: the owner's progress() sees the request still pending and the error
      // again (or a timeout).
      log::debug("{}: progress thread: {}", collective().str(), e.what());
    }
  }

  // Spins for a while (the lowest latency on an idle machine), then, when the progress thread
  // is there to move the transfer, sleeps until it reports it done (or 20 us .. 1 ms pass, to
  // finish it here and watch the deadline). A waiter that kept spinning would take the core from
  // the peer it waits for whenever ranks outnumber cores, and from the progress thread.
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
        liveness_serve();  // and only this thread answers liveness checks (at most every 100 ms)
        std::this_thread::yield();  // only this thread moves it
        continue;
      }
      std::unique_lock lock(mu_);
      done_cv_.wait_for(lock, std::min<Clock::duration>(nap, until - now),
                        [&] { return transferred_; });
      nap = std::min(nap * 2, std::chrono::microseconds(1000));
    }
  }

  std::string describe_timeout() override {
    std::lock_guard lock(mu_);
    return group_->describe_timeout(collective());
  }

  MPI_Request* request() { return &request_; }
  // Runs the collective as a ring (comm/mpi/ring.hpp) instead of an MPI request.
  void start_ring(const RingSpec& spec) {
    ring_ = std::make_shared<RingOp>(spec);
    ring_register(ring_);
  }
  // Runs once, when the collective has completed (conversions back, avg division, copies back
  // to the device).
  void on_complete(std::function<void()> f) { finish_ = std::move(f); }
  // Keeps buffers alive until completion.
  void keep(const Tensor& t) { keep_.push_back(t); }

 private:
  std::shared_ptr<MpiGroup> group_;
  std::mutex mu_;
  std::condition_variable done_cv_;  // the progress thread finished the transfer
  MPI_Request request_ = MPI_REQUEST_NULL;
  std::shared_ptr<RingOp> ring_;
  std::function<void()> finish_;
  std::vector<Tensor> keep_;
  bool transferred_ = false;  // the data has arrived (finish_ may still be due)
  bool done_ = false;
};

}  // namespace meshtrain::comm::detail
