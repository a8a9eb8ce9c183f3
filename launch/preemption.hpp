// Graceful preemption: SIGTERM, SIGINT or SIGUSR1 asks a training job to stop after the step in
// flight, write a checkpoint and exit with status 75 (kExitPreempted: EX_TEMPFAIL, "temporary
// failure, retry"), which launch/meshtrain-supervise and deploy/slurm/*.sbatch treat as
// "requeue and resume", not as a failure (Megatron's --exit-signal-handler, for the same
// reason: Slurm and Kubernetes send a signal some time before they kill a job).
//
// The ranks agree on stopping: every step each rank posts the signal it has received (0 if none)
// to a max-allreduce over the world communicator, posted before the optimizer update and read at
// the end of the step (so it hides behind the update), and every rank stops after the step in
// which any rank's signal was posted: all stop after the same step even when one rank alone got
// the signal (`scancel --signal=USR1` to some tasks, `kill` of one rank, a launcher forwarding
// to some). A signal that arrives during the update or later is posted with the next step, so a
// job stops within one step plus the one in flight, then writes its checkpoint.
//
// How signals reach the ranks (docs/preemption.md has the measurements):
//   - Open MPI's mpirun forwards SIGUSR1 and SIGUSR2 to every rank. On SIGTERM or SIGINT it ends
//     the job: SIGTERM to every rank, then SIGKILL after odls_base_sigkill_timeout seconds
//     (Open MPI 4.1's default is 1 s, too short to save); launch/mtrun sets it (--stop-timeout).
//   - srun delivers signals to the tasks directly; `sbatch --signal=USR1@120` sends USR1 to the
//     job's steps 120 s before the time limit.
//   - Kubernetes sends SIGTERM to every container of the job's pods, and SIGKILL
//     terminationGracePeriodSeconds later.
// A second SIGINT (Ctrl-C twice) ends the process at once, by the default action.
#pragma once

#include <string>

#include "comm/communicator.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain::launch {

// The exit status of a job that stopped on a signal (with its checkpoint written when one was
// due): EX_TEMPFAIL of <sysexits.h>.
inline constexpr int kExitPreempted = 75;

// Installs the process's handling of SIGTERM, SIGINT and SIGUSR1 (idempotent). The first such
// signal is recorded (stop_signal()) and a line says so on stderr; any SIGINT after that ends the
// process by SIGINT's default action. The signals are blocked in the calling thread and in every
// thread it starts afterwards, and a watcher thread takes them (sigwait), so that no handler ever
// interrupts a computing thread: oneDNN's AVX2 JIT kernels keep data below the stack pointer,
// where a handler's signal frame lands (preemption.cpp). Call it before starting threads that
// compute (after MPI_Init is fine: MPI's threads only get the handler). For the CLI; an embedder
// may call it too, or call request_stop() from its own handling.
void install_stop_handlers();

// The signal that asked this process to stop (the first), or 0.
int stop_signal();
// Records `sig` as if it had been received (embedders, tests). Async-signal-safe.
void request_stop(int sig);
// Forgets a recorded stop (tests).
void clear_stop_request();
// "SIGTERM", "SIGUSR1", ..., or "signal N".
std::string signal_name(int sig);

// The agreement of one step over the ranks of `world` (null or a world of one: this process
// alone). post() sends this rank's stop_signal(); wait() returns the largest any rank sent, or 0.
// Collective: every rank posts once per step, in the same order as its other collectives on
// `world` (the Trainer uses `world` for nothing else while steps run).
class StopAgreement {
 public:
  void post(comm::Communicator* world);
  int wait();

 private:
  Tensor flag_;
  comm::Work work_;
  int local_ = 0;
  bool posted_ = false;
};

}  // namespace meshtrain::launch
