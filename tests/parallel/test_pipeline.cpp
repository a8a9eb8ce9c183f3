// Pipeline schedules as pure functions (parallel/pipeline.hpp): every schedule at 1 to 5 stages
// and 1 to 9 micro-batches runs to the end under strict rendezvous with every send matched in
// FIFO order, 1F1B keeps at most P - s micro-batches alive on stage s, and the checker catches
// schedules that would hang. The stage split of the layers. No communication here: the
// executor runs in tests/launch/test_trainer_pp.cpp (threads) and launch_cli_pp (mpirun).
#include <gtest/gtest.h>

#include "parallel/pipeline.hpp"
#include "runtime/error.hpp"

namespace meshtrain::parallel {
namespace {

std::vector<std::vector<PipeAction>> all_stages(PipeSchedule s, int stages, int micro) {
  std::vector<std::vector<PipeAction>> out;
  for (int st = 0; st < stages; ++st) out.push_back(build_schedule(s, stages, st, micro));
  return out;
}

TEST(PipelineSchedule, EverySchedulePassesTheChecker) {
  for (PipeSchedule s : {PipeSchedule::kGPipe, PipeSchedule::k1F1B}) {
    for (int p = 1; p <= 5; ++p) {
      for (int m = 1; m <= 9; ++m) {
        SCOPED_TRACE(testing::Message() << pipe_schedule_name(s) << " P=" << p << " M=" << m);
        EXPECT_EQ(check_schedule(all_stages(s, p, m)), "");
        std::vector<std::vector<PipeAction>> fwd;
        for (int st = 0; st < p; ++st) fwd.push_back(build_forward_only(p, st, m));
        EXPECT_EQ(check_schedule(fwd), "");
      }
    }
  }
}

TEST(PipelineSchedule, OneFOneBKeepsAtMostPMicroBatchesAlive) {
  for (int p = 1; p <= 5; ++p) {
    for (int m = 1; m <= 9; ++m) {
      for (int st = 0; st < p; ++st) {
        SCOPED_TRACE(testing::Message() << "P=" << p << " M=" << m << " stage " << st);
        const int live = max_in_flight(build_schedule(PipeSchedule::k1F1B, p, st, m));
        EXPECT_EQ(live, std::min(p - st, m));
        EXPECT_EQ(max_in_flight(build_schedule(PipeSchedule::kGPipe, p, st, m)), m);
      }
    }
  }
  EXPECT_EQ(max_in_flight(build_forward_only(3, 1, 7)), 1);
}

TEST(PipelineSchedule, BackwardRunsMicroBatchesInOrder) {
  // The same accumulation order as one rank running the micro-batches one after another.
  for (PipeSchedule s : {PipeSchedule::kGPipe, PipeSchedule::k1F1B}) {
    for (int st = 0; st < 4; ++st) {
      int next_b = 0, next_f = 0;
      for (const PipeAction& a : build_schedule(s, 4, st, 9)) {
        if (a.kind == PipeAction::kBackward) {
          EXPECT_EQ(a.micro, next_b++);
        }
        if (a.kind == PipeAction::kForward) {
          EXPECT_EQ(a.micro, next_f++);
        }
      }
      EXPECT_EQ(next_b, 9);
    }
  }
}

TEST(PipelineSchedule, OneFOneBSteadyStateMatchesMegatron) {
  // Stage 0 of 2, 3 micro-batches: one warm-up forward, then F1 with send_forward_recv_backward,
  // B0 with send... (stage 0 sends no gradient), then the cool-down.
  std::vector<std::string> got;
  for (const PipeAction& a : build_schedule(PipeSchedule::k1F1B, 2, 0, 3))
    got.push_back(to_string(a));
  const std::vector<std::string> want = {"F0", "sendF0", "F1",     "sendF1", "recvB0", "B0",
                                         "F2", "sendF2", "recvB1", "B1",     "recvB2", "B2"};
  EXPECT_EQ(got, want);
}

TEST(PipelineSchedule, CheckerCatchesBrokenSchedules) {
  // A receive order that differs from the send order: FIFO matching pairs the wrong micro-batch.
  auto s = all_stages(PipeSchedule::kGPipe, 2, 2);
  std::swap(s[1][0], s[1][2]);  // recvF0 <-> recvF1
  EXPECT_NE(check_schedule(s), "");
  // Both stages wait for the other's message first: a deadlock.
  std::vector<std::vector<PipeAction>> dead = {{{PipeAction::kRecvBackward, 0},
                                                {PipeAction::kForward, 0},
                                                {PipeAction::kSendForward, 0},
                                                {PipeAction::kBackward, 0}},
                                               {{PipeAction::kRecvForward, 0},
                                                {PipeAction::kForward, 0},
                                                {PipeAction::kBackward, 0},
                                                {PipeAction::kSendBackward, 0}}};
  const std::string why = check_schedule(dead);
  EXPECT_NE(why, "");
  // A missing receive.
  auto missing = all_stages(PipeSchedule::k1F1B, 3, 3);
  missing[2].erase(missing[2].begin());
  EXPECT_NE(check_schedule(missing), "");
}

TEST(PipelineStages, ContiguousUnevenSplits) {
  auto range = [](int layers, int stages, int s) {
    const StageRange r = stage_range(layers, stages, s);
    return std::make_pair(r.first_layer, r.last_layer);
  };
  EXPECT_EQ(range(5, 2, 0), std::make_pair(0, 3));
  EXPECT_EQ(range(5, 2, 1), std::make_pair(3, 5));
  EXPECT_EQ(range(5, 4, 0), std::make_pair(0, 2));
  EXPECT_EQ(range(5, 4, 3), std::make_pair(4, 5));
  EXPECT_EQ(range(12, 4, 2), std::make_pair(6, 9));
  for (int layers = 1; layers <= 9; ++layers) {
    for (int p = 1; p <= layers; ++p) {
      int next = 0;
      for (int s = 0; s < p; ++s) {
        const StageRange r = stage_range(layers, p, s);
        EXPECT_EQ(r.first_layer, next);
        EXPECT_GE(r.count(), 1);
        EXPECT_EQ(r.embedding, s == 0);
        EXPECT_EQ(r.head, s == p - 1);
        next = r.last_layer;
      }
      EXPECT_EQ(next, layers);
    }
  }
  try {
    stage_range(3, 4, 0);
    FAIL() << "4 stages of 3 layers";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("model.n_layer"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("train.pp = 4"), std::string::npos) << e.what();
  }
}

TEST(PipelineSchedule, UnknownScheduleIsRefusedNamingTheKey) {
  EXPECT_EQ(parse_pipe_schedule("gpipe"), PipeSchedule::kGPipe);
  EXPECT_EQ(parse_pipe_schedule("1f1b"), PipeSchedule::k1F1B);
  try {
    parse_pipe_schedule("zigzag");
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("pp.schedule"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace meshtrain::parallel
