// Llama-family model tests: presets with the published parameter counts, the flat layout (HF
// names, fused q|k|v and gate|up adjacent, grads-ready ranges tiling the buffer downwards),
// KV heads replicated when there are fewer than TP ranks (layout and refusals), pipeline
// stages with several micro-batches in flight giving the whole model's losses and
// gradients bit for bit, decoding against the full forward, and errors for bad input. The
// comparison with transformers is test_llama_transformers.py.
#include <cmath>
#include <random>
#include <string>

#include <gtest/gtest.h>

#include "models/llama.hpp"
#include "runtime/threads.hpp"

namespace meshtrain::models {
namespace {

LlamaConfig tiny(bool tied, bool bias) {
  LlamaConfig c = LlamaConfig::preset("llama-tiny");
  c.n_layer = 4;
  c.vocab_size = 200;  // padded to 256
  c.padded_vocab = GPTConfig::pad_vocab(c.vocab_size);
  c.block_size = 32;
  c.tie_word_embeddings = tied;
  c.qkv_bias = bias;
  c.o_bias = bias;
  return c;
}

Tensor random_ids(int b, int t, int vocab, unsigned seed, bool ignore = false) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> d(0, vocab - 1);
  std::vector<std::int32_t> v(static_cast<std::size_t>(b) * t);
  for (auto& x : v) x = d(gen);
  if (ignore) v[3] = -1;
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

TEST(LlamaConfig, PresetsHaveThePublishedParameterCounts) {
  // transformers' num_parameters() of each model.
  EXPECT_EQ(LlamaConfig::preset("llama3-8b").num_parameters(), 8030261248LL);
  EXPECT_EQ(LlamaConfig::preset("llama3-70b").num_parameters(), 70553706496LL);
  EXPECT_EQ(LlamaConfig::preset("llama3.2-1b").num_parameters(), 1235814400LL);
  EXPECT_EQ(LlamaConfig::preset("qwen2.5-0.5b").num_parameters(), 494032768LL);
  for (const std::string& n : LlamaConfig::preset_names()) {
    const LlamaConfig c = LlamaConfig::preset(n);
    c.validate();
    // The layout holds what num_parameters_per_rank says (vocabulary padded).
    std::int64_t sum = 0;
    for (const ParamInfo& p : Llama::param_layout(c, 1)) sum += p.numel();
    EXPECT_EQ(sum, c.num_parameters_per_rank(1)) << n;
  }
  EXPECT_NE(error_of([] { LlamaConfig::preset("llama9"); }).find("llama3-8b"), std::string::npos);
}

TEST(LlamaConfig, SmallPresetComparesWithGptSmall) {
  const double gpt = GPTConfig::preset("gpt-small").training_flops_per_token(256);
  const double llama = LlamaConfig::preset("llama-small").training_flops_per_token(256);
  EXPECT_NEAR(llama / gpt, 1.0, 0.1);
}

TEST(LlamaConfig, TensorParallelRefusals) {
  LlamaConfig c = LlamaConfig::preset("llama-small");  // 6 heads, 2 KV heads
  c.validate_tp(2);
  EXPECT_NE(error_of([&] { c.validate_tp(3); }).find("model.n_kv_head (2)"), std::string::npos);
  EXPECT_NE(error_of([&] { c.validate_tp(4); }).find("model.n_head (6)"), std::string::npos);
  c.arch = "mistral";
  EXPECT_NE(error_of([&] { c.validate(); }).find("model.arch"), std::string::npos);
}

// Fewer KV heads than TP ranks: each KV head is held by tp / n_kv_head consecutive ranks, those
// whose query heads use it; refused, naming the keys and values, where that cannot be.
TEST(LlamaConfig, TensorParallelReplicatesKvHeads) {
  const LlamaConfig c = tiny(false, true);  // 4 heads, 2 KV heads, head_dim 16
  c.validate_tp(4);
  const std::vector<ParamInfo> p = Llama::param_layout(c, 4);
  std::int64_t sum = 0;
  int kv = 0;
  for (const ParamInfo& s : p) {
    sum += s.numel();
    if (s.name.find("k_proj") == std::string::npos && s.name.find("v_proj") == std::string::npos)
      continue;
    ++kv;
    // One of the two KV heads (16 rows), held by ranks {0, 1} and {2, 3}.
    EXPECT_EQ(s.shape[0], 16) << s.name;
    EXPECT_EQ(s.replicas(4), 2) << s.name;
    EXPECT_EQ(s.shard_count(4), 2) << s.name;
    EXPECT_EQ(s.shard_index(3, 4), 1) << s.name;
    EXPECT_TRUE(s.counted_on(2, 4) && !s.counted_on(3, 4)) << s.name;
    // At TP 2 the same slot is split without replicas: the field says how any TP splits.
    EXPECT_EQ(s.replicas(2), 1) << s.name;
  }
  EXPECT_EQ(kv, 4 * c.n_layer);  // k and v weights and biases
  EXPECT_EQ(sum, c.num_parameters_per_rank(4));
  // One KV head shared by TP 2: k_proj is whole on both ranks.
  LlamaConfig one = c;
  one.n_kv_head = 1;
  for (const ParamInfo& s : Llama::param_layout(one, 2))
    if (s.name.find("k_proj.weight") != std::string::npos) {
      EXPECT_EQ(s.shape, (Shape{16, 64}));
    }
  std::int64_t sum1 = 0;
  for (const ParamInfo& s : Llama::param_layout(one, 2)) sum1 += s.numel();
  EXPECT_EQ(sum1, one.num_parameters_per_rank(2));

  LlamaConfig six = LlamaConfig::preset("llama-small");  // 6 heads, 2 KV heads
  six.intermediate_size = 1032;
  six.padded_vocab = GPTConfig::pad_vocab(six.vocab_size, 128 * 6);
  six.validate_tp(6);  // each KV head on 3 ranks
  const std::string e3 = error_of([&] { six.validate_tp(3); });
  EXPECT_NE(e3.find("model.n_kv_head (2)"), std::string::npos) << e3;
  EXPECT_NE(e3.find("train.tp = 3"), std::string::npos) << e3;
  const std::string e8 = error_of([&] { c.validate_tp(8); });  // more ranks than query heads
  EXPECT_NE(e8.find("model.n_head (4)"), std::string::npos) << e8;
  EXPECT_NE(e8.find("model.n_kv_head = 2"), std::string::npos) << e8;
  EXPECT_NE(e8.find("train.tp = 8"), std::string::npos) << e8;
}

TEST(Llama, LayoutIsHuggingFacesNamesWithFusedBlocksAdjacent) {
  const LlamaConfig c = tiny(false, true);
  const std::vector<ParamInfo> p = Llama::param_layout(c, 2);
  EXPECT_EQ(p.front().name, "model.embed_tokens.weight");
  EXPECT_EQ(p.back().name, "lm_head.weight");
  for (std::size_t i = 0; i + 2 < p.size(); ++i) {
    if (p[i].name.find("q_proj.weight") == std::string::npos) continue;
    EXPECT_NE(p[i + 1].name.find("k_proj.weight"), std::string::npos);
    EXPECT_NE(p[i + 2].name.find("v_proj.weight"), std::string::npos);
    EXPECT_EQ(p[i + 1].offset, p[i].offset + p[i].numel());
    // TP 2: this rank's 2 of 4 query heads and 1 of 2 KV heads, head_dim 16.
    EXPECT_EQ(p[i].shape, (Shape{32, 64}));
    EXPECT_EQ(p[i + 1].shape, (Shape{16, 64}));
  }
}

// The whole model against the same model split into stages [0, 1), [1, 3), [3, 4), run as a
// schedule would: every stage's forward for micro-batches 0 and 1 first (both in flight), then
// their backwards. Losses and gradients must be the same bits.
void check_stages(bool tied) {
  set_cpu_threads(1);
  const LlamaConfig c = tiny(tied, true);
  const PrecisionPolicy fp32 = PrecisionPolicy::parse("fp32");
  Llama whole(c, fp32);
  whole.init_weights(11);
  const Tensor tok[2] = {random_ids(2, 12, c.vocab_size, 1), random_ids(2, 12, c.vocab_size, 2)};
  const Tensor tgt[2] = {random_ids(2, 12, c.vocab_size, 3, true),
                         random_ids(2, 12, c.vocab_size, 4)};
  float whole_loss[2];
  for (int m = 0; m < 2; ++m) {
    whole_loss[m] = whole.forward(tok[m], tgt[m]);
    whole.backward(0.5f);
  }
  const LlamaStage ranges[3] = {{0, 1}, {1, 3}, {3, 4}};
  std::vector<std::unique_ptr<Llama>> st;
  for (const LlamaStage& r : ranges) {
    st.push_back(std::make_unique<Llama>(c, fp32, cpu_device(), parallel::TPGroup(), r, 2));
    st.back()->init_weights(11);
  }
  EXPECT_TRUE(st[0]->has_embedding() && !st[0]->has_head());
  EXPECT_TRUE(st[2]->has_head() && !st[2]->has_embedding());
  EXPECT_EQ(st[2]->tied_embedding_slot() >= 0, tied);
  float loss[2];
  for (int m = 0; m < 2; ++m) {
    st[0]->forward_micro(m, tok[m]);
    st[1]->forward_micro(m, st[0]->output_hidden(m).clone());
    loss[m] = st[2]->forward_micro(m, st[1]->output_hidden(m).clone(), tgt[m]);
  }
  // Oldest micro-batch first, as 1F1B runs them.
  for (int m = 0; m < 2; ++m) {
    st[2]->backward_micro(m, 0.5f);
    st[1]->backward_micro(m, 1.0f, st[2]->input_grad().clone());
    st[0]->backward_micro(m, 1.0f, st[1]->input_grad().clone());
  }
  EXPECT_EQ(loss[0], whole_loss[0]);
  EXPECT_EQ(loss[1], whole_loss[1]);
  // Every stage parameter's gradient equals the whole model's of the same name; a tied
  // model's embedding gradient is the sum of the first stage's and the last stage's copy.
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
    // Bit for bit but for the tied embedding, whose two halves are summed in another order.
    EXPECT_LE(worst, tied && n == "model.embed_tokens.weight" ? 1e-6 : 0.0) << n;
  }
}

TEST(Llama, PipelineStagesWithTwoMicroBatchesInFlightMatchTheWholeModel) {
  check_stages(false);
}
TEST(Llama, PipelineStagesTiedEmbedding) {
  check_stages(true);
}

TEST(Llama, GradsReadyRangesTileTheBufferDownwards) {
  const LlamaConfig c = tiny(false, true);
  Llama m(c, PrecisionPolicy::parse("fp32"));
  m.init_weights(3);
  std::vector<std::pair<std::int64_t, std::int64_t>> calls;
  m.set_grads_ready_hook([&](std::int64_t b, std::int64_t e) { calls.emplace_back(b, e); });
  m.forward(random_ids(2, 8, c.vocab_size, 1), random_ids(2, 8, c.vocab_size, 2));
  m.backward();
  ASSERT_FALSE(calls.empty());
  EXPECT_EQ(calls.front().second, m.num_parameters());
  EXPECT_EQ(calls.back().first, 0);
  for (std::size_t i = 1; i < calls.size(); ++i) EXPECT_EQ(calls[i].second, calls[i - 1].first);
}

TEST(Llama, DecodeMatchesTheFullForward) {
  set_cpu_threads(1);
  for (bool tied : {false, true}) {
    LlamaConfig c = tiny(tied, !tied);
    Llama m(c, PrecisionPolicy::parse("fp32"));
    m.init_weights(5);
    const Tensor tok = random_ids(1, 20, c.vocab_size, 9);
    m.forward(tok);
    const std::vector<float> full = m.logits().to_floats();
    const std::vector<std::int32_t> ids = tok.to_ints();
    double worst = 0;
    for (int t = 0; t < 20; ++t) {
      const std::vector<float> row = m.decode(ids[t]);
      ASSERT_EQ(row.size(), static_cast<std::size_t>(c.vocab_size));
      for (int v = 0; v < c.vocab_size; ++v)
        worst = std::max(
            worst, static_cast<double>(
                       std::fabs(row[v] - full[static_cast<std::size_t>(t) * c.padded_vocab + v])));
    }
    EXPECT_LE(worst, 1e-4) << "tied " << tied;
  }
}

TEST(Llama, TrainsDownOnOneBatch) {
  set_cpu_threads(1);
  const LlamaConfig c = tiny(true, false);
  Llama m(c, PrecisionPolicy::parse("fp32"));
  m.init_weights(1);
  const Tensor tok = random_ids(2, 16, c.vocab_size, 1), tgt = random_ids(2, 16, c.vocab_size, 2);
  float first = 0, last = 0;
  for (int step = 0; step < 120; ++step) {
    m.zero_grads();
    last = m.forward(tok, tgt);
    if (step == 0) first = last;
    m.backward();
    // Plain SGD on the flat buffers.
    std::vector<float> p = m.flat_params().to_floats(), g = m.flat_grads().to_floats();
    for (std::size_t i = 0; i < p.size(); ++i) p[i] -= 0.2f * g[i];
    m.set_weights(Tensor::from_floats(p, Shape{m.num_parameters()}, DType::kF32));
  }
  EXPECT_LT(last, 0.5f * first);
}

TEST(Llama, BadInputIsRefused) {
  const LlamaConfig c = tiny(false, false);
  Llama m(c, PrecisionPolicy::parse("fp32"));
  EXPECT_NE(error_of([&] {
              m.forward(Tensor::from_ints({1, 500}, Shape{1, 2}));
            }).find("token id 500"),
            std::string::npos);
  EXPECT_NE(error_of([&] { m.forward(random_ids(1, 33, c.vocab_size, 1)); }).find("block_size"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              Llama(c, PrecisionPolicy::parse("fp32"), cpu_device(), parallel::TPGroup(),
                    LlamaStage{2, 2});
            }).find("stage [2, 2)"),
            std::string::npos);
  Llama mid(c, PrecisionPolicy::parse("fp32"), cpu_device(), parallel::TPGroup(), LlamaStage{1, 3});
  EXPECT_NE(error_of([&] {
              mid.forward_micro(0, random_ids(1, 4, c.vocab_size, 1));
            }).find("hidden states"),
            std::string::npos);
}

}  // namespace
}  // namespace meshtrain::models
