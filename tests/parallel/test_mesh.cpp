#include <gtest/gtest.h>

#include "comm/loopback.hpp"
#include "parallel/mesh.hpp"
#include "runtime/error.hpp"
#include "tests/parallel/mesh_checks.hpp"

namespace meshtrain::parallel {
namespace {

TEST(Mesh, SingleProcessHasNoGroups) {
  Mesh mesh;
  EXPECT_EQ(mesh.dp_size(), 1);
  EXPECT_EQ(mesh.tp_size(), 1);
  EXPECT_FALSE(mesh.distributed());
  EXPECT_FALSE(mesh.dp().valid());
}

TEST(Mesh, TensorParallelIsInnermost) {
  for (int tp : {1, 2, 4}) {
    comm::LoopbackWorld world(4);
    world.run([&](comm::Communicator& c) {
      Mesh mesh(c, tp);
      EXPECT_EQ(mesh.tp_size(), tp);
      EXPECT_EQ(mesh.dp_size(), 4 / tp);
      EXPECT_EQ(mesh.tp_rank(), c.rank() % tp);
      EXPECT_EQ(mesh.dp_rank(), c.rank() / tp);
      EXPECT_EQ(mesh.world_rank(), c.rank());
      // The DP group sums over ranks with the same TP rank.
      Tensor t = Tensor::from_floats({static_cast<float>(c.rank())}, Shape{1}, DType::kF32);
      mesh.dp().allreduce(t).wait();
      float expect = 0;
      for (int d = 0; d < 4 / tp; ++d) expect += static_cast<float>(d * tp + mesh.tp_rank());
      EXPECT_EQ(t.data_as<float>()[0], expect);
      Tensor u = Tensor::from_floats({1.0f}, Shape{1}, DType::kF32);
      mesh.tp().allreduce(u).wait();
      EXPECT_EQ(u.data_as<float>()[0], static_cast<float>(tp));
      mesh.finalize();
    });
  }
}

TEST(Mesh, RejectsSizesThatDoNotDivide) {
  comm::LoopbackWorld world(3);
  EXPECT_THROW(world.run([&](comm::Communicator& c) { Mesh mesh(c, 2); }), InvalidArgument);
}

// Every DP x PP x TP layout of 1 to 4 ranks: 3 ranks as PP 3 (and DP 3, TP 3); 4 ranks as PP 2 x
// TP 2, PP 2 x DP 2, PP 4, and the rest.
TEST(Mesh, PipelineLayoutsFollowMegatronsOrder) {
  for (int n = 1; n <= 4; ++n) {
    for (const auto& [tp, pp] : meshtest::layouts(n)) {
      const int t = tp, p = pp;
      comm::LoopbackWorld world(n);
      world.run([&](comm::Communicator& c) { meshtest::check_layout(c, t, p); });
    }
  }
}

TEST(Mesh, WithoutPipelineTheGroupsAreTheDpTimesTpMeshs) {
  comm::LoopbackWorld world(4);
  world.run([&](comm::Communicator& c) {
    Mesh mesh(c, 2);
    EXPECT_EQ(mesh.pp_size(), 1);
    EXPECT_TRUE(mesh.is_first_stage() && mesh.is_last_stage());
    EXPECT_EQ(mesh.dp().name(), "world/" + std::to_string(mesh.tp_rank()));
    EXPECT_EQ(mesh.tp().name(), "world/" + std::to_string(mesh.dp_rank()));
    EXPECT_FALSE(mesh.pp().valid());
    // Two splits, as before: the world's next collective number is unchanged.
    EXPECT_EQ(c.next_seq(), 3u);
    mesh.finalize();
  });
}

TEST(Mesh, RejectsBadLayoutsNamingTheValues) {
  auto refused = [](int n, int tp, int pp, const std::string& part) {
    comm::LoopbackWorld world(n);
    try {
      world.run([&](comm::Communicator& c) { Mesh mesh(c, tp, pp); });
      ADD_FAILURE() << "Mesh(" << n << " ranks, tp " << tp << ", pp " << pp << ") was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  refused(4, 2, 3,
          "world size (4) must be a multiple of tensor-parallel size x "
          "pipeline-parallel size (2 x 3 = 6)");
  refused(4, 1, 3, "(1 x 3 = 3)");
  refused(3, 1, 2, "(1 x 2 = 2)");
  refused(4, 3, 1, "world size (4) must be a multiple of the tensor-parallel size (3)");
  refused(2, 0, 1, "tensor-parallel size must be >= 1, got 0");
  refused(2, 1, 0, "pipeline-parallel size must be >= 1, got 0");
  refused(2, 1, -2, "got -2");
}

}  // namespace
}  // namespace meshtrain::parallel
