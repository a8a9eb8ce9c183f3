// The Llama family under sequence parallelism, with threads as ranks (loopback): in the fp32
// policy, a Llama trained with TPGroup's sequence-parallel flag gives the losses, gradient norms
// and weights (every rank's master shard) of the same TP layout without it, at TP 2 (shards of
// whole sequences), TP 4 (fewer KV heads than ranks, so replicated KV heads; shards cut
// mid-sequence), DP 2 x TP 2 with accumulated micro-batches, Qwen2's q/k/v biases with a tied
// head, and Llama's attention_bias (o_proj's bias); bf16 agrees within tolerance; replicated
// parameters (the RMSNorm weights, o_proj's bias) stay bit-identical across TP ranks; the
// activation bytes shrink by what estimate_memory plans.

#include <algorithm>
#include <cmath>
#include <mutex>

#include <gtest/gtest.h>

#include "comm/loopback.hpp"
#include "models/llama.hpp"
#include "parallel/grad_reducer.hpp"
#include "parallel/mesh.hpp"
#include "parallel/optimizer.hpp"
#include "parallel/tensor_parallel.hpp"
#include "runtime/threads.hpp"
#include "tests/parallel/train_steps.hpp"

namespace meshtrain::parallel {
namespace {

using tptest::kSeq;

// llama-tiny: 2 layers, width 64, 4 heads, 2 KV heads, F = 160, the 256-symbol vocabulary.
models::LlamaConfig config(const std::string& variant) {
  models::LlamaConfig c = models::LlamaConfig::preset("llama-tiny");
  if (variant == "qwen2") {
    c.arch = "qwen2";
    c.qkv_bias = true;
    c.tie_word_embeddings = true;
  } else if (variant == "attention-bias") {
    c.qkv_bias = true;
    c.o_bias = true;
  }
  return c;
}

struct LlamaRun {
  std::vector<float> losses, norms;
  std::vector<std::vector<float>> masters;  // every world rank's fp32 master weights
  bool replicated_equal = true;             // replicated parameters identical on every TP rank
  std::int64_t activation_bytes = 0;        // world rank 0's, after the last step
};

struct Options {
  bool sequence_parallel = false;
  int micro = 1;  // micro-batches per step (gradient accumulation), each of b / micro rows
};

// dp x tp ranks, `b` rows per DP rank and step; AdamW with clipping at 1.
LlamaRun train(const std::string& variant, int dp, int tp, int b, int steps,
               const std::string& precision, Options ro = {}) {
  set_cpu_threads(1);
  LlamaRun result;
  std::mutex mu;
  result.masters.resize(static_cast<std::size_t>(dp * tp));
  std::vector<std::vector<float>> replicated(static_cast<std::size_t>(dp * tp));
  comm::LoopbackWorld world(dp * tp);
  world.run([&](comm::Communicator& c) {
    Mesh mesh(c, tp);
    const PrecisionPolicy policy = PrecisionPolicy::parse(precision);
    models::Llama model(config(variant), policy, cpu_device(),
                        TPGroup(mesh.tp(), ro.sequence_parallel));
    std::unique_ptr<GradReducer> reducer;
    if (dp > 1) {
      ReducerOptions o;
      o.first_bucket_bytes = 4096;
      o.bucket_bytes = 32 * 1024;
      reducer = std::make_unique<GradReducer>(mesh.dp(), model.flat_grads(), model.params(), o);
      model.set_grads_ready_hook(
          [&](std::int64_t lo, std::int64_t hi) { reducer->grads_ready(lo, hi); });
    }
    AdamWOptions o;
    o.weight_decay = 0.1;
    o.grad_clip = 1.0;
    DistributedAdamW opt(model.params(), model.flat_params(), model.flat_grads(),
                         model.initial_weights(5), o, mesh);
    tptest::train_steps(model, opt, reducer.get(), mesh, 8765, steps, b, ro.micro, c.rank() == 0,
                        result.losses, result.norms);
    std::vector<float> rep;
    for (const models::ParamInfo& p : model.params()) {
      if (p.shard_dim >= 0) continue;
      const std::vector<float> v = slot_view(opt.master(), p).to_floats();
      rep.insert(rep.end(), v.begin(), v.end());
    }
    std::lock_guard<std::mutex> lock(mu);
    result.masters[static_cast<std::size_t>(c.rank())] = opt.master().to_floats();
    replicated[static_cast<std::size_t>(c.rank())] = rep;
    if (c.rank() == 0) result.activation_bytes = model.activation_bytes();
  });
  for (const std::vector<float>& r : replicated) result.replicated_equal &= r == replicated[0];
  return result;
}

// As test_gpt_tp.cpp's: float32 rounding of another summation order (each RMSNorm's weight
// gradient summed from K shards' partial sums, reduce-scatters for allreduces) in the losses;
// in the weights, Adam turns a gradient's rounding into up to a fraction of one step's update
// (lr = 1e-3) for elements whose gradient is near zero.
constexpr float kLossTol = 2e-6f, kParamTol = 1e-4f;

void expect_close(const LlamaRun& got, const LlamaRun& want, float loss_tol, float param_tol) {
  EXPECT_TRUE(got.replicated_equal) << "replicated parameters differ across TP ranks";
  ASSERT_EQ(got.losses.size(), want.losses.size());
  for (std::size_t s = 0; s < got.losses.size(); ++s) {
    EXPECT_NEAR(got.losses[s], want.losses[s], loss_tol * std::abs(want.losses[s])) << "step " << s;
    EXPECT_NEAR(got.norms[s], want.norms[s], 10 * loss_tol * std::abs(want.norms[s]))
        << "step " << s;
  }
  ASSERT_EQ(got.masters.size(), want.masters.size());
  for (std::size_t r = 0; r < got.masters.size(); ++r) {
    ASSERT_EQ(got.masters[r].size(), want.masters[r].size()) << "rank " << r;
    float worst = 0;
    for (std::size_t j = 0; j < got.masters[r].size(); ++j)
      worst = std::max(worst, std::abs(got.masters[r][j] - want.masters[r][j]));
    EXPECT_LE(worst, param_tol) << "rank " << r;
  }
}

TEST(LlamaSequenceParallel, Tp2MatchesSpOffAndShrinksActivationsAsPlanned) {
  // B = 4, K = 2: each rank's shard is two whole sequences.
  const LlamaRun off = train("llama", 1, 2, 4, 16, "fp32");
  const LlamaRun on = train("llama", 1, 2, 4, 16, "fp32", {.sequence_parallel = true});
  expect_close(on, off, kLossTol, kParamTol);
  // The plan counts what the model allocates but for the rope table, which is the same in both:
  // the saving measured is the saving planned.
  const PrecisionPolicy fp32 = PrecisionPolicy::parse("fp32");
  const models::LlamaConfig c = config("llama");
  const std::int64_t plan_off = estimate_memory(c, fp32, 4, kSeq, 2).activations;
  const std::int64_t plan_on = estimate_memory(c, fp32, 4, kSeq, 2, 1, false, true).activations;
  EXPECT_LT(on.activation_bytes, off.activation_bytes);
  EXPECT_EQ(off.activation_bytes - on.activation_bytes, plan_off - plan_on);
}

TEST(LlamaSequenceParallel, Tp4ReplicatedKvHeadsMatchSpOff) {
  // 2 KV heads over 4 ranks, each held by two; B = 2, T = 16: each shard is 8 positions of one
  // sequence, so rotary positions are right only if rope runs on the gathered tokens.
  const LlamaRun off = train("llama", 1, 4, 2, 12, "fp32");
  expect_close(train("llama", 1, 4, 2, 12, "fp32", {.sequence_parallel = true}), off, kLossTol,
               kParamTol);
}

TEST(LlamaSequenceParallel, Dp2Tp2WithAccumulationMatchesSpOff) {
  // Two micro-batches of one sequence per DP rank: each shard is half a sequence, and the
  // RMSNorm gradients of the second micro-batch join the first's without summing them twice.
  const LlamaRun off = train("llama", 2, 2, 2, 10, "fp32", {.micro = 2});
  expect_close(train("llama", 2, 2, 2, 10, "fp32", {.sequence_parallel = true, .micro = 2}), off,
               kLossTol, kParamTol);
}

TEST(LlamaSequenceParallel, Qwen2QkvBiasTiedHeadAtTp4MatchesSpOff) {
  // The q/k/v biases' gradients of replicated KV heads summed over their sub-group, the tied
  // head's gradient from the gathered final norm.
  const LlamaRun off = train("qwen2", 1, 4, 2, 10, "fp32");
  expect_close(train("qwen2", 1, 4, 2, 10, "fp32", {.sequence_parallel = true}), off, kLossTol,
               kParamTol);
}

TEST(LlamaSequenceParallel, OProjBiasMatchesSpOff) {
  // o_proj's bias is added before the reduce-scatter (by TP rank 0) and its gradient taken from
  // the all-gathered output gradient: no further sum.
  const LlamaRun off = train("attention-bias", 1, 2, 4, 10, "fp32");
  expect_close(train("attention-bias", 1, 2, 4, 10, "fp32", {.sequence_parallel = true}), off,
               kLossTol, kParamTol);
}

TEST(LlamaSequenceParallel, Bf16AgreesWithinTolerance) {
  const LlamaRun off = train("llama", 1, 2, 4, 6, "bf16");
  expect_close(train("llama", 1, 2, 4, 6, "bf16", {.sequence_parallel = true}), off, 1e-2f, 2e-2f);
}

TEST(LlamaSequenceParallel, RefusesTokensThatDoNotSplitAndPipelineStages) {
  set_cpu_threads(1);
  comm::LoopbackWorld world(2);
  std::vector<std::string> errors(2), stage_errors(2);
  world.run([&](comm::Communicator& c) {
    const models::LlamaConfig cfg = config("llama");
    const PrecisionPolicy fp32 = PrecisionPolicy::parse("fp32");
    try {
      models::Llama stage(cfg, fp32, cpu_device(), TPGroup(c, true), models::LlamaStage{0, 1});
    } catch (const InvalidArgument& e) {
      stage_errors[static_cast<std::size_t>(c.rank())] = e.what();
    }
    models::Llama model(cfg, fp32, cpu_device(), TPGroup(c, true));
    model.init_weights(1);
    try {
      // B x T = 1 x 3 tokens cannot be cut into 2 equal shards.
      model.forward(Tensor::from_ints({1, 2, 3}, Shape{1, 3}),
                    Tensor::from_ints({2, 3, 4}, Shape{1, 3}));
    } catch (const InvalidArgument& e) {
      errors[static_cast<std::size_t>(c.rank())] = e.what();
    }
  });
  for (const std::string& e : errors) {
    EXPECT_NE(e.find("the 3 tokens of a micro-batch"), std::string::npos) << e;
    EXPECT_NE(e.find("2 equal shards"), std::string::npos) << e;
  }
  for (const std::string& e : stage_errors)
    EXPECT_NE(e.find("Llama stage [0, 1): sequence parallelism"), std::string::npos) << e;
}

}  // namespace
}  // namespace meshtrain::parallel
