#include "comm/mpi/liveness.hpp"

#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <list>
#include <mutex>
#include <thread>

#include "comm/mpi/mpi_check.hpp"
#include "runtime/log.hpp"

namespace meshtrain::comm::detail {
namespace {

using Clock = std::chrono::steady_clock;

// The channel carries nothing else; the two tags keep pings and answers apart.
constexpr int kPing = 0x4c50;  // "LP"
constexpr int kPong = 0x4c41;  // "LA"
// Answering more often cost steps: at most every 2 ms from the progress thread's polls, two
// ranks on two cores lost a third of their step time (an MPI_Test that runs Open MPI's whole
// progress loop, under the process's MPI lock). A live process answers within this.
constexpr auto kServeEvery = std::chrono::milliseconds(100);
// The beat thread's period. Any period far below StallClock::kStall would do; 100 ms costs ten
// wake-ups a second and no MPI call.
constexpr auto kBeatEvery = std::chrono::milliseconds(100);

std::int64_t ticks(Clock::duration d) {
  return static_cast<std::int64_t>(d.count());
}
std::int64_t now_ticks() {
  return ticks(Clock::now().time_since_epoch());
}

// A pong: the ping's nonce, and the milliseconds the answering process had not run just before.
struct Pong {
  std::uint64_t nonce = 0;
  std::uint64_t stalled_ms = 0;
};

// One message being sent; its buffer lives until the send completed (or is leaked with the
// channel: a peer that is gone may never take it).
struct Outgoing {
  std::uint64_t value[2] = {0, 0};
  MPI_Request request = MPI_REQUEST_NULL;
};

// This process's beat: kept by the beat thread of its channel (Liveness::Impl), read by whichever
// thread answers a ping.
StallClock& stall_clock() {
  static StallClock c;
  return c;
}

}  // namespace

struct Liveness::Impl {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0;
  std::uint64_t ping_in = 0;  // the posted receive's buffer: the pinger's nonce
  MPI_Request ping_request = MPI_REQUEST_NULL;
  std::list<Outgoing> sends;  // a list: completed sends leave from anywhere, the others stay put
  std::uint64_t next_nonce = 1;
  // The beat thread (no MPI calls): beats stall_clock() every kBeatEvery until `stop`.
  std::mutex beat_mu;
  std::condition_variable beat_cv;
  bool beat_stop = false;
  std::thread beat_thread;

  // Joins the beat thread if release() did not (a constructor that threw after starting it).
  ~Impl() { stop_beat(); }

  void start_beat() {
    stall_clock().reset();
    beat_thread = std::thread([this] {
      std::unique_lock lock(beat_mu);
      do {
        stall_clock().beat(now_ticks());
      } while (!beat_cv.wait_for(lock, kBeatEvery, [this] { return beat_stop; }));
    });
  }

  void stop_beat() noexcept {
    {
      std::lock_guard lock(beat_mu);
      beat_stop = true;
    }
    beat_cv.notify_all();
    if (!beat_thread.joinable()) return;
    try {
      beat_thread.join();
    } catch (const std::exception& e) {
      log::warn("liveness channel: the beat thread did not join: {}", e.what());
    }
    stall_clock().reset();
  }

  void post_ping_receive() {
    MT_MPI_CHECK(MPI_Irecv(&ping_in, 1, MPI_UINT64_T, MPI_ANY_SOURCE, kPing, comm, &ping_request));
  }

  // Sends `count` (1 or 2) words: a ping's nonce, or a pong.
  void send(std::uint64_t v0, std::uint64_t v1, int count, int to, int tag) {
    Outgoing& o = sends.emplace_back();
    o.value[0] = v0;
    o.value[1] = v1;
    MT_MPI_CHECK(MPI_Isend(o.value, count, MPI_UINT64_T, to, tag, comm, &o.request));
  }

  // Answers every ping that has arrived; retires completed sends.
  void serve() {
    for (;;) {
      int flag = 0;
      MPI_Status st;
      MT_MPI_CHECK(MPI_Test(&ping_request, &flag, &st));
      if (!flag) break;
      const std::uint64_t nonce = ping_in;
      post_ping_receive();
      send(nonce, stall_clock().stalled_ms(now_ticks()), 2, st.MPI_SOURCE, kPong);
    }
    for (auto it = sends.begin(); it != sends.end();) {
      int done = 0;
      MT_MPI_CHECK(MPI_Test(&it->request, &done, MPI_STATUS_IGNORE));
      it = done ? sends.erase(it) : std::next(it);
    }
  }
};

namespace {

// Process-wide: the channel of this process's MpiSession (owned there; a reference only).
struct Registry {
  std::mutex mu;
  Liveness::Impl* impl = nullptr;
  std::atomic<Clock::rep> last_serve{0};
};
Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace

Liveness::Liveness() : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  MT_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &s.comm));
  MT_MPI_CHECK(MPI_Comm_set_errhandler(s.comm, MPI_ERRORS_RETURN));
  MT_MPI_CHECK(MPI_Comm_rank(s.comm, &s.rank));
  s.post_ping_receive();
  s.start_beat();
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  r.impl = &s;
}

Liveness::~Liveness() {
  release();
}

