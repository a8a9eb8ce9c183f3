// Unit tests of the pieces that need no peers: collective descriptions, mismatch reports,
// timeout messages, the liveness beat's stall decision, and the 16-bit reduction loops of the MPI
// user-defined ops.

#include <chrono>
#include <cmath>
#include <random>

#include <gtest/gtest.h>

#include "comm/communicator.hpp"
#include "comm/mpi/liveness.hpp"
#include "comm/mpi/reduce16.hpp"
#include "runtime/error.hpp"
#include "runtime/settings.hpp"

namespace meshtrain::comm {
namespace {

Collective allreduce_call(DType d, std::int64_t n, std::uint64_t seq) {
  Collective c;
  c.op = OpType::kAllreduce;
  c.reduce = ReduceOp::kSum;
  c.dtype = d;
  c.in_shape = Shape{n};
  c.out_numel = n;
  c.seq = seq;
  return c;
}

TEST(Collective, Describes) {
  EXPECT_EQ(allreduce_call(DType::kBF16, 1024, 7).str(), "allreduce #7 (sum, bf16[1024])");
  Collective b;
  b.op = OpType::kBroadcast;
  b.dtype = DType::kF32;
  b.in_shape = Shape{2, 3};
  b.root = 1;
  b.seq = 2;
  EXPECT_EQ(b.str(), "broadcast #2 (root 1, fp32[2, 3])");
  Collective s;
  s.op = OpType::kSplit;
  s.color = 1;
  s.key = -3;
  s.seq = 9;
  EXPECT_EQ(s.str(), "split #9 (color 1, key -3)");
}

TEST(Collective, MismatchNamesTheFirstDifferingRank) {
  std::vector<Collective> calls(4, allreduce_call(DType::kF32, 7, 3));
  EXPECT_EQ(first_mismatch(calls, "world"), "");
  calls[2] = allreduce_call(DType::kF16, 7, 3);
  calls[3] = allreduce_call(DType::kF32, 8, 3);
  const std::string msg = first_mismatch(calls, "world");
  EXPECT_NE(msg.find("rank 2 called allreduce #3 (sum, fp16[7]), but rank 0 called allreduce #3 "
                     "(sum, fp32[7])"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("'world'"), std::string::npos) << msg;
  // Splits may differ in color and key.
  std::vector<Collective> splits(2);
  splits[0].op = splits[1].op = OpType::kSplit;
  splits[1].color = 5;
  splits[1].key = 2;
  EXPECT_EQ(first_mismatch(splits, "g"), "");
}

TEST(Collective, TimeoutMessageNamesMissingRanks) {
  const auto c = allreduce_call(DType::kF32, 7, 12);
  const std::string msg =
      timeout_message(c, "mpi", "world/1", 0, {1, 3, 5}, 2.0, {2}, {"barrier #11"});
  EXPECT_NE(msg.find("allreduce #12"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'world/1'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("never arrived [rank 2 (world rank 5), last seen at barrier #11"),
            std::string::npos)
      << msg;
  const std::string none = timeout_message(c, "mpi", "world", 0, {0, 1}, 2.0, {}, {});
  EXPECT_NE(none.find("every rank arrived"), std::string::npos) << none;
}

// With a liveness check: a rank that arrived and then did not answer is named as lost; a rank
// that never arrived is said to be alive or lost; when every rank answers, the message says so.
TEST(Collective, TimeoutMessageNamesLostRanks) {
  const auto c = allreduce_call(DType::kF32, 7, 12);
  const LivenessReport lost2{{2}, 3.0};
  const std::string arrived =
      timeout_message(c, "mpi", "world/1", 0, {1, 3, 5}, 4.0, {}, {}, lost2);
  EXPECT_NE(arrived.find("lost rank 2 (world rank 5): it posted it, then did not answer a "
                         "liveness check within 3 s"),
            std::string::npos)
      << arrived;
  const std::string all_alive =
      timeout_message(c, "mpi", "world", 0, {0, 1}, 4.0, {}, {}, LivenessReport{{}, 2.0});
  EXPECT_NE(all_alive.find("every rank answered a liveness check"), std::string::npos) << all_alive;
  const std::string missing = timeout_message(c, "mpi", "world", 0, {0, 1, 2, 3}, 4.0, {1, 3},
                                              {"barrier #11", ""}, LivenessReport{{2, 3}, 3.0});
  EXPECT_NE(missing.find("2 ranks never arrived [rank 1, last seen at barrier #11, alive (it "
                         "answered a liveness check); rank 3, never seen on this group, did not "
                         "answer a liveness check within 3 s: lost"),
            std::string::npos)
      << missing;
  EXPECT_NE(missing.find("Also lost: rank 2, which posted it"), std::string::npos) << missing;
}

// A rank that answered only after it had not run for seconds (a SIGSTOP'd rank continued by the
// job's teardown answers late) is named as stalled, never as alive.
TEST(Collective, TimeoutMessageNamesStalledRanks) {
  const auto c = allreduce_call(DType::kF32, 7, 12);
  LivenessReport r{{}, 3.0};
  r.stalled = {{1, 12.94}};
  const std::string arrived = timeout_message(c, "mpi", "world", 0, {0, 1, 2}, 10.0, {}, {}, r);
  EXPECT_EQ(arrived.find("every rank answered"), std::string::npos) << arrived;
  EXPECT_NE(arrived.find("stalled: rank 1 posted it, then did not run for 12.9 s (stopped, e.g. "
                         "by SIGSTOP, or starved of CPU) and answered a liveness check only after "
                         "it resumed"),
            std::string::npos)
      << arrived;
  const std::string missing =
      timeout_message(c, "mpi", "world", 0, {0, 1, 2}, 10.0, {1}, {"barrier #11"}, r);
  EXPECT_NE(missing.find("rank 1, last seen at barrier #11, did not run for 12.9 s"),
            std::string::npos)
      << missing;
  EXPECT_EQ(missing.find("alive"), std::string::npos) << missing;
  LivenessReport both{{2}, 3.0};
  both.stalled = {{1, 5.0}};
  const std::string lost_and_stalled =
      timeout_message(c, "mpi", "world", 0, {0, 1, 2}, 10.0, {}, {}, both);
  EXPECT_NE(lost_and_stalled.find("lost rank 2"), std::string::npos) << lost_and_stalled;
  EXPECT_NE(lost_and_stalled.find("; stalled: rank 1 posted it, then did not run for 5.0 s"),
            std::string::npos)
      << lost_and_stalled;
}

Collective p2p_call(OpType op, int peer, std::uint64_t seq, std::string label = {}) {
  Collective c;
  c.op = op;
  c.dtype = DType::kBF16;
  c.in_shape = Shape{4, 1024};
  c.out_numel = 4096;
  c.peer = peer;
  c.seq = seq;
  c.label = std::move(label);
  return c;
}

LivenessReport checked(std::vector<int> lost, double window_s) {
  LivenessReport r;
  r.lost = std::move(lost);
  r.window_s = window_s;
  return r;
}

// StallClock (comm/mpi/liveness.hpp): how long this process did not run, as a liveness answer
// says it. Times in steady_clock ticks from an arbitrary start, as the beat thread passes them.
std::int64_t at_ms(double ms) {
  const auto start = std::chrono::hours(10);  // 0 is never a time
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
             start + std::chrono::duration<double, std::milli>(ms))
      .count();
}

// Beats every 100 ms over [from, to] ms.
void beat_every_100ms(detail::StallClock& c, double from, double to) {
  for (double t = from; t <= to; t += 100) c.beat(at_ms(t));
}

TEST(StallClock, NoStallWhileBeating) {
  detail::StallClock c;
  EXPECT_EQ(c.stalled_ms(at_ms(0)), 0u);  // before the first beat
  beat_every_100ms(c, 0, 5000);
  EXPECT_EQ(c.stalled_ms(at_ms(5050)), 0u);
  // A gap under 3 s (a loaded machine's scheduling) is not a stall, while it lasts or after.
  EXPECT_EQ(c.stalled_ms(at_ms(7900)), 0u);
  c.beat(at_ms(7900));
  EXPECT_EQ(c.stalled_ms(at_ms(7950)), 0u);
}

TEST(StallClock, StoppedProcessAnswersWithItsStall) {
  detail::StallClock c;
  beat_every_100ms(c, 0, 1000);
  // SIGSTOP at 1000 ms, SIGCONT at 14000 ms: a ping answered before the beat thread has run
  // again sees the overdue beat...
  EXPECT_EQ(c.stalled_ms(at_ms(14000)), 13000u);
  // ... and one answered after it, the stall it recorded, for a minute.
  c.beat(at_ms(14000));
  EXPECT_EQ(c.stalled_ms(at_ms(14001)), 13000u);
  beat_every_100ms(c, 14100, 74000);
  EXPECT_EQ(c.stalled_ms(at_ms(20000)), 13000u);
  EXPECT_EQ(c.stalled_ms(at_ms(73999)), 13000u);
  EXPECT_EQ(c.stalled_ms(at_ms(74001)), 0u);
}

TEST(StallClock, ResetStartsAfresh) {
  // The beat thread ended with the channel (MpiSession released) and a new one started later:
  // the time between is no stall.
  detail::StallClock c;
  beat_every_100ms(c, 0, 1000);
  c.reset();
  EXPECT_EQ(c.stalled_ms(at_ms(60000)), 0u);
  c.beat(at_ms(60000));
  EXPECT_EQ(c.stalled_ms(at_ms(60001)), 0u);
}

TEST(Collective, DescribesPointToPoint) {
  EXPECT_EQ(p2p_call(OpType::kSend, 2, 3).str(), "send #3 to rank 2 (bf16[4, 1024])");
  EXPECT_EQ(p2p_call(OpType::kRecv, 0, 1, "pipeline stage 0").str(),
            "recv #1 from rank 0, pipeline stage 0 (bf16[4, 1024])");
  EXPECT_TRUE(is_p2p(OpType::kSend) && is_p2p(OpType::kRecv) && !is_p2p(OpType::kBarrier));
  const Collective recv = p2p_call(OpType::kRecv, 1, 2);
  Collective send = p2p_call(OpType::kSend, 0, 2);
  EXPECT_EQ(p2p_mismatch(recv, send, "g"), "");
  send.in_shape = Shape{4096};
  EXPECT_EQ(p2p_mismatch(recv, send, "g"),
            "point-to-point mismatch on group 'g': recv #2 from rank 1 (bf16[4, 1024]) was matched "
            "by rank 1's send #2 of bf16[4096] (a send and its recv must have the same dtype and "
            "shape)");
}

// Each thing a timed-out send or recv can say of its peer: that it never posted the matching op
// (and is alive, lost or stalled), or that it did and the transfer is stuck, or that the two
// sides disagree on dtype or shape; with the peer's world rank and label.
TEST(Collective, P2pTimeoutMessageNamesThePeer) {
  const Collective recv = p2p_call(OpType::kRecv, 2, 3, "pipeline stage 2");
  const std::vector<int> world = {1, 3, 5};  // a PP group: group rank 2 is world rank 5
  PeerP2p behind;
  behind.sends = 2;
  behind.last = p2p_call(OpType::kSend, 0, 2);
  const std::string alive =
      p2p_timeout_message(recv, "mpi", "world/1", 0, world, 4.0, behind, checked({}, 3.0));
  EXPECT_NE(alive.find("recv #3 from rank 2, pipeline stage 2 (bf16[4, 1024]) on group 'world/1' "
                       "(mpi, 3 ranks, this is rank 0 (world rank 1)) did not complete within 4 s: "
                       "rank 2 (world rank 5, pipeline stage 2) never posted the matching send #3 "
                       "to this rank (it posted 2 sends to this rank, the last send #2 "
                       "(bf16[4, 1024])); it is alive (it answered a liveness check) but has not "
                       "posted the send"),
            std::string::npos)
      << alive;
  const std::string lost =
      p2p_timeout_message(recv, "mpi", "world/1", 0, world, 4.0, behind, checked({2}, 3.0));
  EXPECT_NE(lost.find("never posted the matching send #3 to this rank (it posted 2 sends to this "
                      "rank, the last send #2 (bf16[4, 1024])); it did not answer a liveness "
                      "check within 3 s: lost (exited, killed or stopped). End the job"),
            std::string::npos)
      << lost;
  LivenessReport stalled = checked({}, 3.0);
  stalled.stalled = {{2, 9.5}};
  const std::string late =
      p2p_timeout_message(recv, "mpi", "world/1", 0, world, 4.0, behind, stalled);
  EXPECT_NE(late.find("; it did not run for 9.5 s (stopped"), std::string::npos) << late;
  EXPECT_EQ(late.find("alive"), std::string::npos) << late;

  const Collective send = p2p_call(OpType::kSend, 1, 1);
  PeerP2p posted;
  posted.recvs = 1;
  posted.matching = p2p_call(OpType::kRecv, 0, 1);
  const std::string stuck =
      p2p_timeout_message(send, "nccl", "world", 0, {0, 1}, 4.0, posted, checked({1}, 3.0));
  EXPECT_NE(stuck.find("rank 1 posted the matching recv #1 from this rank, but the transfer did "
                       "not complete; then it did not answer a liveness check within 3 s: lost"),
            std::string::npos)
      << stuck;
  posted.matching->dtype = DType::kF32;
  const std::string differ = p2p_timeout_message(send, "nccl", "world", 0, {0, 1}, 4.0, posted);
  EXPECT_NE(differ.find("rank 1 posted the matching recv #1 from this rank as fp32[4, 1024], but "
                        "this send is bf16[4, 1024]: a send and its recv must have the same dtype "
                        "and shape"),
            std::string::npos)
      << differ;
  const std::string unknown =
      p2p_timeout_message(send, "loopback", "world", 0, {0, 1}, 4.0, std::nullopt);
  EXPECT_NE(unknown.find("rank 1 did not complete the matching recv #1 from this rank. End"),
            std::string::npos)
      << unknown;
}

TEST(CommOptions, FromSettings) {
  const CommOptions o = CommOptions::from_settings();
  EXPECT_EQ(o.timeout_s, settings().comm_timeout_s);
  EXPECT_EQ(o.debug, settings().comm_debug);
  EXPECT_THROW(Communicator(nullptr, CommOptions{-1.0, false}), InvalidArgument);
}

// The user-op loops against the runtime's reference conversions, including exact ties.
TEST(Reduce16, MatchesReferenceRounding) {
  std::mt19937 rng(42);
  std::uniform_real_distribution<float> dist(-4.0f, 4.0f);
  const std::size_t n = 4099;
  for (DType d : {DType::kBF16, DType::kF16}) {
    std::vector<std::uint16_t> a(n), b(n);
    std::vector<float> fa(n), fb(n);
    for (std::size_t i = 0; i < n; ++i) {
      float x = dist(rng), y = dist(rng);
      if (i % 97 == 0) y = -x;  // exact cancellation
      if (d == DType::kBF16) {
        a[i] = float_to_bf16(x).bits;
        b[i] = float_to_bf16(y).bits;
        fa[i] = bf16_to_float(bf16{a[i]});
        fb[i] = bf16_to_float(bf16{b[i]});
      } else {
        a[i] = float_to_f16(x).bits;
        b[i] = float_to_f16(y).bits;
        fa[i] = f16_to_float(f16{a[i]});
        fb[i] = f16_to_float(f16{b[i]});
      }
    }
    auto ref = [&](float v) -> std::uint16_t {
      return d == DType::kBF16 ? float_to_bf16(v).bits : float_to_f16(v).bits;
    };
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
      std::vector<std::uint16_t> io = b;
      detail::reduce16(d, op, a.data(), io.data(), n);
      int bad = 0;
      for (std::size_t i = 0; i < n; ++i) {
        const float want = op == ReduceOp::kSum   ? fa[i] + fb[i]
                           : op == ReduceOp::kMax ? std::max(fa[i], fb[i])
                                                  : std::min(fa[i], fb[i]);
        bad += io[i] != ref(want);
      }
      EXPECT_EQ(bad, 0) << dtype_name(d) << " " << reduce_op_name(op);
    }
    std::vector<float> wide(n);
    detail::widen16(d, a.data(), wide.data(), n);
    EXPECT_EQ(wide, fa);
    std::vector<std::uint16_t> narrow(n);
    detail::narrow16(d, fb.data(), narrow.data(), n, 0.25f);
    int bad = 0;
    for (std::size_t i = 0; i < n; ++i) bad += narrow[i] != ref(fb[i] * 0.25f);
    EXPECT_EQ(bad, 0);
  }
  // Ties round to even, and NaN stays NaN.
  const std::uint16_t one = float_to_bf16(1.0f).bits;
  const std::uint16_t tiny = float_to_bf16(std::ldexp(1.0f, -8)).bits;  // half an ulp of 1
  std::uint16_t io = one;
  detail::reduce16(DType::kBF16, ReduceOp::kSum, &tiny, &io, 1);
  EXPECT_EQ(io, one);
  const std::uint16_t nan = float_to_bf16(NAN).bits;
  io = one;
  detail::reduce16(DType::kBF16, ReduceOp::kSum, &nan, &io, 1);
  EXPECT_TRUE(std::isnan(bf16_to_float(bf16{io})));
}

}  // namespace
}  // namespace meshtrain::comm
