// One decoder family behind one surface: `model.arch = gpt2 | llama | qwen2`. ModelConfig says
// which family and holds its config; Decoder holds a GPT or a Llama and forwards what the
// trainer, the optimizer, checkpoints and generation use (the surface models/README.md lists).
// Code that needs a family's own API (pipeline stages, micro-batch slots) asks for it with
// gpt() / llama().
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "models/gpt.hpp"
#include "models/llama.hpp"

namespace meshtrain::models {

struct ModelConfig {
  std::string arch = "gpt2";  // gpt2 | llama | qwen2
  GPTConfig gpt;              // when arch == gpt2
  LlamaConfig llama;          // otherwise (llama.arch == arch)

  ModelConfig() = default;
  // Implicit: a GPTConfig or a LlamaConfig is a ModelConfig of its family.
  ModelConfig(const GPTConfig& g) : arch("gpt2"), gpt(g) {}  // NOLINT(google-explicit-constructor)
  ModelConfig(const LlamaConfig& l)
      : arch(l.arch), llama(l) {}  // NOLINT(google-explicit-constructor)

  bool is_gpt() const { return arch == "gpt2"; }
  // Every preset name of every family, and the family of one ("gpt2" or "llama"/"qwen2").
  static std::vector<std::string> preset_names();
  // The preset's config (either family); throws InvalidArgument listing the names.
  static ModelConfig preset(const std::string& name);

  int vocab_size() const { return is_gpt() ? gpt.vocab_size : llama.vocab_size; }
  int padded_vocab() const { return is_gpt() ? gpt.padded_vocab : llama.padded_vocab; }
  int block_size() const { return is_gpt() ? gpt.block_size : llama.block_size; }
  std::int64_t num_parameters() const {
    return is_gpt() ? gpt.num_parameters() : llama.num_parameters();
  }
  std::int64_t num_parameters_per_rank(int tp) const {
    return is_gpt() ? gpt.num_parameters_per_rank(tp) : llama.num_parameters_per_rank(tp);
  }
  double training_flops_per_token(int seq) const {
    return is_gpt() ? gpt.training_flops_per_token(seq) : llama.training_flops_per_token(seq);
  }
  std::string str() const { return is_gpt() ? gpt.str() : llama.str(); }
  void validate() const;
  void validate_tp(int tp) const;
  std::vector<ParamInfo> param_layout(int tp = 1) const;
};

MemoryEstimate estimate_memory(const ModelConfig& cfg, const PrecisionPolicy& policy, int batch,
                               int seq, int tp = 1, int dp = 1, bool zero = false,
                               bool sequence_parallel = false);

class Decoder {
 public:
  // Builds the family cfg.arch names, as GPT / Llama document: whole, or for GPT one pipeline
  // stage (`stage`; the Llama family's stages are not wired to the pipeline executor yet, and a
  // stage that is not the whole model is refused for it).
  Decoder(const ModelConfig& cfg, const PrecisionPolicy& policy, Device& device = cpu_device(),
          parallel::TPGroup tp = {}, parallel::StageRange stage = {});

  const ModelConfig& config() const { return cfg_; }
  GPT* gpt() { return gpt_.get(); }
  Llama* llama() { return llama_.get(); }
  const GPT* gpt() const { return gpt_.get(); }
  const Llama* llama() const { return llama_.get(); }

  const std::vector<ParamInfo>& params() const { return gpt_ ? gpt_->params() : llama_->params(); }
  std::int64_t num_parameters() const {
    return gpt_ ? gpt_->num_parameters() : llama_->num_parameters();
  }
  const parallel::TPGroup& tp() const { return gpt_ ? gpt_->tp() : llama_->tp(); }
  // Whether this object is the whole model (not one pipeline stage of it).
  bool is_whole() const { return gpt_ ? gpt_->is_whole() : true; }
  Device& device() const { return gpt_ ? gpt_->device() : llama_->device(); }
  Tensor initial_weights(std::uint64_t seed) const {
    return gpt_ ? gpt_->initial_weights(seed) : llama_->initial_weights(seed);
  }
  void set_weights(const Tensor& w) { gpt_ ? gpt_->set_weights(w) : llama_->set_weights(w); }
  void init_weights(std::uint64_t seed) { set_weights(initial_weights(seed)); }
  Tensor& flat_params() { return gpt_ ? gpt_->flat_params() : llama_->flat_params(); }
  Tensor& flat_grads() { return gpt_ ? gpt_->flat_grads() : llama_->flat_grads(); }
  Tensor param(std::size_t i) const { return gpt_ ? gpt_->param(i) : llama_->param(i); }
  Tensor grad(std::size_t i) const { return gpt_ ? gpt_->grad(i) : llama_->grad(i); }
  float forward(const Tensor& tokens, const Tensor& targets = Tensor()) {
    return gpt_ ? gpt_->forward(tokens, targets) : llama_->forward(tokens, targets);
  }
  void backward(float loss_multiplier = 1.0f) {
    gpt_ ? gpt_->backward(loss_multiplier) : llama_->backward(loss_multiplier);
  }
  const Tensor& logits() const { return gpt_ ? gpt_->logits() : llama_->logits(); }
  void zero_grads() { gpt_ ? gpt_->zero_grads() : llama_->zero_grads(); }
  void set_grads_ready_hook(std::function<void(std::int64_t, std::int64_t)> hook) {
    gpt_ ? gpt_->set_grads_ready_hook(std::move(hook))
         : llama_->set_grads_ready_hook(std::move(hook));
  }
  std::vector<float> decode(std::int32_t token) {
    return gpt_ ? gpt_->decode(token) : llama_->decode(token);
  }
  void reset_cache() { gpt_ ? gpt_->reset_cache() : llama_->reset_cache(); }
  int cache_length() const { return gpt_ ? gpt_->cache_length() : llama_->cache_length(); }
  std::int64_t activation_bytes() const {
    return gpt_ ? gpt_->activation_bytes() : llama_->activation_bytes();
  }

 private:
  ModelConfig cfg_;
  std::unique_ptr<GPT> gpt_;
  std::unique_ptr<Llama> llama_;
};

}  // namespace meshtrain::models
