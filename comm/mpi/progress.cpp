#include "comm/mpi/progress.hpp"

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <thread>
#include <vector>

#include "comm/mpi/liveness.hpp"
#include "comm/mpi/mpi_check.hpp"
#include "comm/mpi/ring.hpp"
#include "runtime/log.hpp"
#include "runtime/settings.hpp"

namespace meshtrain::comm::detail {
namespace {

// Poll interval while a collective is in flight: a tenth of the ceiling after a poll that moved
// data (the next segment is likely ready soon), doubling while nothing moves, up to the ceiling:
// MESHTRAIN_COMM_POLL_US, or by default 2 ms when every rank is on one node and 0.4 ms when the
// job spans nodes. Every wake-up preempts the compute thread on its core: at 50-400 us, two
// ranks on two cores made 2,000 context switches a step each and spent about 8% of the step in
// the kernel, and weak scaling 1 -> 2 ranks was 86% against 91% at 0.2-2 ms (bench/results/
// dp.md). Across a network the ring needs its next step posted promptly (a ring holds two
// segments in flight): over a 10 Gbit/s link 86% of the allreduce was hidden at 0.4 ms, 60-74%
// at 2 ms. The caller's wait() polls on its own once backward is done.
std::atomic<int> g_auto_poll_us{kPollUsNodes};
// While nothing is in flight the thread still wakes this often to answer liveness checks
// (comm/mpi/liveness.hpp): one MPI_Test, a few microseconds, ten times a second.
constexpr auto kIdleWake = std::chrono::milliseconds(100);

// Process-wide bookkeeping; it owns no engine (a weak reference) and no MPI resource.
struct Registry {
  std::mutex mu;
  std::weak_ptr<ProgressEngine> engine;
  bool shutdown = false;
};
Registry& registry() {
  static Registry r;
  return r;
}
std::atomic<bool> g_mpi_owned{false};

}  // namespace

std::atomic<std::uint64_t>& progress_events() {
  static std::atomic<std::uint64_t> n{0};
  return n;
}

struct ProgressEngine::Impl {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::weak_ptr<Pollable>> items;
  bool stop = false;
  bool woken = false;
  std::thread thread;

  void run() {
    const int poll_us =
        settings().comm_poll_us > 0 ? settings().comm_poll_us : g_auto_poll_us.load();
    const std::chrono::microseconds max_interval(poll_us);
    const std::chrono::microseconds min_interval(std::max(1, poll_us / 10));
    std::vector<std::shared_ptr<Pollable>> live;
    auto interval = min_interval;
    std::unique_lock lock(mu);
    while (!stop) {
      std::erase_if(items, [](const std::weak_ptr<Pollable>& w) { return w.expired(); });
      if (items.empty()) {
        // Nothing in flight: sleep until a collective is posted, waking every kIdleWake to
        // answer liveness checks (a peer whose collective timed out asks who is still there).
        cv.wait_for(lock, kIdleWake, [&] { return stop || !items.empty(); });
        interval = min_interval;
        if (!stop && items.empty()) {
          lock.unlock();
          liveness_serve();
          lock.lock();
        }
        continue;
      }
      for (const auto& w : items) {
        if (auto p = w.lock()) live.push_back(std::move(p));
      }
      lock.unlock();
      const std::uint64_t before = progress_events().load(std::memory_order_relaxed);
      ring_progress_all();
      for (const auto& p : live) p->poll();
      liveness_serve();  // at most every 100 ms (comm/mpi/liveness.cpp)
      const bool moved = progress_events().load(std::memory_order_relaxed) != before;
      // Dropping these may destroy the last reference to a group, and with it to the engine:
      // ~ProgressEngine then detaches instead of joining this thread (see there).
      live.clear();
      lock.lock();
      interval = moved ? min_interval : std::min(interval * 2, max_interval);
      cv.wait_for(lock, interval, [&] { return stop || woken; });
      woken = false;
    }
  }

  void halt() noexcept {
    {
      std::lock_guard lock(mu);
      stop = true;
    }
    cv.notify_all();
    if (!thread.joinable()) return;
    if (thread.get_id() == std::this_thread::get_id()) {
      thread.detach();  // the loop sees `stop` and returns; it holds its own reference to us
    } else {
      thread.join();
    }
  }
};

ProgressEngine::ProgressEngine() : impl_(std::make_shared<Impl>()) {}

ProgressEngine::~ProgressEngine() {
  if (impl_) impl_->halt();
}

void ProgressEngine::stop() noexcept {
  impl_->halt();
}

std::shared_ptr<ProgressEngine> ProgressEngine::acquire() {
  if (settings().comm_progress != "thread") return nullptr;
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  if (r.shutdown) return nullptr;
  if (auto e = r.engine.lock()) return e;
  int provided = MPI_THREAD_SINGLE;
  MT_MPI_CHECK(MPI_Query_thread(&provided));
  const bool allowed =
      provided == MPI_THREAD_MULTIPLE || (g_mpi_owned.load() && provided >= MPI_THREAD_SERIALIZED);
  if (!allowed) {
    log::debug(
        "comm: no progress thread (MPI thread level {} and MPI not initialised by meshtrain); "
        "collectives progress inside test() and wait() only",
        provided);
    return nullptr;
  }
  std::shared_ptr<ProgressEngine> e(new ProgressEngine());
  // The thread holds its own reference to the state it reads: when it is detached (see
  // halt()), the state outlives the engine until the loop returns.
  e->impl_->thread = std::thread([impl = e->impl_] { impl->run(); });
  r.engine = e;
  return e;
}

void ProgressEngine::add(std::weak_ptr<Pollable> p) {
  {
    std::lock_guard lock(impl_->mu);
    if (impl_->stop) return;
    impl_->items.push_back(std::move(p));
    impl_->woken = true;
  }
  impl_->cv.notify_one();
}

void set_auto_poll_us(int us) {
  g_auto_poll_us = us;
}

void mark_mpi_owned(bool owned) {
  g_mpi_owned = owned;
}

void progress_shutdown() noexcept {
  Registry& r = registry();
  std::shared_ptr<ProgressEngine> e;
  {
    std::lock_guard lock(r.mu);
    r.shutdown = true;
    e = r.engine.lock();
  }
  if (e) e->stop();
}

}  // namespace meshtrain::comm::detail
