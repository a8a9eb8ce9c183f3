// The gradient reducer driving real GPT backward passes, with threads as ranks (loopback): in
// the fp32 policy, DP = N with micro-batch B matches one rank with batch N x B; gradient
// accumulation k x B matches batch k x B; the same seed gives bit-identical runs; bf16 agrees
// within its tolerance.

#include <algorithm>
#include <cmath>
#include <mutex>

#include <gtest/gtest.h>

#include "comm/loopback.hpp"
#include "models/gpt.hpp"
#include "parallel/grad_reducer.hpp"
#include "parallel/optimizer.hpp"
#include "runtime/ops.hpp"
#include "runtime/rng.hpp"
#include "runtime/threads.hpp"

namespace meshtrain::parallel {
namespace {

constexpr int kSeq = 16;

struct RunResult {
  std::vector<float> losses;   // global mean loss per step
  std::vector<float> params;   // fp32 master weights at the end (rank 0)
  bool replicas_equal = true;  // every rank ended with rank 0's weights, bit for bit
};

// Row g of step s's global batch: kSeq + 1 tokens drawn from (seed, step).
std::vector<std::int32_t> row(int step, int g) {
  Philox rng(1234, static_cast<std::uint64_t>(step));
  std::vector<std::int32_t> t(kSeq + 1);
  for (int i = 0; i < kSeq + 1; ++i)
    t[i] = static_cast<std::int32_t>(rng.uniform(static_cast<std::uint64_t>(g * (kSeq + 1) + i)) *
                                     256) %
           256;
  return t;
}

// n ranks, micro-batch b, k micro-steps: the global batch is n x k x b rows per step. Rank r's
// micro-step m takes rows [(m n + r) b, (m n + r + 1) b).
RunResult train(int n, int k, int b, int steps, const std::string& precision,
                ReducerOptions options = {}) {
  set_cpu_threads(1);
  RunResult result;
  std::mutex mu;
  std::vector<std::vector<float>> finals(n);
  comm::LoopbackWorld world(n);
  world.run([&](comm::Communicator& c) {
    const PrecisionPolicy policy = PrecisionPolicy::parse(precision);
    models::GPT model(models::GPTConfig::preset("gpt-tiny"), policy);
    GradReducer reducer(c, model.flat_grads(), model.params(), options);
    model.set_grads_ready_hook(
        [&](std::int64_t lo, std::int64_t hi) { reducer.grads_ready(lo, hi); });
    Mesh single;  // the optimizer is not sharded: it updates the averaged gradients everywhere
    DistributedAdamW opt(model.params(), model.flat_params(), model.flat_grads(),
                         model.initial_weights(7), AdamWOptions{}, single);
    std::vector<std::int32_t> in(static_cast<std::size_t>(b) * kSeq), tg(in.size());
    for (int s = 0; s < steps; ++s) {
      model.zero_grads();
      double loss = 0;
      for (int micro = 0; micro < k; ++micro) {
        for (int i = 0; i < b; ++i) {
          const std::vector<std::int32_t> t = row(s, (micro * n + c.rank()) * b + i);
          std::copy(t.begin(), t.end() - 1, in.begin() + i * kSeq);
          std::copy(t.begin() + 1, t.end(), tg.begin() + i * kSeq);
        }
        reducer.begin_step(micro == k - 1);
        loss += model.forward(Tensor::from_ints(in, Shape{b, kSeq}),
                              Tensor::from_ints(tg, Shape{b, kSeq}));
        model.backward(1.0f / static_cast<float>(k));
      }
      reducer.finish();
      Tensor l = Tensor::from_floats({static_cast<float>(loss / k)}, Shape{1}, DType::kF32);
      c.allreduce(l, comm::ReduceOp::kAvg).wait();
      if (c.rank() == 0) result.losses.push_back(l.data_as<float>()[0]);
      opt.step(1e-3, s + 1, 0.0, 1.0f);
    }
    const std::vector<float> w = opt.master().to_floats();
    std::lock_guard<std::mutex> lock(mu);
    finals[c.rank()] = w;
  });
  result.params = finals[0];
  for (int r = 1; r < n; ++r) result.replicas_equal &= finals[r] == finals[0];
  return result;
}

float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  float d = 0;
  for (std::size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}

void expect_close(const RunResult& got, const RunResult& want, float loss_tol, float param_tol) {
  EXPECT_TRUE(got.replicas_equal) << "the ranks' replicas diverged";
  ASSERT_EQ(got.losses.size(), want.losses.size());
  for (std::size_t s = 0; s < got.losses.size(); ++s)
    EXPECT_NEAR(got.losses[s], want.losses[s], loss_tol * std::abs(want.losses[s])) << "step " << s;
  EXPECT_LE(max_abs_diff(got.params, want.params), param_tol);
}

TEST(GradReducer, BucketsTileTheBufferInReverseOrder) {
  comm::LoopbackWorld world(1);
  world.run([&](comm::Communicator& c) {
    models::GPT model(models::GPTConfig::preset("gpt-tiny"), PrecisionPolicy::parse("fp32"));
    ReducerOptions o;
    o.first_bucket_bytes = 1024;
    o.bucket_bytes = 64 * 1024;
    GradReducer r(c, model.flat_grads(), model.params(), o);
    ASSERT_GE(r.buckets().size(), 3u);
    std::int64_t hi = model.num_parameters();
    for (const auto& [lo, h] : r.buckets()) {
      EXPECT_EQ(h, hi);
      EXPECT_LT(lo, h);
      hi = lo;
    }
    EXPECT_EQ(hi, 0);
    // The first bucket is small: the final LayerNorm and the last bias.
    EXPECT_LE(r.buckets()[0].second - r.buckets()[0].first, 1024 / 4);
  });
}

TEST(GradReducer, AutomaticBucketSizeIsAnEighthOfTheGradientsWithinOneTo25MiB) {
  EXPECT_EQ(auto_bucket_bytes(0), 1LL << 20);
  EXPECT_EQ(auto_bucket_bytes(4LL << 20), 1LL << 20);   // tiny models: 1 MiB
  EXPECT_EQ(auto_bucket_bytes(43'000'000), 5'375'000);  // gpt-small: eight buckets
  EXPECT_EQ(auto_bucket_bytes(200LL << 20), 25LL << 20);
  EXPECT_EQ(auto_bucket_bytes(500'000'000), 25LL << 20);  // GPT-2 124M: DDP's 25 MiB
}

TEST(GradReducer, BackwardReportsRangesThatTileTheBufferInDecreasingOrder) {
  set_cpu_threads(1);
  models::GPT model(models::GPTConfig::preset("gpt-tiny"), PrecisionPolicy::parse("fp32"));
  model.init_weights(1);
  std::vector<std::pair<std::int64_t, std::int64_t>> seen;
  model.set_grads_ready_hook([&](std::int64_t lo, std::int64_t hi) { seen.emplace_back(lo, hi); });
  const std::vector<std::int32_t> t = row(0, 0);
  model.forward(Tensor::from_ints({t.begin(), t.end() - 1}, Shape{1, kSeq}),
                Tensor::from_ints({t.begin() + 1, t.end()}, Shape{1, kSeq}));
  model.backward();
  ASSERT_EQ(seen.size(), 1u + 2u * 6u + 1u);  // ln_f, six pairs per layer, embeddings
  std::int64_t hi = model.num_parameters();
  for (const auto& [lo, h] : seen) {
    EXPECT_EQ(h, hi);
    hi = lo;
  }
  EXPECT_EQ(hi, 0);
}

class DataParallel : public ::testing::TestWithParam<int> {};

TEST_P(DataParallel, Fp32MatchesOneRankWithTheGlobalBatch) {
  const int n = GetParam();
  ReducerOptions small;  // several buckets, so that overlap happens during backward
  small.first_bucket_bytes = 4096;
  small.bucket_bytes = 64 * 1024;
  const RunResult one = train(1, 1, 2 * n, 6, "fp32");
  const RunResult dp = train(n, 1, 2, 6, "fp32", small);
  // Adam divides by sqrt(v): an element whose gradient is near zero moves by up to lr in
  // either direction, so a gradient's float32 rounding shows in the weights as a fraction of
  // one step's update (lr = 1e-3), not as rounding of the weights themselves.
  expect_close(dp, one, 2e-6f, 1e-4f);
}

TEST_P(DataParallel, AccumulationMatchesTheGlobalBatch) {
  const int n = GetParam();
  const RunResult one = train(1, 1, 3 * n, 4, "fp32");
  const RunResult acc = train(n, 3, 1, 4, "fp32");
  expect_close(acc, one, 2e-6f, 1e-4f);
}

TEST_P(DataParallel, SameSeedIsBitIdenticalAndOverlapDoesNotChangeResults) {
  const int n = GetParam();
  ReducerOptions off;
  off.overlap = false;
  const RunResult a = train(n, 2, 1, 3, "fp32");
  const RunResult b = train(n, 2, 1, 3, "fp32");
  const RunResult c = train(n, 2, 1, 3, "fp32", off);
  EXPECT_EQ(a.losses, b.losses);
  EXPECT_EQ(a.params, b.params);
  EXPECT_EQ(a.losses, c.losses);
  EXPECT_EQ(a.params, c.params);
}

TEST_P(DataParallel, Bf16AgreesWithinTolerance) {
  const int n = GetParam();
  const RunResult one = train(1, 1, 2 * n, 4, "bf16");
  const RunResult dp = train(n, 1, 2, 4, "bf16");
  expect_close(dp, one, 1e-2f, 2e-2f);
}

// bf16 reduction rounds every averaged gradient to bf16 (8 bits of mantissa): the run follows
// the fp32 reduction closely, but not bit for bit (the option really changes the wire).
TEST_P(DataParallel, Bf16ReductionAgreesWithFp32Reduction) {
  const int n = GetParam();
  ReducerOptions bf16;
  bf16.reduce_dtype = DType::kBF16;
  bf16.first_bucket_bytes = 4096;
  bf16.bucket_bytes = 64 * 1024;
  const RunResult fp32 = train(n, 1, 2, 6, "fp32");
  const RunResult low = train(n, 1, 2, 6, "fp32", bf16);
  expect_close(low, fp32, 2e-3f, 3e-3f);
  EXPECT_NE(low.params, fp32.params);
}

// ZeRO-1's layout: the ranks' runs tile the buffer exactly once, every bucket but the first
// splits into dp equal chunks, and a shard is about 1/dp of the buffer.
TEST_P(DataParallel, ShardRunsTileTheBufferOnce) {
  const int n = GetParam();
  models::GPT model(models::GPTConfig::preset("gpt-tiny"), PrecisionPolicy::parse("fp32"));
  const std::int64_t np = model.num_parameters();
  std::vector<int> owner(static_cast<std::size_t>(np), -1);
  std::vector<std::int64_t> shard_sizes(n);
  std::mutex mu;
  comm::LoopbackWorld world(n);
  world.run([&](comm::Communicator& c) {
    ReducerOptions o;
    o.shard = true;
    o.first_bucket_bytes = 1000;  // not a multiple of anything
    o.bucket_bytes = 40 * 1024;
    Tensor grads = Tensor::zeros(Shape{np}, DType::kF32);
    GradReducer r(c, grads, model.params(), o);
    std::lock_guard<std::mutex> lock(mu);
    shard_sizes[c.rank()] = r.shard_numel();
    std::int64_t next_shard = 0;
    for (const FlatRun& p : r.shard_runs()) {
      EXPECT_GE(p.local, next_shard);
      next_shard = p.local + p.length;
      for (std::int64_t i = p.flat; i < p.flat + p.length; ++i) {
        EXPECT_EQ(owner[i], -1) << "element " << i << " owned twice";
        owner[i] = c.rank();
      }
    }
    EXPECT_LE(next_shard, r.shard_numel());
    for (std::size_t b = 1; b < r.buckets().size(); ++b)
      EXPECT_EQ((r.buckets()[b].second - r.buckets()[b].first) % n, 0) << "bucket " << b;
    EXPECT_GE(r.buckets().size(), 3u);
  });
  EXPECT_EQ(std::count(owner.begin(), owner.end(), -1), 0) << "elements nobody owns";
  for (int r = 0; r < n; ++r) {
    EXPECT_EQ(shard_sizes[r], shard_sizes[0]);
    EXPECT_LE(shard_sizes[r], (np + n - 1) / n + 1);  // one padded bucket
  }
}

// Reduce-scatter into the shard gives the same average as an allreduce would, for fp32 and bf16
// wires; all_gather_shards rebuilds a whole buffer from the shards, in fp32 and in bf16.
TEST_P(DataParallel, ShardedReductionAndGatherMatchTheWholeBuffer) {
  const int n = GetParam();
  models::GPT model(models::GPTConfig::preset("gpt-tiny"), PrecisionPolicy::parse("fp32"));
  const std::int64_t np = model.num_parameters();
  auto value = [](int rank, std::int64_t i) {
    return std::sin(0.001f * static_cast<float>(i) + static_cast<float>(rank)) * 3.0f;
  };
  for (DType wire : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(dtype_name(wire));
    comm::LoopbackWorld world(n);
    world.run([&](comm::Communicator& c) {
      ReducerOptions o;
      o.shard = true;
      o.reduce_dtype = wire;
      o.first_bucket_bytes = 1000;
      o.bucket_bytes = 40 * 1024;
      Tensor grads = Tensor::zeros(Shape{np}, DType::kF32);
      float* g = grads.data_as<float>();
      for (std::int64_t i = 0; i < np; ++i) g[i] = value(c.rank(), i);
      GradReducer r(c, grads, model.params(), o);
      r.begin_step(true);
      r.grads_ready(0, np);
      r.finish();
      const float* sg = r.shard_grads().data_as<float>();
      float worst = 0;
      for (const FlatRun& p : r.shard_runs()) {
        for (std::int64_t k = 0; k < p.length; ++k) {
          double mean = 0;
          for (int q = 0; q < n; ++q) mean += value(q, p.flat + k);
          mean /= n;
          worst = std::max(worst, static_cast<float>(std::abs(sg[p.local + k] - mean)));
        }
      }
      EXPECT_LE(worst, wire == DType::kF32 ? 1e-6f : 3.0f / 128);
      // Gather: shard element = f(its flat index) on its owner.
      for (DType d : {DType::kF32, DType::kBF16}) {
        Tensor shard = Tensor::zeros(Shape{r.shard_numel()}, DType::kF32);
        for (const FlatRun& p : r.shard_runs())
          for (std::int64_t k = 0; k < p.length; ++k)
            shard.data_as<float>()[p.local + k] = static_cast<float>(p.flat + k);
        Tensor flat = Tensor::zeros(Shape{np}, d);
        r.all_gather_shards(shard.to(d), flat);
        const std::vector<float> got = flat.to_floats();
        const std::vector<float> want = Tensor::from_floats(
                                            [&] {
                                              std::vector<float> w(static_cast<std::size_t>(np));
                                              for (std::int64_t i = 0; i < np; ++i)
                                                w[i] = static_cast<float>(i);
                                              return w;
                                            }(),
                                            Shape{np}, DType::kF32)
                                            .to(d)
                                            .to_floats();
        EXPECT_EQ(got, want) << dtype_name(d);
      }
    });
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, DataParallel, ::testing::Values(1, 2, 3, 4),
                         [](const auto& info) { return "np" + std::to_string(info.param); });

}  // namespace
}  // namespace meshtrain::parallel