void Liveness::release() noexcept {
  if (!impl_ || impl_->comm == MPI_COMM_NULL) return;
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  if (r.impl == impl_.get()) r.impl = nullptr;
  Impl& s = *impl_;
  if (s.ping_request != MPI_REQUEST_NULL) {
    MT_MPI_LOG(MPI_Cancel(&s.ping_request));
    MT_MPI_LOG(MPI_Wait(&s.ping_request, MPI_STATUS_IGNORE));
  }
  bool pending = false;
  for (Outgoing& o : s.sends) {
    if (o.request == MPI_REQUEST_NULL) continue;
    int done = 0;
    MT_MPI_LOG(MPI_Test(&o.request, &done, MPI_STATUS_IGNORE));
    if (!done) {
      MT_MPI_LOG(MPI_Request_free(&o.request));  // MPI completes it; its buffer is leaked below
      pending = true;
    }
  }
  if (pending) new std::list<Outgoing>(std::move(s.sends));
  MT_MPI_LOG(MPI_Comm_free(&s.comm));
  s.comm = MPI_COMM_NULL;
  s.stop_beat();
}

void StallClock::beat(std::int64_t now) noexcept {
  // One writer. The stall is stored before the new beat is, so that a reader that sees the new
  // beat (and with it no overdue gap) also sees the stall it ended (release/acquire on last_).
  const std::int64_t last = last_.load(std::memory_order_relaxed);
  if (last != 0 && now - last > ticks(kStall)) {
    stall_.store(now - last, std::memory_order_relaxed);
    stall_end_.store(now, std::memory_order_release);
  }
  last_.store(now, std::memory_order_release);
}

void StallClock::reset() noexcept {
  last_.store(0, std::memory_order_release);
}

std::uint64_t StallClock::stalled_ms(std::int64_t now) const noexcept {
  std::int64_t gap = 0;
  if (const std::int64_t last = last_.load(std::memory_order_acquire);
      last != 0 && now - last > ticks(kStall))
    gap = now - last;
  const std::int64_t end = stall_end_.load(std::memory_order_acquire);
  if (end != 0 && now - end < ticks(kMemory))
    gap = std::max(gap, stall_.load(std::memory_order_relaxed));
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::duration(gap)).count());
}

void liveness_serve(bool force) noexcept {
  Registry& r = registry();
  const Clock::rep now = Clock::now().time_since_epoch().count();
  if (!force && now - r.last_serve.load(std::memory_order_relaxed) <
                    std::chrono::duration_cast<Clock::duration>(kServeEvery).count())
    return;
  std::unique_lock lock(r.mu, std::try_to_lock);
  if (!lock.owns_lock() || r.impl == nullptr) return;
  r.last_serve.store(now, std::memory_order_relaxed);
  try {
    r.impl->serve();
  } catch (const std::exception& e) {
    log::debug("liveness channel: {}", e.what());
  }
}

std::optional<LivenessResult> liveness_check(const std::vector<int>& world_ranks,
                                             std::chrono::milliseconds window) noexcept {
  Registry& r = registry();
  std::vector<int> peers;
  // The receives' buffers; leaked if the check ends with receives still posted (an MPI error).
  auto answers_owner = std::make_unique<std::vector<Pong>>();
  std::vector<Pong>& answers = *answers_owner;
  std::vector<MPI_Request> receives;
  std::vector<bool> answered;
  try {
    std::unique_lock lock(r.mu);
    if (r.impl == nullptr) return std::nullopt;
    Liveness::Impl& s = *r.impl;
    for (int w : world_ranks) {
      if (w != s.rank && std::find(peers.begin(), peers.end(), w) == peers.end())
        peers.push_back(w);
    }
    const std::size_t n = peers.size();
    const std::uint64_t nonce = s.next_nonce++;
    answers.assign(n, Pong{});
    receives.assign(n, MPI_REQUEST_NULL);
    answered.assign(n, false);
    for (std::size_t i = 0; i < n; ++i) {
      MT_MPI_CHECK(MPI_Irecv(&answers[i], 2, MPI_UINT64_T, peers[i], kPong, s.comm, &receives[i]));
      s.send(nonce, 0, 1, peers[i], kPing);
    }
    lock.unlock();
    const auto until = Clock::now() + window;
    for (;;) {
      lock.lock();
      MT_ASSERT(r.impl == &s, "the liveness channel was released during a check");
      s.serve();
      std::size_t left = 0;
      for (std::size_t i = 0; i < n; ++i) {
        if (answered[i]) continue;
        int flag = 0;
        MT_MPI_CHECK(MPI_Test(&receives[i], &flag, MPI_STATUS_IGNORE));
        if (flag && answers[i].nonce == nonce) {
          answered[i] = true;
          continue;
        }
        if (flag)  // a late answer to an earlier check: listen again
          MT_MPI_CHECK(
              MPI_Irecv(&answers[i], 2, MPI_UINT64_T, peers[i], kPong, s.comm, &receives[i]));
        ++left;
      }
      if (left == 0 || Clock::now() >= until) {
        for (std::size_t i = 0; i < n; ++i) {
          if (answered[i] || receives[i] == MPI_REQUEST_NULL) continue;
          MT_MPI_LOG(MPI_Cancel(&receives[i]));
          MT_MPI_LOG(MPI_Wait(&receives[i], MPI_STATUS_IGNORE));
        }
        break;
      }
      lock.unlock();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  } catch (const std::exception& e) {
    log::warn("liveness check failed: {}", e.what());
    (void)answers_owner.release();
    return std::nullopt;
  }
  LivenessResult result;
  for (std::size_t i = 0; i < peers.size(); ++i) {
    if (!answered[i]) {
      result.lost.push_back(peers[i]);
    } else if (answers[i].stalled_ms >=
               static_cast<std::uint64_t>(std::chrono::milliseconds(StallClock::kStall).count())) {
      result.stalled.emplace_back(peers[i], static_cast<double>(answers[i].stalled_ms) / 1e3);
    }
  }
  return result;
}

}  // namespace meshtrain::comm::detail
