// The conformance suite: every collective and dtype against an expectation computed here from
// the same random inputs, on every rank. Bodies run concurrently on every rank (threads or
// processes), so they use EXPECT (never ASSERT: a rank that returns early would leave the
// others waiting in a collective).
//
// This file: the collectives. Point-to-point: suite_p2p.cpp; the inputs and expectations both
// use: suite_util.hpp.

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

TEST_P(CommSuite, RankAndSize) {
  MT_SKIP_ON_REDUCTION_VARIANT();
  const int n = h().size();
  h().run(suite_options(), [&](Communicator& c) {
    EXPECT_EQ(c.size(), n);
    EXPECT_GE(c.rank(), 0);
    EXPECT_LT(c.rank(), n);
    EXPECT_EQ(c.next_seq(), 1u);
    Tensor mine = Tensor::from_ints({c.rank()}, Shape{1});
    Tensor all = Tensor::zeros(Shape{n}, DType::kI32);
    c.all_gather(mine, all).wait();
    std::vector<std::int32_t> want(n);
    std::iota(want.begin(), want.end(), 0);
    EXPECT_EQ(all.to_ints(), want);
    EXPECT_EQ(c.next_seq(), 2u);
  });
}

TEST_P(CommSuite, Allreduce) {
  h().run(suite_options(), [&](Communicator& c) {
    const int n = c.size();
    for (DType d : kFloatTypes) {
      for (std::int64_t count : kCounts) {
        const std::uint64_t seed = seed_of(d, count, 1);
        const Expected e = expect(d, seed, n, 0, count);
        const std::vector<float> mine = values(d, seed, c.rank(), count);
        for (ReduceOp op : kOps) {
          for (bool in_place : {true, false}) {
            const std::string what =
                fmt::format("allreduce {} {}[{}] {}", reduce_op_name(op), dtype_name(d), count,
                            in_place ? "in place" : "out of place");
            Tensor in = Tensor::from_floats(mine, Shape{count}, d);
            if (in_place) {
              c.allreduce(in, op).wait();
              check_reduced(what, in.to_floats(), op, e, d, n);
            } else {
              Tensor out = Tensor::empty(Shape{count}, d);
              c.allreduce(in, out, op).wait();
              check_reduced(what, out.to_floats(), op, e, d, n);
              EXPECT_EQ(in.to_floats(), mine) << what << ": the input was modified";
            }
          }
        }
      }
    }
  });
}

TEST_P(CommSuite, ReduceScatter) {
  h().run(suite_options(), [&](Communicator& c) {
    const int n = c.size();
    for (DType d : kFloatTypes) {
      for (std::int64_t m : kCounts) {
        const std::uint64_t seed = seed_of(d, m, 2);
        const Expected e = expect(d, seed, n, c.rank() * m, m);
        const Tensor in = make(d, seed, c.rank(), n * m);
        for (ReduceOp op : kOps) {
          Tensor out = Tensor::empty(Shape{m}, d);
          c.reduce_scatter(in, out, op).wait();
          check_reduced(
              fmt::format("reduce_scatter {} {}[{} x {}]", reduce_op_name(op), dtype_name(d), n, m),
              out.to_floats(), op, e, d, n);
        }
      }
    }
  });
}

