#include <cmath>

#include <gtest/gtest.h>

#include "models/gpt.hpp"

namespace meshtrain::models {
namespace {

// KV-cached decoding must give the logits a full forward gives at each position.
void check_decode_matches_forward(const PrecisionPolicy& policy, float tol) {
  GPTConfig cfg = GPTConfig::preset("gpt-tiny");
  cfg.vocab_size = 200;
  cfg.padded_vocab = 256;
  GPT model(cfg, policy);
  model.init_weights(5);
  const int t = 13;
  std::vector<std::int32_t> ids;
  for (int i = 0; i < t; ++i) ids.push_back((i * 37 + 11) % cfg.vocab_size);
  model.forward(Tensor::from_ints(ids, Shape{1, t}));
  const std::vector<float> full = model.logits().to_floats();
  model.reset_cache();
  for (int pos = 0; pos < t; ++pos) {
    const std::vector<float> step = model.decode(ids[pos]);
    ASSERT_EQ(step.size(), static_cast<std::size_t>(cfg.vocab_size));
    float max_ref = 0, max_err = 0;
    for (int v = 0; v < cfg.vocab_size; ++v) {
      const float ref = full[static_cast<std::size_t>(pos) * cfg.padded_vocab + v];
      max_ref = std::max(max_ref, std::fabs(ref));
      max_err = std::max(max_err, std::fabs(ref - step[v]));
    }
    EXPECT_LE(max_err, tol * max_ref) << "position " << pos;
  }
  EXPECT_EQ(model.cache_length(), t);
  EXPECT_THROW(model.decode(cfg.vocab_size), InvalidArgument);
}

TEST(GptDecode, MatchesForwardFp32) {
  // fp32: the same arithmetic in another order (GEMM on one row vs many).
  check_decode_matches_forward(PrecisionPolicy::parse("fp32"), 1e-5f);
}

TEST(GptDecode, MatchesForwardBf16) {
  // bf16 activations are rounded at different points: a few bf16 ulps of the largest logit.
  check_decode_matches_forward(PrecisionPolicy::parse("bf16"), 3e-2f);
}

TEST(GptDecode, CacheHoldsBlockSizePositions) {
  GPTConfig cfg = GPTConfig::preset("gpt-tiny");
  cfg.block_size = 4;
  GPT model(cfg, PrecisionPolicy::parse("fp32"));
  model.init_weights(1);
  for (int i = 0; i < 4; ++i) model.decode(i);
  EXPECT_THROW(model.decode(1), InvalidArgument);
  model.reset_cache();
  EXPECT_NO_THROW(model.decode(1));
}

}  // namespace
}  // namespace meshtrain::models
