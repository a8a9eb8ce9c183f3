// The conformance suite, point-to-point: send, recv and exchange (matching in posting order,
// mixed with collectives, large messages, timeouts naming the peer, argument and size
// mismatches, device tensors). The collectives are in suite.cpp; the same rules hold here
// (EXPECT, never ASSERT, in bodies that run on every rank).

#include "tests/comm/suite.hpp"
#include "tests/comm/suite_util.hpp"

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "runtime/backend.hpp"
#include "runtime/device.hpp"
#include "runtime/error.hpp"

namespace meshtrain::comm::commtest {
namespace {

// Point-to-point ---------------------------------------------------------------------------
// Every test posts its sends and recvs as comm/README.md's deadlock rule says, so that the same
// bodies would pass on NCCL: a send and a recv that must be in flight together go in one
// exchange(), and lone ops are posted in Megatron's even/odd order (even ranks send first).

constexpr DType kP2pTypes[] = {DType::kF32, DType::kBF16, DType::kI32};

// The k-th test message of rank `from`: random values, so that the receiver knows what to expect.
Tensor payload(DType d, std::int64_t n, int from, int k, Device& dev = cpu_device()) {
  const std::uint64_t seed = seed_of(d, n, 300 + k);
  if (d != DType::kI32) return make(d, seed, from, n, dev);
  std::vector<std::int32_t> v(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i)
    v[i] = static_cast<std::int32_t>(
        mix(seed ^ mix(static_cast<std::uint64_t>(from) << 40 ^ static_cast<std::uint64_t>(i))));
  return Tensor::from_ints(v, Shape{n}, dev);
}

// Whether `got` holds the k-th message of rank `from`, bit for bit.
bool is_payload(const Tensor& got, int from, int k) {
  const Tensor want = payload(got.dtype(), got.numel(), from, k);
  if (got.dtype() == DType::kI32) return got.to_ints() == want.to_ints();
  return got.to_floats() == want.to_floats();
}

void expect_invalid(const std::function<void()>& call, const std::vector<std::string>& parts) {
  try {
    call();
    ADD_FAILURE() << "no InvalidArgument (expected a message with '" << parts.front() << "')";
  } catch (const InvalidArgument& e) {
    for (const std::string& part : parts) EXPECT_TRUE(contains(e.what(), part)) << e.what();
  }
}

TEST_P(CommSuite, P2pRingExchange) {
  MT_SKIP_ON_REDUCTION_VARIANT();
  if (h().size() < 2) GTEST_SKIP() << "needs a peer";
  h().run(suite_options(), [&](Communicator& c) {
    const int n = c.size();
    const int r = c.rank();
    const int next = (r + 1) % n;
    const int prev = (r + n - 1) % n;
    int k = 0;
    // Each rank sends to the next and receives from the previous one (with two ranks: a send and
    // a recv with the same peer), in one exchange().
    for (DType d : kP2pTypes) {
      for (std::int64_t count : kCounts) {
        Tensor out = payload(d, count, r, k);
        Tensor in = Tensor::empty(Shape{count}, d);
        std::vector<Work> w = c.exchange({P2pOp::send(out, next), P2pOp::recv(in, prev)});
        ASSERT_EQ(w.size(), 2u);
        EXPECT_EQ(w[0].collective().op, OpType::kSend);
        EXPECT_EQ(w[0].collective().peer, next);
        EXPECT_EQ(w[0].collective().seq, static_cast<std::uint64_t>(k + 1));
        EXPECT_EQ(w[1].collective().op, OpType::kRecv);
        EXPECT_EQ(w[1].collective().peer, prev);
        EXPECT_EQ(w[1].collective().seq, static_cast<std::uint64_t>(k + 1));
        wait_all(w);
        EXPECT_TRUE(is_payload(in, prev, k))
            << "exchange " << dtype_name(d) << "[" << count << "] from rank " << prev;
        EXPECT_TRUE(is_payload(out, r, k)) << "a send modified its tensor";
        ++k;
      }
    }
    // The same shift with lone sends and recvs: even ranks send first, odd ranks receive first.
    for (DType d : kP2pTypes) {
      for (std::int64_t count : kCounts) {
        Tensor out = payload(d, count, r, k);
        Tensor in = Tensor::empty(Shape{count}, d);
        Work send, recv;
        if (r % 2 == 0) {
          send = c.send(out, next);
          recv = c.recv(in, prev);
        } else {
          recv = c.recv(in, prev);
          send = c.send(out, next);
        }
        recv.wait();
        send.wait();
        EXPECT_TRUE(is_payload(in, prev, k))
            << "send/recv " << dtype_name(d) << "[" << count << "] from rank " << prev;
        ++k;
      }
    }
    EXPECT_EQ(c.next_send_seq(next), static_cast<std::uint64_t>(k + 1));
    EXPECT_EQ(c.next_recv_seq(prev), static_cast<std::uint64_t>(k + 1));
    // Point-to-point takes no collective numbers.
    EXPECT_EQ(c.next_seq(), 1u);
    c.barrier().wait();
  });
}

TEST_P(CommSuite, P2pManyInFlightMatchInPostingOrder) {
  MT_SKIP_ON_REDUCTION_VARIANT();
  if (h().size() < 2) GTEST_SKIP() << "needs a peer";
  h().run(suite_options(), [&](Communicator& c) {
    const int n = c.size();
    const int r = c.rank();
    const int next = (r + 1) % n;
    const int prev = (r + n - 1) % n;
    constexpr int kMessages = 48;
    auto type_of = [](int k) { return kP2pTypes[k % 3]; };
    auto count_of = [](int k) { return static_cast<std::int64_t>(1 + (k * 7919) % 20'000); };
    std::vector<Tensor> outs, ins;
    std::vector<Work> sends, recvs;
    auto post_sends = [&] {
      for (int k = 0; k < kMessages; ++k) {
        outs.push_back(payload(type_of(k), count_of(k), r, k));
        sends.push_back(c.send(outs.back(), next));
        EXPECT_EQ(sends.back().collective().seq, static_cast<std::uint64_t>(k + 1));
      }
    };
    auto post_recvs = [&] {
      for (int k = 0; k < kMessages; ++k) {
        ins.push_back(Tensor::empty(Shape{count_of(k)}, type_of(k)));
        recvs.push_back(c.recv(ins.back(), prev));
      }
    };
    if (r % 2 == 0) {
      post_sends();
      post_recvs();
    } else {
      post_recvs();
      post_sends();
    }
    // Waited in reverse: matching is by posting order, whatever the order of the waits.
    for (int k = kMessages - 1; k >= 0; --k) recvs[k].wait();
    for (Work& w : sends) w.wait();
    for (int k = 0; k < kMessages; ++k)
      EXPECT_TRUE(is_payload(ins[k], prev, k)) << "message " << k << " from rank " << prev;

    // All in one exchange, polled with test() as a schedule overlapping compute would.
    std::vector<P2pOp> ops;
    std::vector<Tensor> again;
    for (int k = 0; k < kMessages; ++k) {
      ops.push_back(P2pOp::send(payload(type_of(k), count_of(k), r, kMessages + k), next));
      again.push_back(Tensor::empty(Shape{count_of(k)}, type_of(k)));
      ops.push_back(P2pOp::recv(again.back(), prev));
    }
    std::vector<Work> works = c.exchange(ops);
    for (std::size_t done = 0; done < works.size();) {
      done = 0;
      for (Work& w : works) done += w.test();
      std::this_thread::yield();
    }
    for (int k = 0; k < kMessages; ++k) {
      EXPECT_EQ(works[2 * k + 1].collective().seq, static_cast<std::uint64_t>(kMessages + k + 1));
      EXPECT_TRUE(is_payload(again[k], prev, kMessages + k)) << "batched message " << k;
    }
  });
}

TEST_P(CommSuite, P2pMixedWithCollectives) {
  MT_SKIP_ON_REDUCTION_VARIANT();
  if (h().size() < 2) GTEST_SKIP() << "needs a peer";
  h().run(suite_options(), [&](Communicator& c) {
    const int n = c.size();
    const int r = c.rank();
    const int next = (r + 1) % n;
    const int prev = (r + n - 1) % n;
    constexpr int kRounds = 4;
    // 400 KB of fp32: a ring allreduce, itself made of point-to-point messages on the same MPI
    // communicator as the sends and recvs.
    constexpr std::int64_t kBig = 100'003;
    for (int round = 0; round < kRounds; ++round) {
      const std::uint64_t seed = seed_of(DType::kF32, kBig, 400 + round);
      Tensor big = make(DType::kF32, seed, r, kBig);
      Tensor small = make(DType::kF32, seed, r, 5);
      Tensor out = payload(DType::kBF16, 50'000, r, round);
      Tensor in = Tensor::empty(Shape{50'000}, DType::kBF16);
      Work ar = c.allreduce(big);
      std::vector<Work> x = c.exchange({P2pOp::send(out, next), P2pOp::recv(in, prev)});
      Work ar2 = c.allreduce(small, ReduceOp::kMax);
      Work bar = c.barrier();
      // Waited in another order than posted.
      x[1].wait();
      ar2.wait();
      bar.wait();
      ar.wait();
      x[0].wait();
      EXPECT_TRUE(is_payload(in, prev, round)) << "round " << round;
      check_reduced(fmt::format("allreduce beside sends and recvs, round {}", round),
                    big.to_floats(), ReduceOp::kSum, expect(DType::kF32, seed, n, 0, kBig),
                    DType::kF32, n);
      check_reduced("small allreduce beside sends and recvs", small.to_floats(), ReduceOp::kMax,
                    expect(DType::kF32, seed, n, 0, 5), DType::kF32, n);
    }
    EXPECT_EQ(c.next_seq(), static_cast<std::uint64_t>(1 + 3 * kRounds));
  });
}

TEST_P(CommSuite, P2pLargeMessages) {
  MT_SKIP_ON_REDUCTION_VARIANT();
  if (h().size() < 2) GTEST_SKIP() << "needs a peer";
  h().run(suite_options(), [&](Communicator& c) {
    const int n = c.size();
    const int r = c.rank();
    const int next = (r + 1) % n;
    const int prev = (r + n - 1) % n;
    int k = 0;
    for (DType d : {DType::kF32, DType::kBF16}) {
      constexpr std::int64_t kCount = (4 << 20) + 9;  // 16 MiB of fp32, 8 MiB of bf16
      Tensor out = payload(d, kCount, r, k);
      Tensor in = Tensor::empty(Shape{kCount}, d);
      std::vector<Work> w = c.exchange({P2pOp::recv(in, prev), P2pOp::send(out, next)});
      wait_all(w);
      EXPECT_TRUE(is_payload(in, prev, k)) << dtype_name(d) << "[" << kCount << "]";
      ++k;
    }
  });
}

TEST_P(CommSuite, P2pTimeoutNamesThePeerAndItsLabel) {
  MT_SKIP_ON_REDUCTION_VARIANT();
  if (h().size() < 2) GTEST_SKIP() << "needs a peer to wait for";
  // As TimeoutNamesTheRankThatNeverArrived: timings from a barrier; the late rank posts its ops
  // after rank 0's two timeouts and before rank 0 gives up on it in finalize.
  constexpr double kTimeout = 4.0;
  constexpr auto kLate = std::chrono::milliseconds(6500);
  constexpr std::int64_t kBig = 1 << 20;  // 4 MiB: above every eager limit, a send waits
  CommOptions o = suite_options();
  o.timeout_s = kTimeout;
  h().run(o, [&](Communicator& c) {
    const int r = c.rank();
    const int late = c.size() - 1;
    c.barrier().wait();
    const auto start = Clock::now();
    if (r == late) {
      std::this_thread::sleep_until(start + kLate);
      Tensor small = payload(DType::kF32, 7, r, 0);
      Tensor big = Tensor::empty(Shape{kBig}, DType::kF32);
      std::vector<Work> w = c.exchange({P2pOp::send(small, 0), P2pOp::recv(big, 0)});
      EXPECT_NO_THROW(wait_all(w));
      EXPECT_TRUE(is_payload(big, 0, 0)) << "the late recv";
      return;
    }
    if (r != 0) return;
    c.set_peer_label(late, "the last stage");
    Tensor small = Tensor::empty(Shape{7}, DType::kF32);
    Tensor big = payload(DType::kF32, kBig, 0, 0);
    Work recv = c.recv(small, late, "pipeline stage 9");
    Work send = c.send(big, late);
    EXPECT_EQ(send.collective().label, "the last stage");
    try {
      recv.wait();
      ADD_FAILURE() << "no CommTimeout for a recv whose send never came";
    } catch (const CommTimeout& e) {
      const double waited = std::chrono::duration<double>(Clock::now() - start).count();
      EXPECT_GE(waited, kTimeout - 0.05);
      EXPECT_LT(waited, kTimeout + 5.0);
      const std::string msg = e.what();
      EXPECT_TRUE(contains(msg, fmt::format("recv #1 from rank {}, pipeline stage 9", late)))
          << msg;
      EXPECT_TRUE(contains(msg, "'" + c.name() + "'")) << msg;
      EXPECT_TRUE(contains(msg,
                           "never posted the matching send #1 to this rank (it posted 0 "
                           "sends to this rank)"))
          << msg;
      EXPECT_FALSE(contains(msg, "lost")) << msg;
      // The liveness check (MPI) finds the peer there: alive, or, on a machine so loaded that the
      // peer's progress thread did not run for a second, stalled; never lost.
      if (c.backend().kind() == "mpi") {
        EXPECT_TRUE(contains(msg, "; it is alive (it answered a liveness check)") ||
                    contains(msg, "; it did not run for"))
            << msg;
      }
    }
    try {
      while (!send.test()) std::this_thread::yield();
      ADD_FAILURE() << "no CommTimeout for a send whose recv never came";
    } catch (const CommTimeout& e) {
      const std::string msg = e.what();
      EXPECT_TRUE(contains(msg, fmt::format("send #1 to rank {}, the last stage", late))) << msg;
      EXPECT_TRUE(contains(msg, "never posted the matching recv #1 from this rank")) << msg;
      EXPECT_FALSE(contains(msg, "lost")) << msg;
    }
    try {
      c.send(big, late);
      ADD_FAILURE() << "a send after a timeout was accepted";
    } catch (const CommTimeout& e) {
      EXPECT_TRUE(contains(e.what(), "unusable")) << e.what();
    }
  });
}

TEST_P(CommSuite, P2pBadArgumentsAreRejectedLocally) {
  MT_SKIP_ON_REDUCTION_VARIANT();
  h().run(suite_options(), [&](Communicator& c) {
    const int n = c.size();
    const int r = c.rank();
    Tensor t = Tensor::zeros(Shape{8}, DType::kF32);
    expect_invalid([&] { c.send(t, r); },
                   {fmt::format("send to rank {} on group", r), "this rank"});
    expect_invalid([&] { c.recv(t, r); }, {fmt::format("recv from rank {}", r), "this rank"});
    expect_invalid([&] { c.send(t, n); }, {"not a rank of the group"});
    expect_invalid([&] { c.recv(t, -1); }, {"not a rank of the group"});
    expect_invalid([&] { c.set_peer_label(r, "me"); }, {"set_peer_label", "this rank"});
    if (n >= 2) {
      const int peer = (r + 1) % n;
      expect_invalid([&] { c.send(Tensor(), peer); }, {"send to rank", "undefined"});
      expect_invalid(
          [&] {
            c.exchange({P2pOp::recv(t.slice(0, 4), peer), P2pOp::send(t.slice(2, 4), peer)});
          },
          {"overlaps"});
      expect_invalid(
          [&] {
            c.exchange({P2pOp{OpType::kBarrier, t, peer, ""}});
          },
          {"not a send or a recv"});
      // A bad op anywhere in a batch posts nothing.
      expect_invalid([&] { c.exchange({P2pOp::send(t, peer), P2pOp::send(t, r)}); }, {"this rank"});
      EXPECT_EQ(c.next_send_seq(peer), 1u);
      EXPECT_EQ(c.next_recv_seq(peer), 1u);
    }
    EXPECT_TRUE(c.exchange({}).empty());
    EXPECT_EQ(c.next_seq(), 1u);
    c.barrier().wait();
  });
}

TEST_P(CommSuite, P2pMismatchedSizesAreReported) {
  MT_SKIP_ON_REDUCTION_VARIANT();
  if (h().size() < 2) GTEST_SKIP() << "needs a peer";
  h().run(suite_options(), [&](Communicator& c) {
    const int r = c.rank();
    // A mismatch leaves the receiving group unusable: each case in a group of its own (ranks 0
    // and 1). The receiver reports it (InvalidArgument); the sender may (loopback) or may not.
    for (const std::pair<int, int>& sizes : {std::pair{8, 7}, std::pair{7, 8}}) {
      const int sent = sizes.first;
      const int held = sizes.second;
      Communicator g = c.split(r <= 1 ? 0 : -1, r);
      if (!g.valid()) continue;
      if (r == 0) {
        Tensor out = payload(DType::kF32, sent, 0, 0);
        try {
          g.send(out, 1).wait();
        } catch (const InvalidArgument& e) {
          EXPECT_TRUE(contains(e.what(), "must have the same dtype and shape")) << e.what();
        }
      } else {
        Tensor in = Tensor::empty(Shape{held}, DType::kF32);
        expect_invalid([&] { g.recv(in, 0, "stage 0").wait(); },
                       {"recv #1 from rank 0, stage 0", "must have the same dtype and shape"});
      }
      g.finalize();
    }
  });
}

TEST_P(CommSuite, P2pDebugModeComparesDtypeAndShape) {
  MT_SKIP_ON_REDUCTION_VARIANT();
  if (h().size() < 2) GTEST_SKIP() << "needs a peer";
  CommOptions o = suite_options();
  o.debug = true;
  h().run(o, [&](Communicator& c) {
    const int r = c.rank();
    // The same bytes, another shape; the same bytes, another dtype.
    const std::pair<Tensor, Tensor> cases[] = {
        {Tensor::zeros(Shape{2, 4}, DType::kF32), Tensor::zeros(Shape{8}, DType::kF32)},
        {Tensor::zeros(Shape{8}, DType::kBF16), Tensor::zeros(Shape{8}, DType::kF16)},
    };
    for (const auto& tensors : cases) {
      const Tensor& out = tensors.first;
      const Tensor& in = tensors.second;
      Communicator g = c.split(r <= 1 ? 0 : -1, r);
      if (!g.valid()) continue;
      if (r == 0) {
        try {
          g.send(out, 1).wait();
        } catch (const InvalidArgument&) {
          // loopback fails both sides
        }
      } else {
        expect_invalid(
            [&] { g.recv(in, 0).wait(); },
            {"point-to-point mismatch",
             fmt::format("rank 0's send #1 of {}{}", dtype_name(out.dtype()), out.shape().str())});
      }
      g.finalize();
    }
  });
}

TEST_P(CommSuite, P2pDeviceTensorsAreStagedOrRejected) {
  MT_SKIP_ON_REDUCTION_VARIANT();
  if (h().size() < 2) GTEST_SKIP() << "needs a peer";
  h().run(suite_options(), [&](Communicator& c) {
    FakeDevice dev;
    const int n = c.size();
    const int r = c.rank();
    const int next = (r + 1) % n;
    const int prev = (r + n - 1) % n;
    Tensor out = payload(DType::kBF16, 1001, r, 0, dev);
    Tensor in = Tensor::empty(Shape{1001}, DType::kBF16, dev);
    if (!c.backend().accepts(dev)) {
      expect_invalid([&] { c.send(out, next); }, {"send to rank", "on a device"});
      expect_invalid([&] { c.recv(in, prev); }, {"recv from rank", "on a device"});
      return;
    }
    std::vector<Work> w = c.exchange({P2pOp::send(out, next), P2pOp::recv(in, prev)});
    wait_all(w);
    EXPECT_TRUE(is_payload(in, prev, 0)) << "staged recv";
  });
}

}  // namespace
}  // namespace meshtrain::comm::commtest
