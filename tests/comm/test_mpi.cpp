// The conformance suite against the MPI backend, one process per rank under mpirun (ctest runs
// it at 1, 2, 3 and 4 ranks). Parameter 0 runs 16-bit reductions as MPI user-defined ops on the
// 16-bit data, parameter 1 converts to fp32 and back.
//
// Ranks agree on pass/fail: after every test they allreduce their failure flags (so a test that
// failed on one rank is reported by rank 0 with the ranks it failed on), and the exit status is
// the agreed one. Every communicator has a timeout, so a rank that fails in the middle of a
// collective sequence makes the others fail with CommTimeout instead of hanging them.

#include <chrono>
#include <cstdio>
#include <memory>
#include <thread>

#include <gtest/gtest.h>

#include "comm/mpi.hpp"
#include "runtime/error.hpp"
#include "tests/comm/suite.hpp"

namespace meshtrain::comm::commtest {
namespace {

MpiSession* g_session = nullptr;

class MpiHarness final : public Harness {
 public:
  explicit MpiHarness(Reduce16 mode) : mode_(mode) {}
  int size() const override { return g_session->size(); }
  bool reduction_variant() const override { return mode_ == Reduce16::kConvert; }
  void run(const CommOptions& options, const std::function<void(Communicator&)>& body) override {
    MpiOptions mpi;
    mpi.reduce16 = mode_;
    try {
      Communicator c = g_session->world(options, mpi);
      body(c);
      c.finalize();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "rank " << g_session->rank() << " threw: " << e.what();
    }
  }

 private:
  Reduce16 mode_;
};

// Allreduces each test's failure flag over a communicator of its own; rank 0 names the ranks.
class AgreeOnResults : public ::testing::EmptyTestEventListener {
 public:
  explicit AgreeOnResults(Communicator& agree) : agree_(agree) {}

  void OnTestEnd(const ::testing::TestInfo& info) override {
    const int n = agree_.size();
    Tensor mine = Tensor::from_ints({info.result()->Failed() ? 1 : 0}, Shape{1});
    Tensor all = Tensor::zeros(Shape{n}, DType::kI32);
    try {
      agree_.all_gather(mine, all).wait();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "[rank %d] ranks could not agree after %s.%s: %s\n", agree_.rank(),
                   info.test_suite_name(), info.name(), e.what());
      agree_.abort(3);
    }
    const auto flags = all.to_ints();
    std::string failed;
    for (int r = 0; r < n; ++r) {
      if (flags[r]) failed += (failed.empty() ? "" : ", ") + std::to_string(r);
    }
    if (!failed.empty()) {
      any_failed_ = true;
      if (agree_.rank() == 0) {
        std::printf("[  RANKS   ] %s.%s failed on rank(s) %s\n", info.test_suite_name(),
                    info.name(), failed.c_str());
      }
    }
  }

  bool any_failed() const { return any_failed_; }

 private:
  Communicator& agree_;
  bool any_failed_ = false;
};

// On ranks other than 0: only failures, tagged with the rank.
class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: failure\n%s\n", rank_,
                 r.file_name() ? r.file_name() : "?", r.line_number(), r.message());
  }

 private:
  int rank_;
};

// The progress thread (comm/mpi/progress.hpp) completes collectives while the caller makes no
// MPI call at all (it sleeps, as a rank computing backward would): completed_at(), which calls
// nothing, becomes set before the caller ever tests or waits. A large allreduce (a ring) and a
// small one (an MPI request) both complete, with the right values.
TEST(MpiProgress, CollectivesCompleteWhileTheCallerMakesNoMpiCall) {
  if (g_session->size() == 1) GTEST_SKIP() << "needs 2 ranks";
  CommOptions o;
  o.timeout_s = 60;
  Communicator c = g_session->world(o);
  const int n = c.size();
  const std::int64_t big = 2 << 20;  // 8 MiB of fp32
  Tensor a = Tensor::empty(Shape{big}, DType::kF32);
  Tensor b = Tensor::from_floats({1.0f, 2.0f, 3.0f}, Shape{3}, DType::kF32);
  float* pa = a.data_as<float>();
  for (std::int64_t i = 0; i < big; ++i) pa[i] = static_cast<float>((i % 7) + c.rank());
  std::vector<Work> works{c.allreduce(a, ReduceOp::kSum), c.allreduce(b, ReduceOp::kSum)};
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  bool all = false;
  while (!all && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    all = true;
    for (const Work& w : works) all = all && w.completed_at().has_value();
  }
  EXPECT_TRUE(all) << "the collectives did not complete in the background";
  for (Work& w : works) w.wait();
  const float ranks_sum = static_cast<float>(n * (n - 1) / 2);
  for (std::int64_t i = 0; i < big; i += 4099)
    ASSERT_EQ(pa[i], static_cast<float>(n * (i % 7)) + ranks_sum) << "element " << i;
  EXPECT_EQ(b.to_floats(), (std::vector<float>{1.0f * n, 2.0f * n, 3.0f * n}));
  c.finalize();
}

}  // namespace

Harness& harness(int param) {
  static MpiHarness wire(Reduce16::kWireOp);
  static MpiHarness convert(Reduce16::kConvert);
  return param == 0 ? wire : convert;
}

INSTANTIATE_TEST_SUITE_P(Mpi, CommSuite, ::testing::Values(0, 1), [](const auto& info) {
  return std::string(info.param == 0 ? "WireOp16" : "Convert16");
});

}  // namespace meshtrain::comm::commtest

int main(int argc, char** argv) {
  using namespace meshtrain;
  using namespace meshtrain::comm;
  MpiSession session(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  commtest::g_session = &session;
  int agreed = 1;
  {
    CommOptions o;
    o.timeout_s = 120;  // longer than any test: if it fires, a rank is stuck for good
    Communicator agree = session.world(o);
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    if (session.rank() != 0) {
      delete listeners.Release(listeners.default_result_printer());
      listeners.Append(new commtest::FailurePrinter(session.rank()));
    }
    auto* agreement = new commtest::AgreeOnResults(agree);
    listeners.Append(agreement);
    const int rc = RUN_ALL_TESTS();
    Tensor flag =
        Tensor::from_floats(std::vector<float>{rc != 0 || agreement->any_failed() ? 1.0f : 0.0f},
                            Shape{1}, DType::kF32);
    agree.allreduce(flag, ReduceOp::kMax).wait();
    agreed = flag.to_floats()[0] != 0.0f ? 1 : 0;
    delete listeners.Release(agreement);
    agree.finalize();
  }
  commtest::g_session = nullptr;
  session.finalize();
  return agreed;
}
