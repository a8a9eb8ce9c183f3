// The GPT under tensor parallelism (and DP x TP), with threads as ranks (loopback): in the fp32
// policy, TP = 2, 3 (a 6-head model), 4 and DP = 2 x TP = 2 train for 20 steps to the same
// losses, gradient norms and (gathered) weights as one rank with the global batch; replicated
// parameters stay bit-identical across TP ranks; bf16 agrees within tolerance; decoding gives
// the same logits; a model that cannot be split is refused. Sequence parallelism (TPGroup's
// flag) trains to the same losses and weights as the same TP layout without it, with shards of
// whole sequences and of parts of one, over accumulated micro-batches, and holds less
// activation memory.

#include <algorithm>
#include <cmath>
#include <mutex>

#include <gtest/gtest.h>

#include "comm/loopback.hpp"
#include "models/gpt.hpp"
#include "parallel/grad_reducer.hpp"
#include "parallel/mesh.hpp"
#include "parallel/optimizer.hpp"
#include "parallel/tensor_parallel.hpp"
#include "runtime/ops.hpp"
#include "runtime/rng.hpp"
#include "runtime/threads.hpp"
#include "tests/parallel/train_steps.hpp"

namespace meshtrain::parallel {
namespace {

using tptest::kSeq;

models::GPTConfig config(const std::string& name, int tp) {
  models::GPTConfig c;
  if (name == "six-heads") {
    c.n_layer = 2;
    c.n_head = 6;
    c.n_embd = 96;
    c.block_size = 32;
  } else {
    c = models::GPTConfig::preset(name);
  }
  c.padded_vocab = models::GPTConfig::pad_vocab(c.vocab_size, 128 * tp);
  return c;
}

struct TpRun {
  std::vector<float> losses, norms;
  // Full parameters (wte cut to the real vocabulary), gathered over TP, from world rank 0.
  std::vector<std::vector<float>> params;
  bool replicated_equal = true;       // replicated parameters bit-identical on every TP rank
  bool dp_equal = true;               // every DP replica holds the same shard as DP rank 0
  std::int64_t activation_bytes = 0;  // world rank 0's, after the last step
};

struct RunOptions {
  double max_norm = 1.0;
  bool sequence_parallel = false;
  int micro = 1;  // micro-batches per step (gradient accumulation), each of b / micro rows
};

// dp x tp ranks, `b` rows per DP rank and step; AdamW with clipping at max_norm.
TpRun train(const std::string& model, int dp, int tp, int b, int steps,
            const std::string& precision, RunOptions ro = {}) {
  set_cpu_threads(1);
  TpRun result;
  std::mutex mu;
  std::vector<std::vector<float>> replicated(static_cast<std::size_t>(dp * tp));
  std::vector<std::vector<float>> shards(static_cast<std::size_t>(dp * tp));
  comm::LoopbackWorld world(dp * tp);
  world.run([&](comm::Communicator& c) {
    Mesh mesh(c, tp);
    const PrecisionPolicy policy = PrecisionPolicy::parse(precision);
    const models::GPTConfig cfg = config(model, tp);
    models::GPT gpt(cfg, policy, cpu_device(), TPGroup(mesh.tp(), ro.sequence_parallel));
    std::unique_ptr<GradReducer> reducer;
    if (dp > 1) {
      ReducerOptions o;
      o.first_bucket_bytes = 4096;
      o.bucket_bytes = 32 * 1024;
      reducer = std::make_unique<GradReducer>(mesh.dp(), gpt.flat_grads(), gpt.params(), o);
      gpt.set_grads_ready_hook(
          [&](std::int64_t lo, std::int64_t hi) { reducer->grads_ready(lo, hi); });
    }
    AdamWOptions o;
    o.weight_decay = 0.1;
    o.grad_clip = ro.max_norm;
    DistributedAdamW opt(gpt.params(), gpt.flat_params(), gpt.flat_grads(), gpt.initial_weights(11),
                         o, mesh);
    tptest::train_steps(gpt, opt, reducer.get(), mesh, 4321, steps, b, ro.micro, c.rank() == 0,
                        result.losses, result.norms);
    // Gather the full model on every TP group; world rank 0 reports it.
    std::vector<std::vector<float>> full;
    std::vector<float> rep, own;
    for (const models::ParamInfo& p : gpt.params()) {
      const Tensor master = slot_view(opt.master(), p);
      Tensor t = gather_full(master, p.full_shape, p.shard_dim, p.shard_parts, TPGroup(mesh.tp()));
      if (p.name == "wte.weight") t = t.slice(0, cfg.vocab_size);
      full.push_back(t.to_floats());
      const std::vector<float> mine = master.to_floats();
      (p.shard_dim < 0 ? rep : own)
          .insert((p.shard_dim < 0 ? rep : own).end(), mine.begin(), mine.end());
    }
    std::lock_guard<std::mutex> lock(mu);
    if (c.rank() == 0) {
      result.params = full;
      result.activation_bytes = gpt.activation_bytes();
    }
    replicated[static_cast<std::size_t>(c.rank())] = rep;
    shards[static_cast<std::size_t>(c.rank())] = own;
  });
  for (int r = 0; r < dp * tp; ++r) {
    result.replicated_equal &= replicated[static_cast<std::size_t>(r)] == replicated[0];
    result.dp_equal &=
        shards[static_cast<std::size_t>(r)] == shards[static_cast<std::size_t>(r % tp)];
  }
  return result;
}

void expect_close(const TpRun& got, const TpRun& want, float loss_tol, float param_tol) {
  EXPECT_TRUE(got.replicated_equal) << "replicated parameters differ across TP ranks";
  EXPECT_TRUE(got.dp_equal) << "DP replicas diverged";
  ASSERT_EQ(got.losses.size(), want.losses.size());
  for (std::size_t s = 0; s < got.losses.size(); ++s) {
    EXPECT_NEAR(got.losses[s], want.losses[s], loss_tol * std::abs(want.losses[s])) << "step " << s;
    EXPECT_NEAR(got.norms[s], want.norms[s], 10 * loss_tol * std::abs(want.norms[s]))
        << "step " << s;
  }
  ASSERT_EQ(got.params.size(), want.params.size());
  float worst = 0;
  std::size_t worst_at = 0;
  for (std::size_t i = 0; i < got.params.size(); ++i) {
    ASSERT_EQ(got.params[i].size(), want.params[i].size()) << "parameter " << i;
    for (std::size_t j = 0; j < got.params[i].size(); ++j) {
      const float d = std::abs(got.params[i][j] - want.params[i][j]);
      if (!(d <= worst)) {
        worst = d;
        worst_at = i;
      }
    }
  }
  EXPECT_LE(worst, param_tol) << "parameter " << worst_at;
}

// The fp32 reference: float32 rounding of a different summation order (row-parallel partial
// sums, the split softmax) in the losses; in the weights, Adam turns a gradient's rounding into
// up to a fraction of one step's update (lr = 1e-3) for elements whose gradient is near zero.
constexpr float kLossTol = 2e-6f, kParamTol = 1e-4f;

TEST(GPTTensorParallel, Tp2MatchesOneRankFor20Steps) {
  const TpRun one = train("gpt-tiny", 1, 1, 4, 20, "fp32");
  expect_close(train("gpt-tiny", 1, 2, 4, 20, "fp32"), one, kLossTol, kParamTol);
}

TEST(GPTTensorParallel, Tp4MatchesOneRankFor20Steps) {
  // One head per rank; the vocabulary (256) is padded to 512, so ranks 2 and 3 hold padding only.
  const TpRun one = train("gpt-tiny", 1, 1, 4, 20, "fp32");
  expect_close(train("gpt-tiny", 1, 4, 4, 20, "fp32"), one, kLossTol, kParamTol);
}

TEST(GPTTensorParallel, Dp2Tp2MatchesOneRankFor20Steps) {
  const TpRun one = train("gpt-tiny", 1, 1, 4, 20, "fp32");
  expect_close(train("gpt-tiny", 2, 2, 2, 20, "fp32"), one, kLossTol, kParamTol);
}

TEST(GPTTensorParallel, Tp3OnASixHeadModelMatchesOneRank) {
  const TpRun one = train("six-heads", 1, 1, 3, 20, "fp32");
  expect_close(train("six-heads", 1, 3, 3, 20, "fp32"), one, kLossTol, kParamTol);
}

TEST(GPTTensorParallel, ClippingCountsEveryElementOnce) {
  // A small max_norm clips every step: the global norm must be the TP = 1 norm exactly.
  const TpRun one = train("gpt-tiny", 1, 1, 2, 6, "fp32", {.max_norm = 0.05});
  expect_close(train("gpt-tiny", 1, 2, 2, 6, "fp32", {.max_norm = 0.05}), one, kLossTol, kParamTol);
}

TEST(GPTTensorParallel, Bf16AgreesWithinTolerance) {
  const TpRun one = train("gpt-tiny", 1, 1, 4, 6, "bf16");
  const TpRun tp = train("gpt-tiny", 1, 2, 4, 6, "bf16");
  expect_close(tp, one, 1e-2f, 2e-2f);
}

// Sequence parallelism against the same layout without it: the LayerNorms' weight gradients
// are summed from K partial sums over the token shards, the row-parallel sums come from a
// reduce-scatter instead of an allreduce (another summation order at K > 2): float32 rounding,
// the same tolerances as TP against one rank. Replicated parameters (LayerNorms summed by an
// allreduce, biases and wpe from all-gathered gradients) must stay bit-identical across ranks.
TEST(GPTSequenceParallel, Tp2MatchesSpOffFor20Steps) {
  // B = 4, K = 2: each rank's shard is two whole sequences.
  const TpRun off = train("gpt-tiny", 1, 2, 4, 20, "fp32");
  const TpRun on = train("gpt-tiny", 1, 2, 4, 20, "fp32", {.sequence_parallel = true});
  expect_close(on, off, kLossTol, kParamTol);
  expect_close(on, train("gpt-tiny", 1, 1, 4, 20, "fp32"), kLossTol, kParamTol);
  // Per layer 4 of the [B, T, C] activations (residual, ln1, residual2, ln2) and the norm
  // statistics are halved; two [B, T, C] workspaces are added once.
  EXPECT_LT(on.activation_bytes, off.activation_bytes);
}

TEST(GPTSequenceParallel, Tp4HalfSequenceShardsMatchSpOff) {
  // B = 2, T = 16, K = 4: each shard is 8 positions of one sequence, cut mid-sequence.
  const TpRun off = train("gpt-tiny", 1, 4, 2, 12, "fp32");
  expect_close(train("gpt-tiny", 1, 4, 2, 12, "fp32", {.sequence_parallel = true}), off, kLossTol,
               kParamTol);
}

TEST(GPTSequenceParallel, Dp2Tp2WithAccumulationMatchesSpOff) {
  // Two micro-batches of one sequence per DP rank: each shard is half a sequence, and the
  // LayerNorm gradients of the second micro-batch join the first's without summing them twice.
  const RunOptions sp_on{.sequence_parallel = true, .micro = 2};
  const TpRun off = train("gpt-tiny", 2, 2, 2, 12, "fp32", {.micro = 2});
  expect_close(train("gpt-tiny", 2, 2, 2, 12, "fp32", sp_on), off, kLossTol, kParamTol);
}

TEST(GPTSequenceParallel, Bf16AgreesWithinTolerance) {
  const TpRun off = train("gpt-tiny", 1, 2, 4, 6, "bf16");
  expect_close(train("gpt-tiny", 1, 2, 4, 6, "bf16", {.sequence_parallel = true}), off, 1e-2f,
               2e-2f);
}

TEST(GPTSequenceParallel, RefusesTokensThatDoNotSplit) {
  // B x T = 1 x 3 tokens cannot be cut into 2 equal shards: refused naming the sizes.
  set_cpu_threads(1);
  comm::LoopbackWorld world(2);
  std::vector<std::string> errors(2);
  world.run([&](comm::Communicator& c) {
    models::GPT gpt(config("gpt-tiny", 2), PrecisionPolicy::parse("fp32"), cpu_device(),
                    TPGroup(c, true));
    gpt.init_weights(1);
    try {
      gpt.forward(Tensor::from_ints({1, 2, 3}, Shape{1, 3}),
                  Tensor::from_ints({2, 3, 4}, Shape{1, 3}));
    } catch (const InvalidArgument& e) {
      errors[static_cast<std::size_t>(c.rank())] = e.what();
    }
  });
  for (const std::string& e : errors) {
    EXPECT_NE(e.find("the 3 tokens of a micro-batch"), std::string::npos) << e;
    EXPECT_NE(e.find("train.tp = 2"), std::string::npos) << e;
  }
}

TEST(GPTTensorParallel, SplitParametersFollowTheContract) {
  // Shapes and shard fields, and init: every shard holds the TP = 1 model's values.
  set_cpu_threads(1);
  const PrecisionPolicy fp32 = PrecisionPolicy::parse("fp32");
  models::GPT ref(config("gpt-tiny", 2), fp32);
  const Tensor ref_weights = ref.initial_weights(3);
  comm::LoopbackWorld world(2);
  world.run([&](comm::Communicator& c) {
    models::GPT gpt(config("gpt-tiny", 2), fp32, cpu_device(), TPGroup(c));
    const Tensor weights = gpt.initial_weights(3);
    ASSERT_EQ(gpt.params().size(), ref.params().size());
    for (std::size_t i = 0; i < gpt.params().size(); ++i) {
      const models::ParamInfo& p = gpt.params()[i];
      const models::ParamInfo& q = ref.params()[i];
      EXPECT_EQ(p.full_shape, q.shape) << p.name;
      EXPECT_EQ(p.shard_dim, q.shard_dim) << p.name;
      EXPECT_EQ(p.shard_parts, q.shard_parts) << p.name;
      const Tensor full = slot_view(ref_weights, q);
      Tensor want = p.shard_dim < 0 ? full : Tensor::empty(p.shape, DType::kF32);
      if (p.shard_dim >= 0) copy_shard(want, full, p.shard_dim, p.shard_parts, c.rank(), 2);
      EXPECT_EQ(slot_view(weights, p).to_floats(), want.to_floats()) << p.name;
    }
    EXPECT_EQ(gpt.params()[2 + 2].shard_parts, 3);  // h.0.attn.c_attn.weight
    EXPECT_EQ(gpt.params()[2 + 4].shard_dim, 1);    // h.0.attn.c_proj.weight
    EXPECT_EQ(gpt.params()[2 + 5].shard_dim, -1);   // h.0.attn.c_proj.bias: replicated
    EXPECT_EQ(gpt.num_parameters(), gpt.config().num_parameters_per_rank(2));
  });
}

TEST(GPTTensorParallel, DecodeMatchesOneRank) {
  set_cpu_threads(1);
  const PrecisionPolicy fp32 = PrecisionPolicy::parse("fp32");
  models::GPT ref(config("gpt-tiny", 4), fp32);
  // Non-zero biases and non-unit LayerNorms, so that a bias added twice would show.
  Tensor ref_weights = Tensor::zeros(Shape{ref.num_parameters()}, DType::kF32);
  for (std::size_t i = 0; i < ref.params().size(); ++i) {
    Tensor m = slot_view(ref_weights, ref.params()[i]);
    fill_normal(m, Philox(77, i), 0.0f, 0.1f);
  }
  slot_view(ref_weights, ref.params()[0]).slice(256, 256).zero_();  // padded vocabulary rows
  ref.set_weights(ref_weights);
  const std::vector<std::int32_t> prompt = {10, 200, 33, 7, 255, 0, 128};
  std::vector<std::vector<float>> want;
  for (std::int32_t t : prompt) want.push_back(ref.decode(t));
  for (int k : {2, 4}) {
    comm::LoopbackWorld world(k);
    world.run([&](comm::Communicator& c) {
      models::GPT gpt(config("gpt-tiny", 4), fp32, cpu_device(), TPGroup(c));
      Tensor weights = Tensor::zeros(Shape{gpt.num_parameters()}, DType::kF32);
      for (std::size_t i = 0; i < gpt.params().size(); ++i) {
        const models::ParamInfo& p = gpt.params()[i];
        Tensor m = slot_view(weights, p);
        const Tensor full = slot_view(ref_weights, ref.params()[i]);
        if (p.shard_dim < 0) {
          m.copy_from(full);
        } else {
          copy_shard(m, full, p.shard_dim, p.shard_parts, c.rank(), k);
        }
      }
      gpt.set_weights(weights);
      for (std::size_t i = 0; i < prompt.size(); ++i) {
        const std::vector<float> got = gpt.decode(prompt[i]);
        ASSERT_EQ(got.size(), want[i].size());
        for (std::size_t j = 0; j < got.size(); ++j)
          ASSERT_NEAR(got[j], want[i][j], 1e-5f)
              << "k " << k << " position " << i << " token " << j;
      }
    });
  }
}

TEST(GPTTensorParallel, RefusesAModelWhoseHeadsDoNotSplit) {
  models::GPTConfig six = config("six-heads", 4);
  try {
    six.validate_tp(4);
    FAIL() << "a 6-head model split 4 ways was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("model.n_head (6)"), std::string::npos) << e.what();
  }
  comm::LoopbackWorld world(4);
  EXPECT_THROW(world.run([&](comm::Communicator& c) {
    models::GPT gpt(six, PrecisionPolicy::parse("fp32"), cpu_device(), TPGroup(c));
  }),
               InvalidArgument);
  models::GPTConfig unpadded = models::GPTConfig::preset("gpt-tiny");
  unpadded.padded_vocab = 258;  // not a multiple of 4
  try {
    unpadded.validate_tp(4);
    FAIL() << "a vocabulary of 258 rows split 4 ways was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("padded vocabulary (258)"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace meshtrain::parallel
