// GPT model tests: overfitting one batch, gradient accumulation, parameter accounting and the
// errors forward gives for bad input. The comparison with PyTorch is test_gpt_torch.py.
#include <cmath>
#include <random>
#include <string>

#include <gtest/gtest.h>

#include "models/gpt.hpp"
#include "parallel/optimizer.hpp"
#include "runtime/ops.hpp"
#include "runtime/threads.hpp"

namespace meshtrain::models {
namespace {

GPTConfig tiny_config() {
  GPTConfig cfg;
  cfg.n_layer = 2;
  cfg.n_head = 4;
  cfg.n_embd = 32;
  cfg.block_size = 16;
  cfg.vocab_size = 256;
  cfg.padded_vocab = 256;
  return cfg;
}

Tensor random_tokens(int b, int t, int vocab, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> d(0, vocab - 1);
  std::vector<std::int32_t> v(static_cast<std::size_t>(b) * t);
  for (auto& x : v) x = d(gen);
  return Tensor::from_ints(v, Shape{b, t});
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

class Overfit : public ::testing::TestWithParam<const char*> {};

// A tiny model memorises one fixed batch of random tokens: every training path (forward,
// backward, AdamW on master weights, the bf16 copy) has to work for the loss to reach ~0.
TEST_P(Overfit, OneBatchToNearZeroLoss) {
  set_cpu_threads(1);  // the suite runs tests in parallel on shared cores
  const PrecisionPolicy policy = PrecisionPolicy::parse(GetParam());
  GPT model(tiny_config(), policy);
  parallel::Mesh single;
  parallel::DistributedAdamW opt(model.params(), model.flat_params(), model.flat_grads(),
                                 model.initial_weights(5), parallel::AdamWOptions{}, single);
  const Tensor tokens = random_tokens(2, 16, 256, 1), targets = random_tokens(2, 16, 256, 2);
  constexpr int kMaxSteps = 100;  // it takes about 30
  constexpr float kTarget = 0.05f;
  const float first = model.forward(tokens, targets);
  EXPECT_GT(first, 5.0f) << "a fresh model should be near ln(256) = 5.55";
  float loss = first;
  int step = 0;
  while (loss >= kTarget && step < kMaxSteps) {
    model.zero_grads();
    model.backward(1.0f);
    opt.step(1e-2, ++step, 0.0, 1.0f);
    loss = model.forward(tokens, targets);
    ASSERT_TRUE(std::isfinite(loss)) << "step " << step;
  }
  EXPECT_LT(loss, kTarget) << GetParam() << ": loss " << first << " -> " << loss << " after "
                           << step << " steps";
  RecordProperty("steps_to_target", step);
}

INSTANTIATE_TEST_SUITE_P(Policies, Overfit, ::testing::Values("fp32", "bf16"));

// backward() accumulates: two half-weighted backward passes give the gradient of one.
TEST(Gpt, BackwardAccumulates) {
  set_cpu_threads(1);
  GPT model(tiny_config(), PrecisionPolicy::parse("fp32"));
  model.init_weights(3);
  const Tensor tokens = random_tokens(2, 8, 256, 3), targets = random_tokens(2, 8, 256, 4);
  model.zero_grads();
  model.forward(tokens, targets);
  model.backward(1.0f);
  const std::vector<float> once = model.flat_grads().to_floats();
  model.zero_grads();
  for (int i = 0; i < 2; ++i) {
    model.forward(tokens, targets);
    model.backward(0.5f);
  }
  const std::vector<float> twice = model.flat_grads().to_floats();
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < once.size(); ++i) {
    diff += (once[i] - twice[i]) * static_cast<double>(once[i] - twice[i]);
    norm += once[i] * static_cast<double>(once[i]);
  }
  ASSERT_GT(norm, 0.0);
  EXPECT_LT(std::sqrt(diff / norm), 1e-6);
}

TEST(Gpt, ParameterCountsOfThePresets) {
  // GPT-2 124M has 124,439,808 parameters with its 50257-row embedding; padding to 50304 rows
  // adds 47 x 768.
  EXPECT_EQ(GPTConfig::preset("gpt2").num_parameters(), 124439808 + 47 * 768);
  EXPECT_EQ(GPTConfig::preset("gpt2").padded_vocab, 50304);
  GPT model(tiny_config(), PrecisionPolicy::parse("fp32"));
  std::int64_t sum = 0;
  for (const ParamInfo& p : model.params()) {
    EXPECT_EQ(p.offset, sum) << p.name;
    sum += p.shape.numel();
    EXPECT_EQ(p.decay, p.shape.ndim() == 2) << p.name;
  }
  EXPECT_EQ(sum, tiny_config().num_parameters());
}

TEST(Gpt, ForwardRejectsBadInput) {
  GPT model(tiny_config(), PrecisionPolicy::parse("fp32"));
  model.init_weights(1);
  Tensor tokens = random_tokens(1, 8, 256, 5);
  tokens.data_as<std::int32_t>()[3] = 256;
  EXPECT_NE(error_of([&] { model.forward(tokens); }).find("token id 256 at (batch 0, position 3)"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              model.forward(random_tokens(1, 17, 256, 5));
            }).find("sequence length 17 must be in [1, 16]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { model.backward(); }).find("needs a forward with targets"),
            std::string::npos);
}

// ZeRO-1 keeps the fp32 master weights and the moments as a 1/dp shard, and adds a shard of
// averaged gradients; without it, data parallelism changes nothing per rank.
TEST(Gpt, MemoryEstimateShardsTheOptimizerUnderZeroOne) {
  const GPTConfig c = GPTConfig::preset("gpt2");
  const PrecisionPolicy bf16 = PrecisionPolicy::parse("bf16");
  const MemoryEstimate one = estimate_memory(c, bf16, 4, 1024);
  const MemoryEstimate plain = estimate_memory(c, bf16, 4, 1024, 1, 3, false);
  const MemoryEstimate zero = estimate_memory(c, bf16, 4, 1024, 1, 3, true);
  const std::int64_t n = c.num_parameters(), shard = (n + 2) / 3;
  EXPECT_EQ(plain.total(), one.total());
  EXPECT_EQ(plain.optimizer_elements, n);
  EXPECT_EQ(plain.gradient_shard, 0);
  EXPECT_EQ(zero.optimizer_elements, shard);
  EXPECT_EQ(zero.master_weights, 4 * shard);
  EXPECT_EQ(zero.optimizer_state, 8 * shard);
  EXPECT_EQ(zero.gradient_shard, 4 * shard);
  EXPECT_EQ(zero.parameters, plain.parameters);
  EXPECT_EQ(zero.gradients, plain.gradients);
  EXPECT_EQ(zero.activations, plain.activations);
  EXPECT_EQ(estimate_memory(c, PrecisionPolicy::parse("fp32"), 4, 1024, 1, 3, true).master_weights,
            0);
}

}  // namespace
}  // namespace meshtrain::models
