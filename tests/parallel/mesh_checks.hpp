// The layout checks of Mesh, shared by the loopback tests (test_mesh.cpp, threads as ranks) and
// the MPI ones (test_mesh_mpi.cpp, under mpirun). Bodies run on every rank concurrently: EXPECT
// only, never ASSERT (a rank that returned early would leave the others in a collective).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "comm/communicator.hpp"
#include "parallel/mesh.hpp"

namespace meshtrain::parallel::meshtest {

// Every (tp, pp) that divides `world_size`.
inline std::vector<std::pair<int, int>> layouts(int world_size) {
  std::vector<std::pair<int, int>> out;
  for (int tp = 1; tp <= world_size; ++tp) {
    for (int pp = 1; tp * pp <= world_size; ++pp) {
      if (world_size % (tp * pp) == 0) out.emplace_back(tp, pp);
    }
  }
  return out;
}

// The world ranks of `comm`'s members, gathered over `comm` itself (so that the group also
// works), by group rank.
inline std::vector<int> members(comm::Communicator& comm, int world_rank) {
  Tensor mine = Tensor::from_ints({world_rank}, Shape{1});
  Tensor all = Tensor::zeros(Shape{comm.size()}, DType::kI32);
  comm.all_gather(mine, all).wait();
  const auto v = all.to_ints();
  return std::vector<int>(v.begin(), v.end());
}

// Builds Mesh(world, tp, pp) and checks it against the formula
//   world rank = (pp_rank * dp + dp_rank) * tp + tp_rank
// and every group's members against the ranks the formula puts there.
inline void check_layout(comm::Communicator& world, int tp, int pp) {
  const std::string where = "TP " + std::to_string(tp) + " x PP " + std::to_string(pp) + " on " +
                            std::to_string(world.size()) + " ranks, world rank " +
                            std::to_string(world.rank());
  SCOPED_TRACE(where);
  const int n = world.size();
  const int r = world.rank();
  const int dp = n / (tp * pp);
  Mesh mesh(world, tp, pp);
  auto at = [&](int p, int d, int t) { return (p * dp + d) * tp + t; };
  EXPECT_EQ(mesh.tp_size(), tp);
  EXPECT_EQ(mesh.pp_size(), pp);
  EXPECT_EQ(mesh.dp_size(), dp);
  EXPECT_EQ(mesh.world_size(), n);
  EXPECT_EQ(mesh.world_rank(), r);
  EXPECT_EQ(mesh.tp_rank(), r % tp);
  EXPECT_EQ(mesh.dp_rank(), (r / tp) % dp);
  EXPECT_EQ(mesh.pp_rank(), r / (tp * dp));
  EXPECT_EQ(at(mesh.pp_rank(), mesh.dp_rank(), mesh.tp_rank()), r);
  EXPECT_EQ(mesh.world_rank_of(mesh.pp_rank(), mesh.dp_rank(), mesh.tp_rank()), r);
  EXPECT_EQ(mesh.is_first_stage(), mesh.pp_rank() == 0);
  EXPECT_EQ(mesh.is_last_stage(), mesh.pp_rank() == pp - 1);
  EXPECT_EQ(mesh.next_stage(), (mesh.pp_rank() + 1) % pp);
  EXPECT_EQ(mesh.prev_stage(), (mesh.pp_rank() + pp - 1) % pp);
  const int p = mesh.pp_rank(), d = mesh.dp_rank(), t = mesh.tp_rank();

  std::vector<int> want;
  for (int i = 0; i < tp; ++i) want.push_back(at(p, d, i));
  EXPECT_EQ(members(mesh.tp(), r), want) << "TP group";
  want.clear();
  for (int i = 0; i < dp; ++i) want.push_back(at(p, i, t));
  EXPECT_EQ(members(mesh.dp(), r), want) << "DP group";

  if (pp == 1) {
    EXPECT_FALSE(mesh.pp().valid());
    EXPECT_FALSE(mesh.embedding().valid());
  } else {
    want.clear();
    for (int i = 0; i < pp; ++i) want.push_back(at(i, d, t));
    EXPECT_TRUE(mesh.pp().valid());
    if (mesh.pp().valid()) {
      EXPECT_EQ(mesh.pp().rank(), p);
      EXPECT_EQ(members(mesh.pp(), r), want) << "PP group";
      // Activations one stage on around the ring: each stage gets its previous stage's world
      // rank, and the messages name the peers' stages.
      Tensor out = Tensor::from_ints({r}, Shape{1});
      Tensor in = Tensor::zeros(Shape{1}, DType::kI32);
      std::vector<comm::Work> w = mesh.pp().exchange(
          {comm::P2pOp::send(out, mesh.next_stage()), comm::P2pOp::recv(in, mesh.prev_stage())});
      EXPECT_EQ(w[0].collective().label, "pipeline stage " + std::to_string(mesh.next_stage()));
      EXPECT_EQ(w[1].collective().label, "pipeline stage " + std::to_string(mesh.prev_stage()));
      comm::wait_all(w);
      EXPECT_EQ(in.to_ints()[0], at(mesh.prev_stage(), d, t));
    }
    const bool ends = mesh.is_first_stage() || mesh.is_last_stage();
    EXPECT_EQ(mesh.embedding().valid(), ends);
    if (ends && mesh.embedding().valid()) {
      EXPECT_EQ(mesh.embedding().rank(), mesh.is_first_stage() ? 0 : 1);
      EXPECT_EQ(members(mesh.embedding(), r), (std::vector<int>{at(0, d, t), at(pp - 1, d, t)}))
          << "embedding group";
    }
  }
  mesh.finalize();
}

}  // namespace meshtrain::parallel::meshtest