void check_gathered(const std::string& what, const std::vector<float>& got, DType d,
                    std::uint64_t seed, int n, std::int64_t m) {
  std::int64_t bad = 0;
  for (int q = 0; q < n; ++q) {
    for (std::int64_t j = 0; j < m; ++j) bad += got[q * m + j] != value(d, seed, q, j);
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " elements differ from the ranks' inputs";
}

TEST_P(CommSuite, AllGather) {
  MT_SKIP_ON_REDUCTION_VARIANT();
  h().run(suite_options(), [&](Communicator& c) {
    const int n = c.size();
    for (DType d : kFloatTypes) {
      for (std::int64_t m : kCounts) {
        const std::uint64_t seed = seed_of(d, m, 3);
        const Tensor in = make(d, seed, c.rank(), m);
        Tensor out = Tensor::empty(Shape{n * m}, d);
        c.all_gather(in, out).wait();
        check_gathered(fmt::format("all_gather {}[{}]", dtype_name(d), m), out.to_floats(), d, seed,
                       n, m);
        // In place: the input is this rank's chunk of the output (ZeRO-1's parameter gather).
        Tensor full = Tensor::empty(Shape{n * m}, d);
        Tensor chunk = full.slice(c.rank() * m, m);
        chunk.copy_from(in);
        c.all_gather(chunk, full).wait();
        check_gathered(fmt::format("all_gather in place {}[{}]", dtype_name(d), m),
                       full.to_floats(), d, seed, n, m);
      }
    }
  });
}

TEST_P(CommSuite, Broadcast) {
  MT_SKIP_ON_REDUCTION_VARIANT();
  h().run(suite_options(), [&](Communicator& c) {
    const int n = c.size();
    for (DType d : kFloatTypes) {
      for (std::int64_t m : kCounts) {
        for (int root : {0, n - 1}) {
          const std::uint64_t seed = seed_of(d, m, 4 + root);
          Tensor t = make(d, seed, c.rank(), m);
          c.broadcast(t, root).wait();
          EXPECT_EQ(t.to_floats(), values(d, seed, root, m))
              << "broadcast " << dtype_name(d) << "[" << m << "] from root " << root;
        }
      }
    }
  });
}

TEST_P(CommSuite, BarrierAndSequenceNumbers) {
  MT_SKIP_ON_REDUCTION_VARIANT();
  h().run(suite_options(), [&](Communicator& c) {
    for (int i = 0; i < 10; ++i) {
      Work w = c.barrier();
      EXPECT_EQ(w.collective().seq, static_cast<std::uint64_t>(i + 1));
      EXPECT_EQ(w.collective().op, OpType::kBarrier);
      w.wait();
      EXPECT_TRUE(w.test());  // stays complete
    }
    EXPECT_EQ(c.next_seq(), 11u);
  });
}

TEST_P(CommSuite, SplitSubgroups) {
  MT_SKIP_ON_REDUCTION_VARIANT();
  h().run(suite_options(), [&](Communicator& c) {
    const int n = c.size();
    const int r = c.rank();
    const int color = r % 2;
    // Key -rank: the subgroup orders its members by descending parent rank.
    Communicator sub = c.split(color, -r);
    std::vector<int> members;
    for (int q = n - 1; q >= 0; --q) {
      if (q % 2 == color) members.push_back(q);
    }
    EXPECT_TRUE(sub.valid());
    EXPECT_EQ(sub.size(), static_cast<int>(members.size()));
    EXPECT_EQ(sub.rank(),
              static_cast<int>(std::find(members.begin(), members.end(), r) - members.begin()));
    EXPECT_EQ(sub.name(), fmt::format("{}/{}", c.name(), color));
    EXPECT_EQ(sub.next_seq(), 1u);

    Tensor ids = Tensor::zeros(Shape{sub.size()}, DType::kI32);
    sub.all_gather(Tensor::from_ints({r}, Shape{1}), ids).wait();
    EXPECT_EQ(ids.to_ints(), std::vector<std::int32_t>(members.begin(), members.end()));

    const std::uint64_t seed = seed_of(DType::kF32, 1000, 5);
    Tensor t = make(DType::kF32, seed, r, 1000);
    sub.allreduce(t).wait();
    double worst = 0;
    const auto got = t.to_floats();
    for (int i = 0; i < 1000; ++i) {
      double want = 0;
      for (int q : members) want += value(DType::kF32, seed, q, i);
      worst = std::max(worst, std::fabs(got[i] - want));
    }
    EXPECT_LT(worst, 1e-5) << "allreduce over subgroup " << sub.name();

    // The parent stays usable alongside its child, and children split further.
    c.barrier().wait();
    Communicator subsub = sub.split(0, sub.rank());
    EXPECT_EQ(subsub.size(), sub.size());
    EXPECT_EQ(subsub.rank(), sub.rank());
    subsub.barrier().wait();

    // A negative color leaves a rank out of every subgroup.
    Communicator rest = c.split(r == 0 ? -1 : 7, r);
    EXPECT_EQ(rest.valid(), r != 0);
    if (rest.valid()) {
      EXPECT_EQ(rest.size(), n - 1);
      EXPECT_EQ(rest.rank(), r - 1);
      Tensor one = Tensor::from_floats({1.0f}, Shape{1}, DType::kF32);
      rest.allreduce(one).wait();
      EXPECT_EQ(one.to_floats()[0], static_cast<float>(n - 1));
    }
    sub.finalize();  // a parent may outlive its children, and the other way round
    rest.finalize();
    subsub.finalize();
  });
}

TEST_P(CommSuite, ManyOutstandingAsync) {
  h().run(suite_options(), [&](Communicator& c) {
    const int n = c.size();
    constexpr int kOutstanding = 64;
    std::vector<Work> works;
    std::vector<Tensor> tensors;
    std::vector<std::uint64_t> seeds;
    const std::uint64_t first = c.next_seq();
    for (int k = 0; k < kOutstanding; ++k) {
      const DType d = kFloatTypes[k % 3];
      const std::int64_t count = 1 + (k * 7919) % 5000;
      seeds.push_back(seed_of(d, count, 100 + k));
      tensors.push_back(make(d, seeds.back(), c.rank(), count));
      works.push_back(c.allreduce(tensors.back(), ReduceOp::kSum));
      EXPECT_EQ(works.back().collective().seq, first + k);
    }
    // Poll them all (test() advances every one), as an overlapping reducer would.
    for (std::size_t done = 0; done < works.size();) {
      done = 0;
      for (Work& w : works) done += w.test();
      std::this_thread::yield();
    }
    for (int k = 0; k < kOutstanding; ++k) {
      const DType d = kFloatTypes[k % 3];
      const std::int64_t count = tensors[k].numel();
      check_reduced(fmt::format("outstanding allreduce #{}", k), tensors[k].to_floats(),
                    ReduceOp::kSum, expect(d, seeds[k], n, 0, count), d, n);
    }
    // And waiting in reverse order of posting.
    works.clear();
    for (int k = 0; k < kOutstanding; ++k) works.push_back(c.allreduce(tensors[k], ReduceOp::kMax));
    for (int k = kOutstanding - 1; k >= 0; --k) works[k].wait();
    c.wait_all();
  });
}

TEST_P(CommSuite, RanksWaitInDifferentOrders) {
  // Large operations run as rings advanced by the waiting rank: waiting on one must keep
  // advancing the others, or two ranks waiting in different orders would stall each other.
  h().run(suite_options(), [&](Communicator& c) {
    const int n = c.size();
    Communicator other = c.split(0, -c.rank());  // a second group over the same ranks
    constexpr int kOps = 6;
    constexpr std::int64_t kCount = 100'003;  // 400 KB of fp32: above the ring threshold
    std::vector<Work> works;
    std::vector<Tensor> tensors;
    std::vector<std::uint64_t> seeds;
    for (int k = 0; k < kOps; ++k) {
      Communicator& g = k % 2 == 0 ? c : other;
      const DType d = k % 3 == 0 ? DType::kF32 : DType::kBF16;
      seeds.push_back(seed_of(d, kCount, 200 + k));
      tensors.push_back(make(d, seeds.back(), c.rank(), kCount));
      works.push_back(g.allreduce(tensors.back(), ReduceOp::kSum));
    }
    // Even ranks wait first to last, odd ranks last to first.
    for (int i = 0; i < kOps; ++i) works[c.rank() % 2 == 0 ? i : kOps - 1 - i].wait();
    for (int k = 0; k < kOps; ++k) {
      const DType d = k % 3 == 0 ? DType::kF32 : DType::kBF16;
      check_reduced(fmt::format("allreduce #{} waited out of order", k), tensors[k].to_floats(),
                    ReduceOp::kSum, expect(d, seeds[k], n, 0, kCount), d, n);
    }
    // A blocking split (MPI_Comm_split) while an operation is outstanding: even ranks split
    // first and wait after, odd ranks wait first and split after.
    Tensor big = make(DType::kF32, seeds[0], c.rank(), kCount);
    Work pending = other.allreduce(big, ReduceOp::kMax);
    if (c.rank() % 2 == 0) {
      Communicator s = other.split(0, c.rank());
      pending.wait();
      s.finalize();
    } else {
      pending.wait();
      Communicator s = other.split(0, c.rank());
      s.finalize();
    }
    check_reduced("allreduce outstanding across a split", big.to_floats(), ReduceOp::kMax,
                  expect(DType::kF32, seeds[0], n, 0, kCount), DType::kF32, n);
    other.finalize();
  });
}

TEST_P(CommSuite, TimeoutNamesTheRankThatNeverArrived) {
  MT_SKIP_ON_REDUCTION_VARIANT();
  if (h().size() < 2) GTEST_SKIP() << "needs a peer to wait for";
  // Timings are measured from a barrier that every rank leaves together, not from when each
  // rank entered the test (which a loaded machine can spread by seconds). The sleeper arrives
  // kLate after it: after every other rank's timeout (kTimeout after the barrier, plus its
  // report), and well before the others give up on it in finalize (one more timeout).
  constexpr double kTimeout = 4.0;
  constexpr auto kLate = std::chrono::milliseconds(6000);
  CommOptions o = suite_options();
  o.timeout_s = kTimeout;
  h().run(o, [&](Communicator& c) {
    const int sleeper = c.size() - 1;
    const std::uint64_t seed = seed_of(DType::kF32, 7, 6);
    Tensor t = make(DType::kF32, seed, c.rank(), 7);
    c.barrier().wait();
    const auto start = Clock::now();
    if (c.rank() == sleeper) {
      // Arrives after everyone else has timed out; the collective then still completes, because
      // the others finalize (which gives late ranks one more timeout) instead of aborting.
      std::this_thread::sleep_until(start + kLate);
      EXPECT_NO_THROW(c.allreduce(t).wait());
      check_reduced("late allreduce", t.to_floats(), ReduceOp::kSum,
                    expect(DType::kF32, seed, c.size(), 0, 7), DType::kF32, c.size());
      return;
    }
    Work w = c.allreduce(t);
    try {
      if (c.rank() == 0) {
        while (!w.test()) std::this_thread::yield();  // test() enforces the deadline too
      } else {
        w.wait();
      }
      ADD_FAILURE() << "rank " << c.rank() << ": no CommTimeout";
    } catch (const CommTimeout& e) {
      const double waited = std::chrono::duration<double>(Clock::now() - start).count();
      EXPECT_GE(waited, kTimeout - 0.05);
      // The bound a job is held to: the timeout plus 10 s (the report's grace and liveness
      // check take under a second when every rank is alive).
      EXPECT_LT(waited, kTimeout + 10.0);
      const std::string msg = e.what();
      EXPECT_TRUE(contains(msg, "allreduce #2")) << msg;
      EXPECT_TRUE(contains(msg, "'" + c.name() + "'")) << msg;
      EXPECT_TRUE(contains(msg, fmt::format("never arrived [rank {}", sleeper))) << msg;
      // The sleeper is alive: a liveness check (MPI) must not call it lost.
      EXPECT_FALSE(contains(msg, "lost")) << msg;
    }
    // The group is unusable after a timeout; the error says why.
    try {
      c.barrier();
      ADD_FAILURE() << "a collective after a timeout was accepted";
    } catch (const CommTimeout& e) {
      EXPECT_TRUE(contains(e.what(), "unusable")) << e.what();
    }
  });
}

TEST_P(CommSuite, DebugModeReportsMismatchedCalls) {
  MT_SKIP_ON_REDUCTION_VARIANT();
  if (h().size() < 2) GTEST_SKIP() << "needs two ranks to disagree";
  CommOptions o = suite_options();
  o.debug = true;
  h().run(o, [&](Communicator& c) {
    const int odd = c.size() - 1;
    const bool is_odd = c.rank() == odd;
    const std::uint64_t seed = seed_of(DType::kF32, 7, 7);
    Tensor f = make(DType::kF32, seed, c.rank(), 7);
    Tensor b = make(DType::kBF16, seed, c.rank(), 7);
    Tensor big = make(DType::kF32, seed, c.rank(), 8);

    auto expect_mismatch = [&](const std::function<void()>& call, const std::string& odd_call) {
      try {
        call();
        ADD_FAILURE() << "rank " << c.rank() << ": mismatch not reported (" << odd_call << ")";
      } catch (const InvalidArgument& e) {
        const std::string msg = e.what();
        EXPECT_TRUE(contains(msg, "collective mismatch")) << msg;
        EXPECT_TRUE(contains(msg, fmt::format("rank {} called {}", odd, odd_call))) << msg;
      }
    };
    // Different dtype, different shape, different op: each reported on every rank.
    expect_mismatch([&] { (is_odd ? c.allreduce(b) : c.allreduce(f)).wait(); },
                    "allreduce #1 (sum, bf16[7])");
    expect_mismatch([&] { (is_odd ? c.allreduce(big) : c.allreduce(f)).wait(); },
                    "allreduce #2 (sum, fp32[8])");
    expect_mismatch([&] { (is_odd ? c.broadcast(f, 0) : c.allreduce(f, ReduceOp::kMax)).wait(); },
                    "broadcast #3");
    expect_mismatch([&] { (is_odd ? c.allreduce(f, ReduceOp::kMin) : c.allreduce(f)).wait(); },
                    "allreduce #4 (min");
    // Nothing was started, so the group is still usable and the inputs are untouched.
    EXPECT_EQ(f.to_floats(), values(DType::kF32, seed, c.rank(), 7));
    c.allreduce(f).wait();
    check_reduced("allreduce after mismatches", f.to_floats(), ReduceOp::kSum,
                  expect(DType::kF32, seed, c.size(), 0, 7), DType::kF32, c.size());
  });
}

TEST_P(CommSuite, BadArgumentsAreRejectedLocally) {
  MT_SKIP_ON_REDUCTION_VARIANT();
  h().run(suite_options(), [&](Communicator& c) {
    const int n = c.size();
    Tensor a = Tensor::zeros(Shape{7}, DType::kF32);
    Tensor b = Tensor::zeros(Shape{8}, DType::kF32);
    Tensor h16 = Tensor::zeros(Shape{7}, DType::kBF16);
    Tensor ints = Tensor::zeros(Shape{7}, DType::kI32);
    EXPECT_THROW(c.allreduce(a, b), InvalidArgument);
    EXPECT_THROW(c.allreduce(a, h16), InvalidArgument);
    EXPECT_THROW(c.allreduce(ints), InvalidArgument);
    EXPECT_THROW(c.allreduce(Tensor()), InvalidArgument);
    EXPECT_THROW(c.allreduce(a.slice(0, 4), a.slice(2, 4)), InvalidArgument);  // overlap
    EXPECT_THROW(c.reduce_scatter(Tensor::zeros(Shape{7 * n + 1}, DType::kF32), a),
                 InvalidArgument);
    EXPECT_THROW(c.all_gather(a, Tensor::zeros(Shape{7 * n + 1}, DType::kF32)), InvalidArgument);
    EXPECT_THROW(c.broadcast(a, n), InvalidArgument);
    EXPECT_THROW(c.broadcast(a, -1), InvalidArgument);
    // Nothing was posted: the numbering is unchanged and the group works.
    EXPECT_EQ(c.next_seq(), 1u);
    c.barrier().wait();
  });
}

TEST_P(CommSuite, DeviceTensorsAreStagedOrRejected) {
  h().run(suite_options(), [&](Communicator& c) {
    FakeDevice dev;
    const int n = c.size();
    const std::int64_t m = 1001;
    const std::uint64_t seed = seed_of(DType::kBF16, m, 8);
    if (!c.backend().accepts(dev)) {
      Tensor t = make(DType::kBF16, seed, c.rank(), m, dev);
      EXPECT_THROW(c.allreduce(t), InvalidArgument);
      return;
    }
    const Expected e = expect(DType::kBF16, seed, n, 0, m);
    Tensor t = make(DType::kBF16, seed, c.rank(), m, dev);
    c.allreduce(t).wait();
    check_reduced("staged allreduce in place", t.to_floats(), ReduceOp::kSum, e, DType::kBF16, n);
    Tensor in = make(DType::kBF16, seed, c.rank(), m, dev);
    Tensor out = Tensor::empty(Shape{m}, DType::kBF16, dev);
    c.allreduce(in, out, ReduceOp::kMax).wait();
    check_reduced("staged allreduce", out.to_floats(), ReduceOp::kMax, e, DType::kBF16, n);
    Tensor all = Tensor::empty(Shape{n * m}, DType::kBF16, dev);
    c.all_gather(in, all).wait();
    check_gathered("staged all_gather", all.to_floats(), DType::kBF16, seed, n, m);
    Tensor rs_in = make(DType::kBF16, seed, c.rank(), n * m, dev);
    Tensor rs_out = Tensor::empty(Shape{m}, DType::kBF16, dev);
    c.reduce_scatter(rs_in, rs_out, ReduceOp::kMin).wait();
    check_reduced("staged reduce_scatter", rs_out.to_floats(), ReduceOp::kMin,
                  expect(DType::kBF16, seed, n, c.rank() * m, m), DType::kBF16, n);
    Tensor bc = make(DType::kBF16, seed, c.rank(), m, dev);
    c.broadcast(bc, n - 1).wait();
    EXPECT_EQ(bc.to_floats(), values(DType::kBF16, seed, n - 1, m));
    c.wait_all();
  });
}

}  // namespace
}  // namespace meshtrain::comm::commtest
