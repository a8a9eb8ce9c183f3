// The end of the timeout path, as a job sees it. Run by ctest through
// tests/comm/expect_abort.cmake; each case ends the job with abort() from a rank that timed out,
// so the whole job must end with a non-zero status at once.
//
//   late     rank 1 never arrives (it sleeps, alive): rank 0 gets CommTimeout naming it as
//            never arrived and alive.
//   stopped  the last rank posts a large allreduce (a ring, which needs every rank to progress
//            it) and stops itself with SIGSTOP: every other rank gets CommTimeout naming it as
//            lost (it arrived, then did not answer the liveness check), within the timeout plus
//            the check's window, and no healthy rank is named.
//   resumed  as stopped, but the stopped rank is continued (SIGCONT, as Open MPI's teardown
//            does before SIGTERM) while the others' liveness check is waiting for it, and so
//            answers it: the others must still name it, as stalled for the seconds it did not
//            run, and never say that every rank answered. With MESHTRAIN_COMM_PROGRESS=caller
//            (no progress thread) too.
//
// Point-to-point, ranks as pipeline stages (the last rank the last stage):
//   p2p_late     the last stage never sends (it sleeps, alive): the stage before it gets
//                CommTimeout for its recv, naming the last stage with its label, as never having
//                posted the send, and as alive.
//   p2p_stopped  the last stage posts its recv of activations from the stage before it, then stops
//                with SIGSTOP; that stage's recv (of gradients) times out naming the last stage
//                as lost, and so does its large send (whose recv the last stage had posted).
//   p2p_killed   as p2p_stopped, but the last stage is killed (SIGKILL), with mpirun leaving the
//                job to the ranks (orte_abort_on_non_zero_status 0).
// The other stages sleep (alive) until the abort ends the job.

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

#include "comm/mpi.hpp"
#include "runtime/error.hpp"

namespace {

int p2p_case(meshtrain::comm::MpiSession& session, const std::string& mode) {
  using namespace meshtrain;
  using namespace meshtrain::comm;
  using Clock = std::chrono::steady_clock;
  CommOptions o;
  o.timeout_s = 4.0;
  Communicator pipeline = session.world(o);
  const int last = pipeline.size() - 1;
  const int stage = pipeline.rank();
  const std::string last_label = fmt::format("pipeline stage {}", last);
  Tensor activations = Tensor::zeros(Shape{1 << 20}, DType::kF32);  // 4 MiB: a send that waits
  Tensor grads = Tensor::zeros(Shape{1 << 10}, DType::kF32);
  if (stage == last) {
    if (mode == "p2p_late") {
      std::this_thread::sleep_for(std::chrono::seconds(60));
    } else {
      Work w = pipeline.recv(activations, last - 1, fmt::format("pipeline stage {}", last - 1));
      std::raise(mode == "p2p_killed" ? SIGKILL : SIGSTOP);
    }
    std::printf("rank %d: the job was not aborted\n", stage);
    return 0;
  }
  if (stage != last - 1) {
    std::this_thread::sleep_for(std::chrono::seconds(60));
    std::printf("rank %d: the job was not aborted\n", stage);
    return 0;
  }
  // The last stage posts (and stops) first.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const auto start = Clock::now();
  Work recv = pipeline.recv(grads, last, last_label);
  Work send = mode == "p2p_late" ? Work() : pipeline.send(activations, last, last_label);
  for (Work* w : {&recv, &send}) {
    if (!w->defined()) continue;
    try {
      w->wait();
      std::printf("rank %d: %s completed\n", stage, w->collective().str().c_str());
    } catch (const CommTimeout& e) {
      const double waited = std::chrono::duration<double>(Clock::now() - start).count();
      std::printf("rank %d caught CommTimeout after %.1f s (%s): %s\n", stage, waited,
                  waited < o.timeout_s + 10.0 ? "in time" : "TOO LATE", e.what());
      std::fflush(stdout);
    }
  }
  pipeline.abort(3);
  return 0;  // not reached
}

}  // namespace

int main(int argc, char** argv) {
  using namespace meshtrain;
  using namespace meshtrain::comm;
  using Clock = std::chrono::steady_clock;
  MpiSession session(&argc, &argv);
  const std::string mode = argc > 1 ? argv[1] : "late";
  if (mode.rfind("p2p_", 0) == 0) return p2p_case(session, mode);
  CommOptions o;
  o.timeout_s = mode == "late" ? 1.5 : 4.0;
  Communicator world = session.world(o);
  const int last = world.size() - 1;
  Tensor t = Tensor::from_floats({1.0f, 2.0f, 3.0f}, Shape{3}, DType::kF32);
  const bool stops = mode == "stopped" || mode == "resumed";
  if (stops) t = Tensor::zeros(Shape{1 << 20}, DType::kF32);  // 4 MiB: a ring
  if (mode == "late" && world.rank() == 1) {
    std::this_thread::sleep_for(std::chrono::seconds(60));
    std::printf("rank 1 woke up: the job was not aborted\n");
    return 0;
  }
  if (stops && world.rank() == last) {
    Work w = world.allreduce(t);
    if (mode == "resumed") {
      // The others post 0.5 s after us, time out 4 s later and then wait up to 3 s for the
      // liveness check's answers: a SIGCONT 6 s after our stop lands inside that window.
      const std::string cmd = "sleep 6; kill -CONT " + std::to_string(::getpid());
      const char* args[] = {"/bin/sh", "-c", cmd.c_str(), nullptr};
      pid_t child = 0;
      if (posix_spawn(&child, "/bin/sh", nullptr, nullptr, const_cast<char**>(args), environ) !=
          0) {
        std::printf("rank %d could not start the resumer\n", world.rank());
        return 1;
      }
    }
    std::raise(SIGSTOP);
    if (mode == "resumed") {
      // Continued, as a rank stopped inside its wait is: its wait times out at once (answering
      // pings meanwhile, the only thread that does under MESHTRAIN_COMM_PROGRESS=caller); then
      // wait for the job's end (the others abort it).
      try {
        w.wait();
      } catch (const CommTimeout&) {
      }
      std::this_thread::sleep_for(std::chrono::seconds(60));
    }
    std::printf("rank %d was continued: the job was not aborted\n", world.rank());
    return 0;
  }
  // The stopped rank posts first: the others' data never reaches a running peer.
  if (stops) std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const auto start = Clock::now();
  try {
    world.allreduce(t).wait();
    std::printf("rank %d: the allreduce completed\n", world.rank());
    return 0;
  } catch (const CommTimeout& e) {
    const double waited = std::chrono::duration<double>(Clock::now() - start).count();
    // The bound: the job down within the timeout plus 10 s.
    std::printf("rank %d caught CommTimeout after %.1f s (%s): %s\n", world.rank(), waited,
                waited < o.timeout_s + 10.0 ? "in time" : "TOO LATE", e.what());
    std::fflush(stdout);
    world.abort(3);
  }
  return 0;  // not reached
}
