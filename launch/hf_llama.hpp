// Interchange with Hugging Face's LlamaForCausalLM and Qwen2ForCausalLM: read a model directory
// as save_pretrained writes it (config.json, model.safetensors or model-0000K-of-0000N
// .safetensors shards with model.safetensors.index.json, tensors in fp32, bf16 or fp16) into a
// models::LlamaConfig and fp32 flat weights, and write one back.
//
// The layouts agree (nn.Linear's [out, in], the same names: models/llama.hpp names its
// parameters as transformers does); meshtrain pads the vocabulary rows of the embedding and the
// head to a multiple of 128 with zeros, which export drops. A tied model's files may or may not
// carry lm_head.weight (a copy of the embedding): import ignores it, export leaves it out.
#pragma once

#include <string>

#include "models/llama.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain::launch {

// Whether dir/config.json names a Llama-family architecture (LlamaForCausalLM,
// Qwen2ForCausalLM, or model_type llama / qwen2). False when there is no config.json or it
// names another (GPT-2); throws InvalidArgument for a config.json that is not JSON.
bool is_hf_llama_dir(const std::string& dir);

// Reads and checks config.json: every field meshtrain cannot represent is refused naming the
// file and the field (another architecture, hidden_act other than silu, rope_scaling types
// other than linear and llama3, sliding-window attention, mlp_bias, sizes out of range).
models::LlamaConfig read_hf_llama_config(const std::string& config_path);

struct ImportedLlama {
  models::LlamaConfig config;
  // fp32 flat weights laid out as Llama::param_layout(config) (TP = 1, vocabulary padded).
  Tensor weights;
};

// Reads dir (config.json and the safetensors file or shards). Every tensor is checked against
// the config's layout (name, shape, float dtype) and every shard against the index before the
// model-sized buffer is allocated; a missing, extra or misshapen tensor or a missing shard
// throws InvalidArgument naming the file and the tensor.
ImportedLlama import_hf_llama(const std::string& dir);

// Writes dir/model.safetensors (fp32, Hugging Face names, the real vocabulary only) and
// dir/config.json for the whole model (TP = 1 weights laid out as Llama::param_layout(cfg)).
// Creates dir; each file is written atomically.
void export_hf_llama(const models::LlamaConfig& cfg, const Tensor& weights, const std::string& dir);

// Copies tokenizer.json and tokenizer_config.json (those that exist) from one directory to
// another, each atomically; returns how many were copied.
int copy_tokenizer_files(const std::string& from, const std::string& to);

// `meshtrain import --hf DIR --out RUN` for a Llama-family directory: reads and checks DIR in
// full (import_hf_llama), then writes RUN/model.safetensors (fp32, our names and padded layout),
// RUN/hf_config.json (DIR's config.json, which model.hf_config names), RUN/config.toml and the
// tokenizer files; nothing is written when DIR is refused. RUN must be new or empty unless
// `force` (launch/run_dir.hpp's prepare_output_dir). Prints what it wrote; returns 0.
int import_hf_llama_run(const std::string& dir, const std::string& out, bool force = false);

}  // namespace meshtrain::launch
