// The communicator conformance suite, shared by every backend: the same TEST_Ps run against
// loopback (threads as ranks, in test_comm) and MPI (processes under mpirun, in test_comm_mpi).
// Each binary defines harness() and instantiates CommSuite.
#pragma once

#include <functional>

#include <gtest/gtest.h>

#include "comm/communicator.hpp"

namespace meshtrain::comm::commtest {

class Harness {
 public:
  virtual ~Harness() = default;
  // The number of ranks body() runs on.
  virtual int size() const = 0;
  // Runs body on every rank with a fresh group communicator using `options`, then finalizes it.
  // Exceptions escaping body are reported as test failures on that rank.
  virtual void run(const CommOptions& options, const std::function<void(Communicator&)>& body) = 0;
  // True for a harness that differs from another one only in how reductions are computed (MPI
  // with convert-reduce-convert): tests that reduce nothing skip themselves on it.
  virtual bool reduction_variant() const { return false; }
};

// Defined by each test binary: the harness for the suite's parameter.
Harness& harness(int param);

// Options for suite tests: a timeout long enough for oversubscribed runs, short enough that a
// bug fails the test rather than the ctest timeout.
inline CommOptions suite_options() {
  CommOptions o;
  o.timeout_s = 30;
  o.debug = false;
  return o;
}

class CommSuite : public ::testing::TestWithParam<int> {
 protected:
  Harness& h() { return harness(GetParam()); }
};

#define MT_SKIP_ON_REDUCTION_VARIANT() \
  if (h().reduction_variant()) GTEST_SKIP() << "reduces nothing: covered by the other variant"

}  // namespace meshtrain::comm::commtest
