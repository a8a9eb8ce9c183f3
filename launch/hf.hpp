// Interchange with Hugging Face GPT-2 (transformers' GPT2LMHeadModel): export a trained model
// to its safetensors layout and config.json, and import one (converted elsewhere, or saved by
// transformers' save_pretrained) to fine-tune or sample.
//
// The two layouts differ in three ways: transformers' Conv1D stores linear weights as [in, out]
// where meshtrain stores [out, in]; the embedding holds the real vocabulary (50257 rows) where
// meshtrain pads it to a multiple of 128 with zero rows; and transformers' files may prefix
// names with "transformer." and carry lm_head.weight (tied to wte) and attention-mask buffers.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "models/gpt.hpp"

namespace meshtrain::launch {

// Writes dir/model.safetensors (fp32, Hugging Face GPT-2 names and layout, metadata format
// "pt") and dir/config.json from fp32 flat weights laid out as the model's params()
// (launch/weights.hpp). The model must hold every parameter (TP = 1). Creates dir; overwrites
// those two files atomically.
void export_hf(const models::GPT& model, const Tensor& weights, const std::string& dir);

struct ImportedModel {
  models::GPTConfig config;
  // meshtrain's names and layout ([out, in], vocabulary padded), fp32, in params() order.
  std::vector<std::pair<std::string, Tensor>> weights;
};

// Reads dir/config.json and dir/model.safetensors. Throws InvalidArgument naming the file and
// field for anything meshtrain's GPT cannot represent (another architecture, activation,
// LayerNorm epsilon, vocabulary size other than 256 or 50257, missing or misshapen tensors).
ImportedModel import_hf(const std::string& dir);

}  // namespace meshtrain::launch
