// Text generation with a trained model: KV-cached decoding, greedy or top-k sampling, with the
// run's tokenizer (runtime/tokenizer.hpp) when it has one.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "models/decoder.hpp"
#include "runtime/tokenizer.hpp"

namespace meshtrain::launch {

// Continues `prompt` (ids, at least one) by up to `tokens` tokens, running the model on a
// fixed window of window_len positions, and calls on_token(id) as each is chosen (for
// streaming); stops early when on_token returns false. temperature 0 is greedy; top_k 0
// samples the whole vocabulary; the draws are a function of seed. vocab_limit > 0 draws only
// ids below it: a tokenizer's vocabulary can be smaller than the model's rows (Qwen2: 151,665
// of 151,936), and ids past it are not tokens. Returns the new ids. Under
// TP, collective over the model's TP group: its ranks call it together and get the same ids.
std::vector<std::int32_t> generate_ids(models::Decoder& model, int window_len,
                                       std::vector<std::int32_t> prompt, int tokens,
                                       double temperature, int top_k, std::uint64_t seed,
                                       const std::function<bool(std::int32_t)>& on_token = {},
                                       int vocab_limit = 0);

// The ids a text prompt starts from: with a tokenizer, encode(prompt, true) (Llama 3 puts its
// bos first), and for an empty prompt its bos, else its eos; with the byte vocabulary, the
// prompt's bytes (empty: "\n"). Any other vocabulary without a tokenizer cannot read text: a
// non-empty prompt throws InvalidArgument saying so (use token ids), an empty one starts from
// the model's bos/eos (GPT-2: 50256).
std::vector<std::int32_t> prompt_ids(const models::ModelConfig& model, const Tokenizer* tok,
                                     const std::string& prompt);

// Continues `prompt` by `tokens` tokens (generate_ids from prompt_ids) and returns the text:
// the decoded continuation with a tokenizer (stopping at its eos), the bytes with the byte
// vocabulary (prompt included, as before), else the ids as numbers.
std::string generate_text(models::Decoder& model, int window_len, const std::string& prompt,
                          int tokens, double temperature, int top_k, std::uint64_t seed,
                          const Tokenizer* tok = nullptr);

}  // namespace meshtrain::launch
