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
#include "runtime/cpu/threads.hpp"
#include "runtime/ops.hpp"
#include "runtime/rng.hpp"

namespace meshtrain::parallel {
namespace {

constexpr int kSeq = 16;

struct RunResult {
  std::vector<float> losses;   // global mean loss per step
  std::vector<float> params;   // fp32 master weights at the end (rank 0)
  bool replicas_equal = true;  // every rank ended with rank 0's weights, bit for bit
};

std::vector<std::pair<std::int64_t, std::int64_t>> param_ranges(const models::GPT& m) {
  std::vector<std::pair<std::int64_t, std::int64_t>> r;
  for (const models::ParamInfo& p : m.params()) r.emplace_back(p.offset, p.shape.numel());
  return r;
}

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
  cpu::set_num_threads(1);
  RunResult result;
  std::mutex mu;
  std::vector<std::vector<float>> finals(n);
  comm::LoopbackWorld world(n);
  world.run([&](comm::Communicator& c) {
    const PrecisionPolicy policy = PrecisionPolicy::parse(precision);
    models::GPT model(models::GPTConfig::preset("gpt-tiny"), policy);
    model.init_weights(7);
    GradReducer reducer(c, model.flat_grads(), param_ranges(model), options);
    model.set_grads_ready_hook(
        [&](std::int64_t lo, std::int64_t hi) { reducer.grads_ready(lo, hi); });
    const std::int64_t np = model.num_parameters();
    Tensor m = Tensor::zeros(Shape{np}, DType::kF32), v = Tensor::zeros(Shape{np}, DType::kF32);
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
      ops::AdamWParams p;
      p.lr = 1e-3f;
      p.step = s + 1;
      Tensor param = policy.has_master_copy() ? model.flat_params() : Tensor();
      ops::adamw_update(param, model.flat_master(), model.flat_grads(), m, v, p);
    }
    const float* w = model.flat_master().data_as<float>();
    std::lock_guard<std::mutex> lock(mu);
    finals[c.rank()].assign(w, w + np);
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
    GradReducer r(c, model.flat_grads(), param_ranges(model), o);
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

TEST(GradReducer, BackwardReportsRangesThatTileTheBufferInDecreasingOrder) {
  cpu::set_num_threads(1);
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

INSTANTIATE_TEST_SUITE_P(Ranks, DataParallel, ::testing::Values(2, 3, 4),
                         [](const auto& info) { return "np" + std::to_string(info.param); });

}  // namespace
}  // namespace meshtrain::parallel
