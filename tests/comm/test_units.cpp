// Unit tests of the pieces that need no peers: collective descriptions, mismatch reports,
// timeout messages, and the 16-bit reduction loops of the MPI user-defined ops.

#include <cmath>
#include <random>

#include <gtest/gtest.h>

#include "comm/communicator.hpp"
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
