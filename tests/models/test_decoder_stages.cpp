// models::Decoder as a pipeline stage of the Llama family, without a communicator: stages cut by
// parallel::stage_range and run through the Decoder's stage surface in 1F1B order (two
// micro-batches in flight) give the whole model's losses and gradients, each stage's grads-ready
// ranges tiling its buffer downwards; the parameter the embedding group sums is the embedding
// and its tied copy at offset 0 (none when untied); a zero-target
// micro-batch on the head stage still sends a (zero) gradient back; estimate_stage_memory for a
// Llama stage follows estimate_memory.
#include <cmath>
#include <map>
#include <random>
#include <string>

#include <gtest/gtest.h>

#include "models/decoder.hpp"
#include "parallel/pipeline.hpp"
#include "runtime/threads.hpp"

namespace meshtrain::models {
namespace {

LlamaConfig five_layers(bool tied) {
  LlamaConfig c = LlamaConfig::preset("llama-tiny");
  c.n_layer = 5;
  c.vocab_size = 200;  // padded to 256
  c.padded_vocab = GPTConfig::pad_vocab(c.vocab_size);
  c.block_size = 32;
  c.tie_word_embeddings = tied;
  return c;
}

Tensor random_ids(int b, int t, int vocab, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> d(0, vocab - 1);
  std::vector<std::int32_t> v(static_cast<std::size_t>(b) * t);
  for (auto& x : v) x = d(gen);
  return Tensor::from_ints(v, Shape{b, t});
}

void check_decoder_stages(bool tied) {
  set_cpu_threads(1);
  const LlamaConfig c = five_layers(tied);
  const PrecisionPolicy fp32 = PrecisionPolicy::parse("fp32");
  Decoder whole(c, fp32);
  whole.init_weights(7);
  EXPECT_EQ(whole.embedding_group_param(), -1);
  const Tensor tok[2] = {random_ids(2, 12, c.vocab_size, 1), random_ids(2, 12, c.vocab_size, 2)};
  const Tensor tgt[2] = {random_ids(2, 12, c.vocab_size, 3), random_ids(2, 12, c.vocab_size, 4)};
  float whole_loss[2];
  for (int m = 0; m < 2; ++m) {
    whole_loss[m] = whole.forward(tok[m], tgt[m]);
    whole.backward(0.5f);
  }
  // 5 layers on 3 stages: [0, 2), [2, 4), [4, 5).
  std::vector<std::unique_ptr<Decoder>> st;
  for (int s = 0; s < 3; ++s) {
    st.push_back(std::make_unique<Decoder>(c, fp32, cpu_device(), parallel::TPGroup(),
                                           parallel::stage_range(c.n_layer, 3, s), 2));
    st.back()->init_weights(7);
    EXPECT_FALSE(st.back()->is_whole());
  }
  EXPECT_EQ(st[1]->stage().first_layer, 2);
  EXPECT_EQ(st[1]->stage().last_layer, 4);
  EXPECT_EQ(st[1]->embedding_group_param(), -1);
  EXPECT_EQ(st[0]->embedding_group_param(), tied ? 0 : -1);
  if (tied) {
    const int copy = st[2]->embedding_group_param();
    ASSERT_GE(copy, 0);
    EXPECT_TRUE(st[2]->params()[static_cast<std::size_t>(copy)].tied_copy);
    EXPECT_EQ(st[2]->params()[static_cast<std::size_t>(copy)].name, "model.embed_tokens.weight");
    // At offset 0, as GPT's: the last DP bucket, so the layers' buckets need not wait for it.
    EXPECT_EQ(st[2]->params()[static_cast<std::size_t>(copy)].offset, 0);
  } else {
    EXPECT_EQ(st[2]->embedding_group_param(), -1);
  }
  float loss[2];
  for (int m = 0; m < 2; ++m) {
    st[0]->forward_micro(m, tok[m], tgt[m]);
    st[1]->stage_input(m, 2, 12).copy_from(st[0]->stage_output(m));
    st[1]->forward_micro(m, tok[m], tgt[m]);
    st[2]->stage_input(m, 2, 12).copy_from(st[1]->stage_output(m));
    loss[m] = st[2]->forward_micro(m, tok[m], tgt[m]);
  }
  // Each stage's grads-ready ranges of one backward tile its buffer downwards (what the DP
  // reducer and the driver's hold of the embedding group's range rely on).
  std::vector<std::pair<std::int64_t, std::int64_t>> calls[3];
  for (int s = 0; s < 3; ++s)
    st[static_cast<std::size_t>(s)]->set_grads_ready_hook(
        [&calls, s](std::int64_t b, std::int64_t e) { calls[s].emplace_back(b, e); });
  for (int m = 0; m < 2; ++m) {
    for (auto& c : calls) c.clear();
    st[2]->backward_micro(m, 0.5f, Tensor());
    st[1]->backward_micro(m, 1.0f, st[2]->input_grad().clone());
    st[0]->backward_micro(m, 1.0f, st[1]->input_grad().clone());
    for (int s = 0; s < 3; ++s) {
      const auto& c = calls[s];
      ASSERT_FALSE(c.empty()) << "stage " << s;
      EXPECT_EQ(c.front().second, st[static_cast<std::size_t>(s)]->num_parameters());
      EXPECT_EQ(c.back().first, 0) << "stage " << s;
      for (std::size_t i = 1; i < c.size(); ++i) EXPECT_EQ(c[i].second, c[i - 1].first);
    }
  }
  EXPECT_EQ(loss[0], whole_loss[0]);
  EXPECT_EQ(loss[1], whole_loss[1]);
  // Every gradient is the whole model's, bit for bit; the tied embedding's is the sum of the
  // two copies' (what the embedding group computes).
  std::map<std::string, std::vector<float>> got;
  for (const auto& s : st) {
    for (std::size_t i = 0; i < s->params().size(); ++i) {
      std::vector<float> g = s->grad(i).to_floats();
      auto [it, fresh] = got.emplace(s->params()[i].name, g);
      if (!fresh)
        for (std::size_t k = 0; k < g.size(); ++k) it->second[k] += g[k];
    }
  }
  ASSERT_EQ(got.size(), whole.params().size());
  for (std::size_t i = 0; i < whole.params().size(); ++i) {
    const std::string& n = whole.params()[i].name;
    const std::vector<float> want = whole.grad(i).to_floats();
    const std::vector<float>& have = got.at(n);
    double worst = 0;
    for (std::size_t k = 0; k < want.size(); ++k)
      worst = std::max(worst, static_cast<double>(std::fabs(want[k] - have[k])));
    EXPECT_LE(worst, tied && n == "model.embed_tokens.weight" ? 1e-6 : 0.0) << n;
  }
}

TEST(DecoderStages, LlamaUntiedThroughTheStageSurfaceMatchesTheWholeModel) {
  check_decoder_stages(false);
}
TEST(DecoderStages, LlamaTiedThroughTheStageSurfaceMatchesTheWholeModel) {
  check_decoder_stages(true);
}

TEST(DecoderStages, LlamaHeadStageWithoutTargetsSendsAZeroGradient) {
  set_cpu_threads(1);
  const LlamaConfig c = five_layers(true);
  const PrecisionPolicy fp32 = PrecisionPolicy::parse("fp32");
  Decoder last(c, fp32, cpu_device(), parallel::TPGroup(), parallel::stage_range(5, 2, 1), 1);
  last.init_weights(3);
  // A stale gradient in the scratch first, from a micro-batch with targets.
  Tensor in = last.stage_input(0, 1, 8);
  in.copy_from(Tensor::from_floats(std::vector<float>(static_cast<std::size_t>(8 * c.n_embd), 0.5f),
                                   Shape{1, 8, c.n_embd}, DType::kF32));
  const Tensor tok = random_ids(1, 8, c.vocab_size, 5);
  last.forward_micro(0, tok, random_ids(1, 8, c.vocab_size, 6));
  last.backward_micro(0, 1.0f, Tensor());
  double before = 0;
  for (float v : last.input_grad().to_floats()) before += std::fabs(v);
  EXPECT_GT(before, 0.0);
  const Tensor none = Tensor::from_ints(std::vector<std::int32_t>(8, -1), Shape{1, 8});
  last.forward_micro(0, tok, none);
  last.backward_micro(0, 1.0f, Tensor());
  for (float v : last.input_grad().to_floats()) ASSERT_EQ(v, 0.0f);
}

TEST(DecoderStages, LlamaStageMemoryFollowsEstimateMemory) {
  const LlamaConfig c = five_layers(true);
  const PrecisionPolicy bf16 = PrecisionPolicy::parse("bf16");
  // The whole model as one stage with one micro-batch in flight is estimate_memory's plan.
  const MemoryEstimate whole = estimate_memory(c, bf16, 2, 16, 2, 2, true);
  const MemoryEstimate one =
      estimate_stage_memory(ModelConfig(c), bf16, 2, 16, 2, 2, true, parallel::StageRange{}, 1);
  EXPECT_EQ(one.parameters, whole.parameters);
  EXPECT_EQ(one.optimizer_state, whole.optimizer_state);
  EXPECT_EQ(one.activations, whole.activations);
  // Three stages hold every parameter once plus the last stage's copy of the embedding
  // (this rank's half of its rows at TP 2).
  std::int64_t params = 0;
  for (int s = 0; s < 3; ++s)
    params += estimate_stage_memory(c, bf16, 2, 16, 2, 1, false, parallel::stage_range(5, 3, s), 1)
                  .parameters;
  EXPECT_EQ(params, whole.parameters + (c.padded_vocab / 2) * c.n_embd * 2);
  // Each micro-batch in flight adds one slot's activations.
  const parallel::StageRange mid = parallel::stage_range(5, 3, 1);
  const std::int64_t a1 = estimate_stage_memory(c, bf16, 2, 16, 2, 1, false, mid, 1).activations;
  const std::int64_t a2 = estimate_stage_memory(c, bf16, 2, 16, 2, 1, false, mid, 2).activations;
  const std::int64_t a3 = estimate_stage_memory(c, bf16, 2, 16, 2, 1, false, mid, 3).activations;
  EXPECT_GT(a2, a1);
  EXPECT_EQ(a3 - a2, a2 - a1);
}

}  // namespace
}  // namespace meshtrain::models
