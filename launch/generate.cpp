#include "launch/generate.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <vector>

#include "runtime/error.hpp"
#include "runtime/rng.hpp"

namespace meshtrain::launch {
namespace {

// The next token from the logits: the most likely (temperature 0), or a draw at `temperature`
// among the top_k most likely (0: all), u in [0, 1) choosing where the draw falls.
std::int32_t pick(const std::vector<float>& logits, double temperature, int top_k, double u,
                  std::vector<float>& probs) {
  if (temperature <= 0)
    return static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) -
                                     logits.begin());
  std::vector<std::int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  const std::size_t k = top_k > 0 ? std::min<std::size_t>(top_k, order.size()) : order.size();
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k), order.end(),
                    [&](int x, int y) { return logits[x] > logits[y]; });
  probs.assign(k, 0.0f);
  const float mx = logits[order[0]];
  double total = 0.0;
  for (std::size_t i = 0; i < k; ++i) {
    probs[i] = std::exp((logits[order[i]] - mx) / static_cast<float>(temperature));
    total += probs[i];
  }
  u *= total;
  std::size_t chosen = k - 1;
  for (std::size_t i = 0; i < k; ++i) {
    u -= probs[i];
    if (u <= 0) {
      chosen = i;
      break;
    }
  }
  return order[chosen];
}

}  // namespace

std::vector<std::int32_t> prompt_ids(const models::ModelConfig& model, const Tokenizer* tok,
                                     const std::string& prompt) {
  std::vector<std::int32_t> ids;
  if (tok != nullptr) {
    ids = tok->encode(prompt, true);
    if (ids.empty()) {
      if (auto b = tok->bos_id())
        ids.push_back(*b);
      else if (auto e = tok->eos_id())
        ids.push_back(*e);
    }
    MT_CHECK(!ids.empty(),
             "generate: the tokenizer '{}' has no bos or eos token to start an "
             "empty prompt from; give a prompt",
             tok->source());
    for (std::int32_t id : ids)
      MT_CHECK(id < model.vocab_size(),
               "generate: the tokenizer '{}' gives id {}, outside the model's vocabulary of {}",
               tok->source(), id, model.vocab_size());
    return ids;
  }
  if (model.vocab_size() == 256) {
    for (unsigned char ch : prompt) ids.push_back(ch);
    if (ids.empty()) ids.push_back('\n');
    return ids;
  }
  MT_CHECK(prompt.empty(),
           "generate: this model's vocabulary ({} tokens) needs a tokenizer to read a text "
           "prompt, and the run has none (no tokenizer.json in the run directory): give the "
           "prompt as token ids with --prompt-ids, or train with data.tokenizer",
           model.vocab_size());
  // A fresh document starts from the model's bos token (Llama 3), else its eos (GPT-2's
  // end-of-text 50256, Qwen2), else id 0.
  const models::LlamaConfig* l = model.is_gpt() ? nullptr : &model.llama;
  int start = model.vocab_size() == 50257 ? 50256 : 0;
  if (l != nullptr && l->eos_id >= 0 && l->eos_id < l->vocab_size) start = l->eos_id;
  if (l != nullptr && l->bos_id >= 0 && l->bos_id < l->vocab_size) start = l->bos_id;
  ids.push_back(start);
  return ids;
}

std::vector<std::int32_t> generate_ids(models::Decoder& model, int window_len,
                                       std::vector<std::int32_t> ids, int tokens,
                                       double temperature, int top_k, std::uint64_t seed,
                                       const std::function<bool(std::int32_t)>& on_token,
                                       int vocab_limit) {
  const models::ModelConfig& model_cfg = model.config();
  MT_CHECK(window_len >= 1 && window_len <= model_cfg.block_size(),
           "generate: window {} must be in [1, {}]", window_len, model_cfg.block_size());
  MT_CHECK(tokens >= 0, "generate: token count {} is negative", tokens);
  MT_CHECK(!ids.empty(), "generate: the prompt has no tokens");
  for (std::size_t i = 0; i < ids.size(); ++i)
    MT_CHECK(ids[i] >= 0 && ids[i] < model_cfg.vocab_size(),
             "generate: prompt token {} (position {}) is outside the model's vocabulary of {}",
             ids[i], i, model_cfg.vocab_size());
  const std::size_t prompt_len = ids.size();
  // KV-cached decoding: each new token costs one position's work. When the cache is full,
  // restart it on the last half window of the text so far.
  const std::size_t keep = static_cast<std::size_t>(std::max(1, window_len / 2));
  Philox rng(seed, 0xdecade);
  std::vector<float> probs;
  auto refill = [&](std::size_t from) {
    model.reset_cache();
    std::vector<float> last;
    for (std::size_t i = from; i < ids.size(); ++i) last = model.decode(ids[i]);
    return last;
  };
  std::vector<float> logits =
      refill(ids.size() > static_cast<std::size_t>(window_len) ? ids.size() - window_len : 0);
  const std::size_t limit = vocab_limit > 0 ? static_cast<std::size_t>(vocab_limit) : 0;
  for (int n = 0; n < tokens; ++n) {
    if (limit > 0 && logits.size() > limit) logits.resize(limit);
    const double u = temperature > 0 ? rng.uniform(static_cast<std::uint64_t>(n)) : 0.0;
    const std::int32_t next = pick(logits, temperature, top_k, u, probs);
    ids.push_back(next);
    if (on_token && !on_token(next)) break;
    if (n + 1 == tokens) break;
    if (model.cache_length() >= window_len) {
      logits = refill(ids.size() - keep);
    } else {
      logits = model.decode(next);
    }
  }
  return std::vector<std::int32_t>(ids.begin() + static_cast<std::ptrdiff_t>(prompt_len),
                                   ids.end());
}

std::string generate_text(models::Decoder& model, int window_len, const std::string& prompt,
                          int tokens, double temperature, int top_k, std::uint64_t seed,
                          const Tokenizer* tok) {
  const models::ModelConfig& cfg = model.config();
  const bool bytes = tok == nullptr && cfg.vocab_size() == 256;
  // Samples during training: a prompt the vocabulary cannot read starts a fresh document.
  const std::vector<std::int32_t> start =
      prompt_ids(cfg, tok, tok == nullptr && !bytes ? std::string() : prompt);
  std::optional<std::int32_t> eos;
  if (tok != nullptr) eos = tok->eos_id();
  const std::vector<std::int32_t> out = generate_ids(
      model, window_len, start, tokens, temperature, top_k, seed,
      [&](std::int32_t id) { return !eos || id != *eos; }, tok != nullptr ? tok->vocab_size() : 0);
  std::string text;
  if (tok != nullptr) return prompt + tok->decode(out, true);
  if (bytes) {
    for (std::int32_t id : start) text.push_back(static_cast<char>(id));
    for (std::int32_t id : out) text.push_back(static_cast<char>(id));
    return text;
  }
  for (std::int32_t id : out) {
    if (!text.empty()) text.push_back(' ');
    text += std::to_string(id);
  }
  return text;
}

}  // namespace meshtrain::launch
