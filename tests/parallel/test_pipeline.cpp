// Pipeline schedules as pure functions (parallel/pipeline.hpp): every schedule at 1 to 5 stages
// and 1 to 9 micro-batches runs to the end under strict rendezvous with every send matched in
// FIFO order, 1F1B keeps at most P - s micro-batches alive on stage s, and the checker catches
// schedules that would hang. The interleaved schedule (V chunks per stage) at P = 2 to 4, V = 2
// and 3: the checker, Megatron's order, per-chunk backward order, slots, and its bubble against
// 1F1B's under unit costs. The stage split of the layers. No communication here: the
// executor runs in tests/launch/test_trainer_pp.cpp (threads) and launch_cli_pp (mpirun).
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "parallel/pipeline.hpp"
#include "runtime/error.hpp"

namespace meshtrain::parallel {
namespace {

std::vector<std::vector<PipeAction>> all_stages(PipeSchedule s, int stages, int micro,
                                                int chunks = 1) {
  std::vector<std::vector<PipeAction>> out;
  for (int st = 0; st < stages; ++st) out.push_back(build_schedule(s, stages, st, micro, chunks));
  return out;
}

// The step time of a schedule when a chunk's forward takes 1 / chunks and its backward 2 /
// chunks (a stage's whole share of the model: 1 and 2) and messages are free: every stage walks
// its list, a group of point-to-point actions ends when the last message it receives was sent.
// Returns the bubble: the share of the step a stage is idle, 1 - 3 M / step.
double simulated_bubble(const std::vector<std::vector<PipeAction>>& per_stage, int micro,
                        int chunks) {
  const int stages = static_cast<int>(per_stage.size());
  std::vector<double> clock(static_cast<std::size_t>(stages), 0.0);
  std::vector<std::size_t> pc(static_cast<std::size_t>(stages), 0);
  std::map<std::pair<int, int>, std::vector<double>> sent;  // (from, to) -> post times
  std::map<std::pair<int, int>, std::size_t> received;
  std::vector<std::size_t> posted(static_cast<std::size_t>(stages), SIZE_MAX);
  for (bool progress = true; progress;) {
    progress = false;
    for (int s = 0; s < stages; ++s) {
      const auto& acts = per_stage[static_cast<std::size_t>(s)];
      auto& i = pc[static_cast<std::size_t>(s)];
      auto& t = clock[static_cast<std::size_t>(s)];
      while (i < acts.size()) {
        if (acts[i].compute()) {
          t += (acts[i].kind == PipeAction::kForward ? 1.0 : 2.0) / chunks;
          ++i;
          progress = true;
          continue;
        }
        // The group: its sends are posted when it is reached (once), then it waits for the
        // sends its receives match.
        std::size_t j = i;
        double done = t;
        bool ready = true;
        const bool post = posted[static_cast<std::size_t>(s)] != i;
        posted[static_cast<std::size_t>(s)] = i;
        std::map<std::pair<int, int>, std::size_t> want;
        for (; j < acts.size() && !acts[j].compute(); ++j) {
          const PipeAction& a = acts[j];
          const bool fwd = a.kind == PipeAction::kSendForward || a.kind == PipeAction::kRecvForward;
          const bool send =
              a.kind == PipeAction::kSendForward || a.kind == PipeAction::kSendBackward;
          const int peer = (fwd == send ? s + 1 : s - 1 + stages) % stages;
          if (send) {
            if (post) sent[{s, peer}].push_back(t);
            progress = progress || post;
            continue;
          }
          const auto key = std::make_pair(peer, s);
          const std::size_t k = received[key] + want[key]++;
          if (sent[key].size() <= k) {
            ready = false;
          } else {
            done = std::max(done, sent[key][k]);
          }
        }
        if (!ready) break;
        for (const auto& [key, n] : want) received[key] += n;
        t = done;
        i = j;
        progress = true;
      }
    }
  }
  double step = 0;
  for (int s = 0; s < stages; ++s) {
    EXPECT_EQ(pc[static_cast<std::size_t>(s)], per_stage[static_cast<std::size_t>(s)].size());
    step = std::max(step, clock[static_cast<std::size_t>(s)]);
  }
  return 1.0 - 3.0 * micro / step;
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

TEST(PipelineInterleaved, PassesTheCheckerAtEveryShape) {
  for (int p = 2; p <= 4; ++p) {
    for (int v = 2; v <= 3; ++v) {
      for (int m = p; m <= 4 * p; m += p) {
        SCOPED_TRACE(testing::Message() << "P=" << p << " V=" << v << " M=" << m);
        const auto s = all_stages(PipeSchedule::kInterleaved, p, m, v);
        EXPECT_EQ(check_schedule(s), "");
        int forwards = 0;
        for (const PipeAction& a : s[0]) forwards += a.kind == PipeAction::kForward;
        EXPECT_EQ(forwards, m * v);
      }
      for (int m = 1; m <= 9; ++m) {
        SCOPED_TRACE(testing::Message() << "forward only P=" << p << " V=" << v << " M=" << m);
        std::vector<std::vector<PipeAction>> fwd;
        for (int st = 0; st < p; ++st) fwd.push_back(build_forward_only(p, st, m, v));
        EXPECT_EQ(check_schedule(fwd), "");
      }
    }
  }
}

TEST(PipelineInterleaved, StageZeroOrderMatchesMegatron) {
  // P = 2, V = 2, M = 2 (M = P: every forward is warm-up): chunk 0 of micro-batches 0 and 1,
  // then chunk 1 (whose input comes round the ring from stage 1), then the backwards from the
  // last chunk down. Stage 0's chunk 0 neither receives activations nor sends gradients.
  std::vector<std::string> got;
  for (const PipeAction& a : build_schedule(PipeSchedule::kInterleaved, 2, 0, 2, 2))
    got.push_back(to_string(a));
  const std::vector<std::string> want = {
      "F0",        "sendF0",    "F1",        "sendF1",    "recvF0.c1", "F0.c1",     "sendF0.c1",
      "recvF1.c1", "F1.c1",     "sendF1.c1", "recvB0.c1", "B0.c1",     "sendB0.c1", "recvB1.c1",
      "B1.c1",     "sendB1.c1", "recvB0",    "B0",        "recvB1",    "B1"};
  EXPECT_EQ(got, want);
}

TEST(PipelineInterleaved, BackwardRunsEachChunksMicroBatchesInOrder) {
  // Per chunk the accumulation order of one rank: micro-batches 0 .. M - 1; chunk V - 1 ends
  // first, so the gradients become final from the end of the flat buffer towards its start.
  for (int p = 2; p <= 4; ++p) {
    for (int v = 2; v <= 3; ++v) {
      for (int st = 0; st < p; ++st) {
        std::map<int, int> next_b;
        int finished = v;  // the chunk whose backwards ended last
        for (const PipeAction& a : build_schedule(PipeSchedule::kInterleaved, p, st, 2 * p, v)) {
          if (a.kind != PipeAction::kBackward) continue;
          EXPECT_EQ(a.micro, next_b[a.chunk]++);
          if (a.micro == 2 * p - 1) {
            EXPECT_EQ(a.chunk, finished - 1);
            finished = a.chunk;
          }
        }
        EXPECT_EQ(finished, 0);
      }
    }
  }
}

TEST(PipelineInterleaved, InFlightAndSlots) {
  for (int p = 2; p <= 4; ++p) {
    for (int v = 2; v <= 3; ++v) {
      for (int m = p; m <= 3 * p; m += p) {
        for (int st = 0; st < p; ++st) {
          SCOPED_TRACE(testing::Message()
                       << "P=" << p << " V=" << v << " M=" << m << " stage " << st);
          const auto acts = build_schedule(PipeSchedule::kInterleaved, p, st, m, v);
          // Megatron's warm-up count plus the steady state's one forward ahead.
          const int warmup = m == p ? m * v : std::min(m * v, (p - st - 1) * 2 + (v - 1) * p);
          EXPECT_EQ(max_in_flight(acts), std::min(m * v, warmup + 1));
          // No two live (micro, chunk) pairs share a slot.
          const int w = pipe_slots_per_chunk(acts);
          EXPECT_EQ(pipe_slots(acts), v * w);
          std::map<int, std::pair<int, int>> used;
          for (const PipeAction& a : acts) {
            const int slot = pipe_slot(a.micro, a.chunk, w);
            if (a.kind == PipeAction::kForward) {
              EXPECT_TRUE(used.emplace(slot, std::make_pair(a.micro, a.chunk)).second)
                  << to_string(a) << " in slot " << slot;
            } else if (a.kind == PipeAction::kBackward) {
              EXPECT_EQ(used[slot], std::make_pair(a.micro, a.chunk));
              used.erase(slot);
            }
          }
        }
      }
    }
  }
}

TEST(PipelineInterleaved, BubbleIsBelowOneFOneB) {
  // Under unit costs (forward 1, backward 2 per stage's share of the model) 1F1B idles
  // (P - 1) / (M + P - 1) of the step; interleaving V chunks cuts that to (P - 1) / (V M + P - 1)
  // exactly (P 2 M 4 V 2: 20% -> 11.1%; P 4 M 8 V 3: 27.3% -> 11.1%).
  for (int p = 2; p <= 4; ++p) {
    for (int m = p; m <= 4 * p; m += p) {
      const double plain = simulated_bubble(all_stages(PipeSchedule::k1F1B, p, m), m, 1);
      EXPECT_NEAR(plain, static_cast<double>(p - 1) / (m + p - 1), 1e-9) << "P=" << p << " M=" << m;
      for (int v = 2; v <= 3; ++v) {
        SCOPED_TRACE(testing::Message() << "P=" << p << " V=" << v << " M=" << m);
        const double inter =
            simulated_bubble(all_stages(PipeSchedule::kInterleaved, p, m, v), m, v);
        EXPECT_LT(inter, plain * 0.75);
        EXPECT_NEAR(inter, static_cast<double>(p - 1) / (v * m + p - 1), 1e-9);
      }
    }
  }
}

TEST(PipelineInterleaved, RefusalsNameTheKeys) {
  auto refused = [](auto f, const std::string& key) {
    try {
      f();
      ADD_FAILURE() << "accepted; expected a refusal naming " << key;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << e.what();
    }
  };
  refused([] { build_schedule(PipeSchedule::kInterleaved, 2, 0, 3, 2); }, "train.grad_accum = 3");
  refused([] { build_schedule(PipeSchedule::kInterleaved, 2, 0, 4, 1); }, "pp.virtual_stages");
  refused([] { build_schedule(PipeSchedule::k1F1B, 2, 0, 4, 2); }, "pp.virtual_stages = 2");
  refused([] { stage_range(6, 2, 0, 2); }, "multiple of 4");
  EXPECT_EQ(parse_pipe_schedule("interleaved"), PipeSchedule::kInterleaved);
}

TEST(PipelineStages, InterleavedChunksAreRoundRobin) {
  // 8 layers, P = 2, V = 2: chunks of 2 layers; stage 0 holds 0-1 and 4-5, stage 1 2-3 and 6-7.
  const StageRange s0 = stage_range(8, 2, 0, 2), s1 = stage_range(8, 2, 1, 2);
  EXPECT_EQ(s0.chunks, (std::vector<std::pair<int, int>>{{0, 2}, {4, 6}}));
  EXPECT_EQ(s1.chunks, (std::vector<std::pair<int, int>>{{2, 4}, {6, 8}}));
  EXPECT_TRUE(s0.embedding && !s0.head);
  EXPECT_TRUE(!s1.embedding && s1.head);
  EXPECT_EQ(s0.count(), 4);
  EXPECT_EQ(s1.num_chunks(), 2);
  EXPECT_EQ(s1.chunk(1), std::make_pair(6, 8));
}

TEST(PipelineInterleaved, CheckerCatchesAWrongChunk) {
  auto s = all_stages(PipeSchedule::kInterleaved, 2, 2, 2);
  for (PipeAction& a : s[0])
    if (a.kind == PipeAction::kRecvForward && a.micro == 1 && a.chunk == 1) a.chunk = 0;
  EXPECT_NE(check_schedule(s), "");
  // Backwards of one chunk out of micro-batch order.
  auto t = all_stages(PipeSchedule::kInterleaved, 2, 2, 2);
  std::vector<PipeAction>& a = t[1];
  std::vector<std::size_t> b;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].kind == PipeAction::kBackward && a[i].chunk == 0) b.push_back(i);
  std::swap(a[b[0]].micro, a[b[1]].micro);
  EXPECT_NE(check_schedule(t), "");
}

}  // namespace
}  // namespace meshtrain::parallel
