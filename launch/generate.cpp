#include "launch/generate.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
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

std::string generate_text(models::GPT& model, int window_len, const std::string& prompt, int tokens,
                          double temperature, int top_k, std::uint64_t seed) {
  const models::GPTConfig& model_cfg = model.config();
  MT_CHECK(window_len >= 1 && window_len <= model_cfg.block_size,
           "generate: window {} must be in [1, {}]", window_len, model_cfg.block_size);
  MT_CHECK(tokens >= 0, "generate: token count {} is negative", tokens);
  const bool bytes = model_cfg.vocab_size == 256;
  std::vector<std::int32_t> ids;
  if (bytes) {
    for (unsigned char ch : prompt) ids.push_back(ch);
    if (ids.empty()) ids.push_back('\n');
  } else {
    ids.push_back(50256);  // GPT-2's end-of-text token starts a fresh document
  }
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
  for (int n = 0; n < tokens; ++n) {
    const double u = temperature > 0 ? rng.uniform(static_cast<std::uint64_t>(n)) : 0.0;
    const std::int32_t next = pick(logits, temperature, top_k, u, probs);
    ids.push_back(next);
    if (n + 1 == tokens) break;
    if (model.cache_length() >= window_len) {
      logits = refill(ids.size() - keep);
    } else {
      logits = model.decode(next);
    }
  }
  std::string out;
  for (std::size_t i = bytes ? 0 : prompt_len; i < ids.size(); ++i) {
    if (bytes) {
      out.push_back(static_cast<char>(ids[i]));
    } else {
      if (!out.empty()) out.push_back(' ');
      out += std::to_string(ids[i]);
    }
  }
  return out;
}

}  // namespace meshtrain::launch
