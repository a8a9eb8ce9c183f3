// Mesh under mpirun (ctest: 1, 2, 3 and 4 ranks): every DP x PP x TP layout of the job's ranks,
// each group's members against the formula, over the MPI backend. The ranks agree on the
// result before exiting, so that one failing rank fails the job on every rank.

#include <cstdio>

#include <gtest/gtest.h>

#include "comm/mpi.hpp"
#include "runtime/error.hpp"
#include "tests/parallel/mesh_checks.hpp"

namespace meshtrain::parallel {
namespace {

comm::MpiSession* g_session = nullptr;

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

comm::CommOptions options() {
  comm::CommOptions o;
  o.timeout_s = 60;  // a rank that fails mid-test makes the others fail rather than hang
  return o;
}

TEST(MeshMpi, PipelineLayoutsFollowMegatronsOrder) {
  comm::Communicator world = g_session->world(options());
  for (const auto& [tp, pp] : meshtest::layouts(world.size())) {
    try {
      meshtest::check_layout(world, tp, pp);
    } catch (const std::exception& e) {
      ADD_FAILURE() << "TP " << tp << " x PP " << pp << ": " << e.what();
    }
  }
  world.finalize();
}

TEST(MeshMpi, RejectsBadLayoutsOnEveryRank) {
  comm::Communicator world = g_session->world(options());
  const int n = world.size();
  EXPECT_THROW(Mesh(world, 1, n + 1), InvalidArgument);
  EXPECT_THROW(Mesh(world, n + 1, 1), InvalidArgument);
  EXPECT_THROW(Mesh(world, 2, 0), InvalidArgument);
  // Nothing was split: the world's numbering is untouched and it still works.
  EXPECT_EQ(world.next_seq(), 1u);
  world.barrier().wait();
  world.finalize();
}

}  // namespace
}  // namespace meshtrain::parallel

int main(int argc, char** argv) {
  using namespace meshtrain;
  comm::MpiSession session(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  parallel::g_session = &session;
  if (session.rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new parallel::FailurePrinter(session.rank()));
  }
  const int rc = RUN_ALL_TESTS();
  int agreed = 1;
  {
    comm::Communicator agree = session.world(parallel::options());
    Tensor flag = Tensor::from_floats({rc != 0 ? 1.0f : 0.0f}, Shape{1}, DType::kF32);
    agree.allreduce(flag, comm::ReduceOp::kMax).wait();
    agreed = flag.to_floats()[0] != 0.0f ? 1 : 0;
    if (agreed && session.rank() == 0 && rc == 0)
      std::printf("[  RANKS   ] another rank failed: see its output above\n");
    agree.finalize();
  }
  parallel::g_session = nullptr;
  session.finalize();
  return agreed;
}
