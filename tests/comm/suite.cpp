// The conformance suite: every collective and dtype against an expectation computed here from
// the same random inputs, on every rank. Bodies run concurrently on every rank (threads or
// processes), so they use EXPECT (never ASSERT: a rank that returns early would leave the
// others waiting in a collective).

#include "tests/comm/suite.hpp"

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

using Clock = std::chrono::steady_clock;

constexpr DType kFloatTypes[] = {DType::kF32, DType::kBF16, DType::kF16};
// 65'537 also takes the two-rank exchange path of the MPI backend (64-512 KiB).
constexpr std::int64_t kCounts[] = {1, 7, 65'537, 1'000'003};
constexpr ReduceOp kOps[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin};

std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::uint64_t seed_of(DType d, std::int64_t n, int salt) {
  return mix(static_cast<std::uint64_t>(d) * 1000003u + static_cast<std::uint64_t>(n) * 31u +
             static_cast<std::uint64_t>(salt));
}

float round_to(DType d, float x) {
  switch (d) {
    case DType::kBF16:
      return bf16_to_float(float_to_bf16(x));
    case DType::kF16:
      return f16_to_float(float_to_f16(x));
    default:
      return x;
  }
}

// Rank `rank`'s element i for a given seed: uniform in [-1, 1), rounded to the dtype.
float value(DType d, std::uint64_t seed, int rank, std::int64_t i) {
  const std::uint64_t u =
      mix(seed ^ mix(static_cast<std::uint64_t>(rank) << 40 ^ static_cast<std::uint64_t>(i)));
  const float x = static_cast<float>(u >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
  return round_to(d, x);
}

std::vector<float> values(DType d, std::uint64_t seed, int rank, std::int64_t n) {
  std::vector<float> v(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) v[i] = value(d, seed, rank, i);
  return v;
}

Tensor make(DType d, std::uint64_t seed, int rank, std::int64_t n, Device& dev = cpu_device()) {
  return Tensor::from_floats(values(d, seed, rank, n), Shape{n}, d, dev);
}

// The reduction over ranks of elements [offset, offset + n), with what the tolerance needs.
struct Expected {
  std::vector<double> sum, abs;
  std::vector<float> max, min;
};

Expected expect(DType d, std::uint64_t seed, int size, std::int64_t offset, std::int64_t n) {
  Expected e;
  e.sum.assign(n, 0.0);
  e.abs.assign(n, 0.0);
  e.max.assign(n, -INFINITY);
  e.min.assign(n, INFINITY);
  for (int r = 0; r < size; ++r) {
    for (std::int64_t i = 0; i < n; ++i) {
      const float x = value(d, seed, r, offset + i);
      e.sum[i] += x;
      e.abs[i] += std::fabs(x);
      e.max[i] = std::max(e.max[i], x);
      e.min[i] = std::min(e.min[i], x);
    }
  }
  return e;
}

double unit_roundoff(DType d) {
  switch (d) {
    case DType::kBF16:
      return std::ldexp(1.0, -8);
    case DType::kF16:
      return std::ldexp(1.0, -11);
    default:
      return std::ldexp(1.0, -24);
  }
}

// Sums may round at every step of a tree or ring (MPI user ops on 16-bit data round each
// pairwise step), so the bound grows with the number of ranks.
void check_reduced(const std::string& what, const std::vector<float>& got, ReduceOp op,
                   const Expected& e, DType d, int size) {
  const double u = unit_roundoff(d);
  std::int64_t bad = 0;
  std::string first;
  for (std::size_t i = 0; i < got.size(); ++i) {
    bool ok = false;
    double want = 0;
    switch (op) {
      case ReduceOp::kMax:
        want = e.max[i];
        ok = got[i] == e.max[i];
        break;
      case ReduceOp::kMin:
        want = e.min[i];
        ok = got[i] == e.min[i];
        break;
      case ReduceOp::kSum:
      case ReduceOp::kAvg: {
        const double div = op == ReduceOp::kAvg ? size : 1;
        want = e.sum[i] / div;
        const double tol = ((size + 1) * u * e.abs[i] + u * std::fabs(e.sum[i])) / div + 1e-30;
        ok = std::fabs(got[i] - want) <= tol;
        break;
      }
    }
    if (!ok && bad++ == 0) first = fmt::format("element {}: got {}, want {}", i, got[i], want);
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size()
                    << " elements wrong; first: " << first;
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

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

// A device whose memory is host memory but which is not the CPU device, to exercise staging of
// non-host tensors through Device copies (what CUDA tensors take with the MPI backend).
class FakeDevice final : public Device {
 public:
  DeviceType type() const override { return DeviceType::kCUDA; }
  int index() const override { return 0; }
  std::string name() const override { return "fake:0"; }
  void* allocate(std::size_t nbytes) override { return std::malloc(nbytes == 0 ? 1 : nbytes); }
  void deallocate(void* p, std::size_t) noexcept override { std::free(p); }
  MemoryStats memory_stats() const override { return {}; }
  void reset_peak_memory() override {}
  void empty_cache() override {}
  void copy_from_host(void* dst, const void* src, std::size_t n) override { copy(dst, src, n); }
  void copy_to_host(void* dst, const void* src, std::size_t n) override { copy(dst, src, n); }
  void copy_within(void* dst, const void* src, std::size_t n) override { copy(dst, src, n); }
  void fill_zero(void* dst, std::size_t n) override { std::memset(dst, 0, n); }
  void synchronize() override {}
  meshtrain::Backend& backend() override { return cpu_device().backend(); }

 private:
  static void copy(void* dst, const void* src, std::size_t n) {
    if (n && dst != src) std::memmove(dst, src, n);
  }
};

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
