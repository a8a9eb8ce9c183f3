// The conformance suite against the loopback backend (threads as ranks) at 1 to 4 ranks, and
// what is particular to loopback.

#include <atomic>
#include <chrono>
#include <thread>

#include <gtest/gtest.h>

#include "comm/loopback.hpp"
#include "runtime/error.hpp"
#include "tests/comm/suite.hpp"

namespace meshtrain::comm::commtest {

namespace {

class LoopbackHarness final : public Harness {
 public:
  explicit LoopbackHarness(int n) : n_(n) {}
  int size() const override { return n_; }
  void run(const CommOptions& options, const std::function<void(Communicator&)>& body) override {
    LoopbackWorld world(n_, options);
    try {
      world.run(body);
    } catch (const std::exception& e) {
      ADD_FAILURE() << "a rank threw: " << e.what();
    }
  }

 private:
  int n_;
};

}  // namespace

Harness& harness(int param) {
  static LoopbackHarness harnesses[] = {LoopbackHarness(1), LoopbackHarness(2), LoopbackHarness(3),
                                        LoopbackHarness(4)};
  return harnesses[param - 1];
}

INSTANTIATE_TEST_SUITE_P(Loopback, CommSuite, ::testing::Values(1, 2, 3, 4),
                         [](const auto& info) { return std::to_string(info.param) + "ranks"; });

namespace {

TEST(Loopback, ARankThatThrowsFailsTheOthersAtOnce) {
  // Without this the other ranks would wait out the (default, 10 minute) timeout.
  LoopbackWorld world(3, CommOptions{});
  const auto start = std::chrono::steady_clock::now();
  std::atomic<int> aborted{0};
  EXPECT_THROW(world.run([&](Communicator& c) {
    if (c.rank() == 1) throw InvalidArgument("rank 1 gives up");
    try {
      c.barrier().wait();
    } catch (const Error& e) {
      if (std::string(e.what()).find("aborted") != std::string::npos) ++aborted;
      throw;
    }
  }),
               InvalidArgument);
  EXPECT_EQ(aborted.load(), 2);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

TEST(Loopback, TakeEachRankOnce) {
  LoopbackWorld world(2, CommOptions{});
  Communicator a = world.take(0);
  EXPECT_THROW(world.take(0), InvalidArgument);
  EXPECT_THROW(world.take(2), InvalidArgument);
  EXPECT_THROW(LoopbackWorld(0, CommOptions{}), InvalidArgument);
  Communicator b = world.take(1);
  // Rank 0 finishes its barrier only when rank 1 arrives; one thread can drive both.
  Work wa = a.barrier();
  EXPECT_FALSE(wa.test());
  Work wb = b.barrier();
  EXPECT_TRUE(wa.test());
  EXPECT_TRUE(wb.test());
  a.finalize();
  b.finalize();
  EXPECT_FALSE(a.valid());
}

TEST(Loopback, AbortFailsPendingAndFutureCollectives) {
  LoopbackWorld world(2, CommOptions{});
  Communicator a = world.take(0);
  Communicator b = world.take(1);
  Work w = a.barrier();
  b.abort(3);
  EXPECT_THROW(w.wait(), Error);
  EXPECT_THROW(a.barrier(), Error);
}

}  // namespace
}  // namespace meshtrain::comm::commtest
