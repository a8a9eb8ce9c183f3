// Who is still there: a liveness check that a rank runs when one of its collectives times out, so
// that the CommTimeout names the rank that was lost (exited, killed, stopped) even when that rank
// had posted the collective before it went (the arrival side channel, comm/mpi/arrivals.hpp,
// only knows who posted).
//
// One channel per process: a duplicate of MPI_COMM_WORLD made by MpiSession, on which every
// process keeps one receive posted for pings. A ping is answered by whichever thread gets to it
// first: the progress thread (comm/mpi/progress.hpp, which wakes for this every 100 ms while it
// has nothing else to do), a caller waiting on a collective without a progress thread, or a
// rank that is itself running a check. A check sends a ping to each peer and waits a bounded
// window for the answers; a process that is alive answers within about 100 ms, one that is gone
// or stopped never does. Nothing is exchanged while no collective times out: a healthy run pays
// one MPI_Test on the posted receive at most ten times a second, and no messages.
//
// What an answer proves: the process runs and its MPI progresses, not that its main thread is
// not stuck. That is the distinction that matters here: with the progress thread running, a
// collective that every rank posted stalls only when a process has stopped or died.
//
// A stopped process can still answer late: when the job is torn down (one rank's MPI_Abort),
// Open MPI sends SIGCONT before SIGTERM, so a rank frozen by SIGSTOP resumes and answers the
// pings of a check still running on another rank. So every answer also says how long the
// answering process had not run just before: the channel keeps a beat of its own (a thread that
// makes no MPI call and wakes every 100 ms for as long as the channel exists), and a gap of over
// 3 s in those beats, seen when answering or in the last minute, means the process was stopped
// or starved of CPU. The checker names such a rank as stalled rather than alive. The beat is not
// the progress thread's: that thread does not exist before the first communicator, after the
// last one, or under MESHTRAIN_COMM_PROGRESS=caller, and a rank stopped then answered (after
// SIGCONT) that it had not stalled at all.
//
// Internal to comm/; no mpi.h here. Thread-safe.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

namespace meshtrain::comm::detail {

class Liveness {
 public:
  // Collective over MPI_COMM_WORLD (MPI_Comm_dup): every process creates it once, after MPI_Init.
  Liveness();
  // release() if not done; never throws.
  ~Liveness();
  Liveness(const Liveness&) = delete;
  Liveness& operator=(const Liveness&) = delete;
  // Cancels the posted receive and frees the channel (before MPI_Finalize). Idempotent.
  void release() noexcept;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// The beat that tells how long this process did not run (stopped or starved of CPU). Times are
// steady_clock ticks since its epoch, passed in so that the decision can be tested; 0 is never a
// time. One thread beats (the channel's beat thread); any thread may ask. Never throws.
class StallClock {
 public:
  // A gap between beats longer than this is a stall; a stall is remembered for kMemory after it.
  // 3 s, not less: at load 12 on two cores a sleeping rank's thread went unscheduled for just
  // over 1 s.
  static constexpr std::chrono::seconds kStall{3};
  static constexpr std::chrono::seconds kMemory{60};

  // A beat at `now`: records the gap since the last beat if it was a stall.
  void beat(std::int64_t now) noexcept;
  // No beat is expected until the next one (the beat thread ends): the next beat starts afresh.
  void reset() noexcept;
  // How long the process had not run just before `now`, in milliseconds: the current gap if the
  // beat is overdue by more than kStall (stopped now, or resumed and the beat thread has not run
  // yet), else the last stall if it ended within kMemory; 0 before the first beat.
  std::uint64_t stalled_ms(std::int64_t now) const noexcept;

 private:
  std::atomic<std::int64_t> last_{0};
  std::atomic<std::int64_t> stall_{0};
  std::atomic<std::int64_t> stall_end_{0};
};

// Answers the pings that have arrived, without blocking. `force`: even if another call answered
// less than 100 ms ago. A no-op without a channel or while another thread is answering. Never
// throws.
void liveness_serve(bool force = false) noexcept;

struct LivenessResult {
  std::vector<int> lost;  // world ranks that did not answer within the window
  // World ranks that answered, with the seconds they had not run just before (stopped or
  // starved of CPU; over 3 s), by their own beat (StallClock).
  std::vector<std::pair<int, double>> stalled;
};

// Pings each of `world_ranks` (this process is skipped) and waits until each has answered or
// `window` has passed, answering pings meanwhile. Returns who did not answer and who answered
// after a stall, or nullopt when this process has no channel (MPI not started by MpiSession) or
// the check itself failed.
std::optional<LivenessResult> liveness_check(const std::vector<int>& world_ranks,
                                             std::chrono::milliseconds window) noexcept;

}  // namespace meshtrain::comm::detail
