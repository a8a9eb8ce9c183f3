// Text generation with a trained model: KV-cached decoding, greedy or top-k sampling.
#pragma once

#include <cstdint>
#include <string>

#include "models/gpt.hpp"

namespace meshtrain::launch {

// Continues `prompt` by `tokens` tokens, running the model on a fixed window of window_len
// positions. Byte vocabulary: the prompt's bytes in, text out. GPT-2 vocabulary: starts from
// end-of-text and returns token ids as numbers (no tokenizer ships here). temperature 0 is
// greedy; top_k 0 samples the whole vocabulary. The draws are a function of seed. Under TP,
// collective over the model's TP group: its ranks call it together and get the same text.
std::string generate_text(models::GPT& model, int window_len, const std::string& prompt, int tokens,
                          double temperature, int top_k, std::uint64_t seed);

}  // namespace meshtrain::launch
