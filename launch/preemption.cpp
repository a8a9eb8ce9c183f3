#include "launch/preemption.hpp"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <limits>
#include <system_error>
#include <thread>

#include <fmt/format.h>

#include "launch/trainer.hpp"
#include "runtime/log.hpp"

namespace meshtrain::launch {
namespace {

// Written by the handler, read by the training loop. Lock-free, so async-signal-safe.
std::atomic<int> g_stop{0};
static_assert(std::atomic<int>::is_always_lock_free);
std::atomic<bool> g_installed{false};
// The signals that ask a job to stop.
constexpr int kStopSignals[] = {SIGTERM, SIGINT, SIGUSR1};

void say(const char* text) {
  // write(2) is async-signal-safe; a short write of a line to stderr is not worth a retry.
  const ssize_t ignored = ::write(STDERR_FILENO, text, std::strlen(text));
  (void)ignored;
}

// The first stop signal is recorded and announced; SIGINT after that ends the process by SIGINT's
// default action (Ctrl-C twice). Async-signal-safe: it runs as a handler as well as on the
// watcher thread.
void take(int sig, bool in_handler) {
  int none = 0;
  if (g_stop.compare_exchange_strong(none, sig)) {
    switch (sig) {
      case SIGTERM:
        say("meshtrain: SIGTERM: stopping after this step, saving a checkpoint, exit status 75\n");
        break;
      case SIGUSR1:
        say("meshtrain: SIGUSR1: stopping after this step, saving a checkpoint, exit status 75\n");
        break;
      default:
        say("meshtrain: SIGINT: stopping after this step, saving a checkpoint, exit status 75 "
            "(Ctrl-C again stops at once)\n");
        break;
    }
  } else if (sig == SIGINT) {
    // Ctrl-C twice: the default action, now.
    say("meshtrain: SIGINT again: stopping at once\n");
    ::signal(SIGINT, SIG_DFL);
    if (!in_handler) {
      // The watcher blocks SIGINT (as every thread started after install_stop_handlers()):
      // let this one through to itself.
      sigset_t only;
      sigemptyset(&only);
      sigaddset(&only, SIGINT);
      ::pthread_sigmask(SIG_UNBLOCK, &only, nullptr);
    }
    ::raise(SIGINT);
  }
}

void on_signal(int sig) {
  const int saved_errno = errno;
  take(sig, true);
  errno = saved_errno;
}

sigset_t stop_set() {
  sigset_t set;
  sigemptyset(&set);
  for (int sig : kStopSignals) sigaddset(&set, sig);
  return set;
}

}  // namespace

void install_stop_handlers() {
  if (g_installed.exchange(true)) return;
  // The handler, for threads that were started before this call with the signals unblocked
  // (MPI's own threads, started in MPI_Init): a signal the kernel hands one of them is recorded
  // there.
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  // Interrupted system calls (file writes, sleeps) resume rather than fail with EINTR.
  sa.sa_flags = SA_RESTART;
  for (int sig : kStopSignals) ::sigaction(sig, &sa, nullptr);
  // The calling thread, and every thread it starts from now on (OpenMP's workers, the comm
  // progress thread), block the stop signals: no handler ever interrupts the compute. The
  // kernel writes a signal frame below the interrupted thread's stack pointer, and oneDNN 2.6's
  // AVX2 JIT kernels keep live data there: gpt-tiny on one rank with DNNL_MAX_CPU_ISA=AVX2 and a
  // handled signal every 50 us crashed within its first steps, and 3 ranks stopped by one
  // SIGUSR1 each corrupted the heap in about one run in 30 (glibc's free() aborting in a later
  // matmul). A watcher thread takes the signals with sigwait() instead.
  const sigset_t set = stop_set();
  ::pthread_sigmask(SIG_BLOCK, &set, nullptr);
  try {
    std::thread([set] {
      for (;;) {
        int sig = 0;
        if (::sigwait(&set, &sig) == 0) take(sig, false);
      }
    }).detach();
  } catch (const std::system_error& e) {
    // No thread: the handler takes them, as before.
    ::pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
    log::warn("stop signals: no watcher thread ({}); handled where they land", e.what());
  }
}

int stop_signal() {
  return g_stop.load();
}

void request_stop(int sig) {
  int none = 0;
  g_stop.compare_exchange_strong(none, sig);
}

void clear_stop_request() {
  g_stop.store(0);
}

std::string signal_name(int sig) {
  switch (sig) {
    case SIGTERM:
      return "SIGTERM";
    case SIGINT:
      return "SIGINT";
    case SIGUSR1:
      return "SIGUSR1";
    case SIGUSR2:
      return "SIGUSR2";
    case SIGHUP:
      return "SIGHUP";
    default:
      return fmt::format("signal {}", sig);
  }
}

void StopAgreement::post(comm::Communicator* world) {
  local_ = stop_signal();
  posted_ = true;
  if (world == nullptr || !world->valid() || world->size() == 1) return;
  // A float carries any signal number exactly.
  flag_ = Tensor::from_floats({static_cast<float>(local_)}, Shape{1}, DType::kF32);
  work_ = world->allreduce(flag_, comm::ReduceOp::kMax);
}

int StopAgreement::wait() {
  if (!posted_) return 0;
  posted_ = false;
  if (!work_.defined()) return local_;
  work_.wait();
  work_ = comm::Work();
  return static_cast<int>(flag_.data_as<float>()[0]);
}

// After the step `step` in which the ranks agreed to stop (r: the run's totals so far): its
// checkpoint (unless the state of that step is already one: a periodic save of the same step, or a
// rollback to a checkpoint), the record in metrics.jsonl, and the communicators finalized as
// finish() does.
TrainResult Trainer::stop_early(TrainResult r, int step) {
  const bool due =
      cfg_.ckpt_on_signal == "always" || (cfg_.ckpt_on_signal == "auto" && cfg_.ckpt_every > 0);
  std::string dir;
  if (checkpointed_step_ == step)
    dir = last_checkpoint_;
  else if (due)
    dir = save_checkpoint(step);
  if (is_root())
    log::warn("stopped by {} after step {} of {}: {}", signal_name(stop_signal_), step, cfg_.steps,
              dir.empty()
                  ? std::string("no checkpoint (checkpoint.on_signal = \"" + cfg_.ckpt_on_signal +
                                "\", checkpoint.every = " + std::to_string(cfg_.ckpt_every) + ")")
                  : "checkpoint " + dir);
  log_.stopped(step, signal_name(stop_signal_), dir);
  r.steps = step;
  r.final_val_loss = std::numeric_limits<float>::quiet_NaN();
  r.skipped_steps = skipped_;
  r.unigram_entropy = unigram_entropy_;
  r.stop_signal = stop_signal_;
  r.stop_checkpoint = dir;
  if (comms_.dp.valid()) comms_.dp.finalize();
  if (comms_.tp.valid()) comms_.tp.finalize();
  mesh_.finalize();
  return r;
}

}  // namespace meshtrain::launch
