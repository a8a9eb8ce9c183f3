// The end of the timeout path, as a job sees it: rank 1 never arrives, rank 0 gets CommTimeout
// naming it, calls abort(), and the whole job must end with a non-zero status at once (rank 1
// is still asleep). Run by ctest through tests/comm/expect_abort.cmake.

#include <chrono>
#include <cstdio>
#include <thread>

#include "comm/mpi.hpp"
#include "runtime/error.hpp"

int main(int argc, char** argv) {
  using namespace meshtrain;
  using namespace meshtrain::comm;
  MpiSession session(&argc, &argv);
  CommOptions o;
  o.timeout_s = 1.5;
  Communicator world = session.world(o);
  Tensor t = Tensor::from_floats({1.0f, 2.0f, 3.0f}, Shape{3}, DType::kF32);
  if (world.rank() == 1) {
    std::this_thread::sleep_for(std::chrono::seconds(60));
    std::printf("rank 1 woke up: the job was not aborted\n");
    return 0;
  }
  try {
    world.allreduce(t).wait();
    std::printf("rank %d: the allreduce completed without rank 1\n", world.rank());
    return 0;
  } catch (const CommTimeout& e) {
    std::printf("rank %d caught CommTimeout: %s\n", world.rank(), e.what());
    std::fflush(stdout);
    world.abort(3);
  }
  return 0;  // not reached
}
