// Progress for the MPI backend while the caller computes: one background thread per process
// that advances every collective in flight, and the lock that makes it legal.
//
// Why a thread: MPI moves a non-blocking operation only inside an MPI call, and our rings
// (comm/mpi/ring.hpp) take a step only when advanced. Polling from the caller between layers of
// backward left a bucket idle for a whole layer, so little of the reduction was hidden. The
// thread advances the rings and tests the requests of every collective in flight while the
// caller computes; the caller's own test()/wait() still advance them too.
//
// Why MPI_THREAD_SERIALIZED is enough: every MPI call of comm/ is made inside MT_MPI_CHECK or
// MT_MPI_LOG, which hold one process-wide mutex (mpi_mutex()) for the duration of the call, so
// no two MPI calls of this process ever overlap. The thread therefore runs only when comm/ makes
// every MPI call of the process: when MpiSession initialised MPI itself (mark_mpi_owned()), or
// when MPI provides MPI_THREAD_MULTIPLE (an embedding program then may call MPI freely too).
//
// Why it does not steal the compute core: the thread sleeps on a condition variable while no
// collective is in flight, and while one is, it polls at an adaptive interval (a tenth of
// MESHTRAIN_COMM_POLL_US after a poll that moved something, doubling to at most
// MESHTRAIN_COMM_POLL_US while nothing moves; auto: 2 ms on one node, 0.4 ms across nodes) and
// sleeps in
// between. A poll costs a few microseconds, so the thread takes a few percent of one core while
// communication is in flight and nothing otherwise. It never blocks inside MPI.
//
// Lifetime: the engine is shared by the MPI groups that use it (a shared_ptr each) and exists
// while at least one does; nothing with static lifetime owns it. progress_shutdown() stops it for
// good before MPI_Finalize or MPI_Abort. Internal to comm/; no mpi.h here.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>

namespace meshtrain::comm::detail {

// The lock held around every MPI call of comm/ (by MT_MPI_CHECK and MT_MPI_LOG).
std::mutex& mpi_mutex();

// Counts transfers completed by any operation (ring segments, request completions): the
// progress thread backs off while it stands still.
std::atomic<std::uint64_t>& progress_events();

// Something the engine advances: an MPI collective in flight. poll() must not block and must
// tolerate being called concurrently with the owner's own calls (it try-locks).
class Pollable {
 public:
  virtual ~Pollable() = default;
  virtual void poll() noexcept = 0;
};

class ProgressEngine {
 public:
  // The process's engine, started on first use; null when a progress thread is not allowed
  // (MESHTRAIN_COMM_PROGRESS=caller, MPI not owned by comm/ and not MPI_THREAD_MULTIPLE, or
  // after progress_shutdown()).
  static std::shared_ptr<ProgressEngine> acquire();
  ~ProgressEngine();
  ProgressEngine(const ProgressEngine&) = delete;
  ProgressEngine& operator=(const ProgressEngine&) = delete;

  // Advances `p` (and every ring in flight) from the thread until `p` expires or the engine
  // stops. Wakes the thread.
  void add(std::weak_ptr<Pollable> p);
  // Stops and joins the thread (detaches it when called from the thread itself). Idempotent.
  void stop() noexcept;

  struct Impl;

 private:
  ProgressEngine();
  std::shared_ptr<Impl> impl_;
};

// The poll interval's ceiling when MESHTRAIN_COMM_POLL_US is auto: MpiSession sets it from where
// the ranks are (kPollUsOneNode when all share a node, else kPollUsNodes, the default).
inline constexpr int kPollUsOneNode = 2000;
inline constexpr int kPollUsNodes = 400;
void set_auto_poll_us(int us);

// MpiSession initialised MPI (at least MPI_THREAD_SERIALIZED): comm/ makes every MPI call.
void mark_mpi_owned(bool owned);
// Stops the engine's thread for good (before MPI_Finalize / MPI_Abort). Never throws.
void progress_shutdown() noexcept;

}  // namespace meshtrain::comm::detail
