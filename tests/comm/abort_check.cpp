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
//            run, and never say that every rank answered.

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

int main(int argc, char** argv) {
  using namespace meshtrain;
  using namespace meshtrain::comm;
  using Clock = std::chrono::steady_clock;
  MpiSession session(&argc, &argv);
  const std::string mode = argc > 1 ? argv[1] : "late";
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
      // Continued: wait for the job's end (the others abort it).
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
