#include <gtest/gtest.h>

#include "comm/loopback.hpp"
#include "parallel/mesh.hpp"
#include "runtime/error.hpp"

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

}  // namespace
}  // namespace meshtrain::parallel
