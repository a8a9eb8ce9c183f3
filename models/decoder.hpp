// One decoder family behind one surface: `model.arch = gpt2 | llama | qwen2`. ModelConfig says
// which family and holds its config; Decoder holds a GPT or a Llama and forwards what the
// trainer, the optimizer, checkpoints, generation and the pipeline executor use (the surface
// models/README.md lists). Code that needs a family's own API asks for it with gpt() / llama().
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
  int n_layer() const { return is_gpt() ? gpt.n_layer : llama.n_layer; }
  // Whether the LM head is the word embedding (GPT-2 always; a Llama with
  // tie_word_embeddings): split into pipeline stages, the last one holds a copy of it.
  bool tied_embeddings() const { return is_gpt() || llama.tie_word_embeddings; }
  // The same model at TP = 1: the vocabulary padded to a multiple of 128 only (the layout of
  // model.safetensors and of weights gathered from every rank).
  ModelConfig unsplit() const;
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
  // params() of a Decoder of this config split over `tp` ranks, for pipeline stage `stage`
  // (the whole model by default), without allocating it.
  std::vector<ParamInfo> param_layout(int tp = 1, parallel::StageRange stage = {}) const;
};

MemoryEstimate estimate_memory(const ModelConfig& cfg, const PrecisionPolicy& policy, int batch,
                               int seq, int tp = 1, int dp = 1, bool zero = false,
                               bool sequence_parallel = false);

// One pipeline stage's memory (as estimate_stage_memory(GPTConfig, ...) says it for GPT: its
// parameters, a tied copy included, their optimizer state, and `in_flight` micro-batches of its
// layers' activations plus one set of backward scratch), for either family.
// sequence_parallel: GPT only, as for estimate_memory.
MemoryEstimate estimate_stage_memory(const LlamaConfig& cfg, const PrecisionPolicy& policy,
                                     int batch, int seq, int tp, int dp, bool zero,
                                     const parallel::StageRange& stage, int in_flight);
MemoryEstimate estimate_stage_memory(const ModelConfig& cfg, const PrecisionPolicy& policy,
                                     int batch, int seq, int tp, int dp, bool zero,
                                     const parallel::StageRange& stage, int in_flight,
                                     bool sequence_parallel = false);

class Decoder {
 public:
  // Builds the family cfg.arch names, as GPT / Llama document: whole, or one pipeline stage
  // (`stage`, as parallel::stage_range cuts it: its embedding and head flags must be those of
  // its layer range). `slots`: the micro-batches whose activations the stage keeps at once (the
  // schedule's max_in_flight; a GPT grows its slots as they are used, a Llama allocates this
  // many).
  Decoder(const ModelConfig& cfg, const PrecisionPolicy& policy, Device& device = cpu_device(),
          parallel::TPGroup tp = {}, parallel::StageRange stage = {}, int slots = 1);

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
  bool is_whole() const { return stage_.embedding && stage_.head; }
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
  std::int64_t activation_bytes() const;

  // ---- pipeline stages (parallel/pipeline.hpp), the same for both families ------------------
  //
  // What launch/pipeline_driver.cpp runs: micro-batch m of a step in activation slot
  // m % slots, from its forward to its backward; the boundary between stages is the residual
  // stream [B, T, C] in the activation dtype.
  //
  // This object's layers [first_layer, last_layer) (last_layer resolved; an interleaved GPT
  // stage's model chunks in StageRange::chunks), and whether it holds the embedding (first
  // stage) and the final norm, head and loss (last stage).
  const parallel::StageRange& stage() const { return stage_; }
  // The parameter whose gradient the mesh's embedding group sums before the update, so that the
  // two copies of a tied embedding take the same step: the embedding on the first stage and
  // the last stage's copy of it (ParamSlot::tied_copy) when the model is split and tied; -1
  // otherwise (the whole model, a middle stage, an untied Llama).
  int embedding_group_param() const { return embedding_group_param_; }
  // The buffer the previous stage's activations for `slot` are received into ([B, T, C]), on a
  // stage without the embedding.
  Tensor stage_input(int slot, int batch, int seq);
  // The slot's output activations after forward_micro, on a stage without the head.
  Tensor stage_output(int slot) const;
  // Forward of one micro-batch in `slot`: tokens [B, T] int32 (read by the first stage; a later
  // stage reads stage_input(slot) and uses the tokens' shape), targets (read by the last stage;
  // tokens and targets must not change until the slot's backward). Returns the mean loss on the
  // last stage, NaN elsewhere. chunk: the stage's model chunk (interleaved GPT stages; 0
  // otherwise), whose layers run; the loss is the last stage's last chunk's.
  float forward_micro(int slot, const Tensor& tokens, const Tensor& targets, int chunk = 0);
  // Backward of the slot's forward: output_grad is the gradient of stage_output(slot) (ignored
  // on the last stage, which starts from its loss x loss_multiplier). Gradients accumulate into
  // flat_grads(), with the grads-ready hook called as for the whole model.
  void backward_micro(int slot, float loss_multiplier, const Tensor& output_grad, int chunk = 0);
  // After backward_micro on a stage without the embedding: the gradient of its input,
  // [B, T, C], valid until the next backward.
  const Tensor& input_grad() const { return gpt_ ? gpt_->input_grad() : llama_->input_grad(); }

 private:
  ModelConfig cfg_;
  std::unique_ptr<GPT> gpt_;
  std::unique_ptr<Llama> llama_;
  parallel::StageRange stage_;
  int embedding_group_param_ = -1;
  // A Llama stage without the embedding: per slot, where its input is received (the Llama
  // copies it into its first layer's activations).
  std::vector<Tensor> inputs_;
};

}  // namespace meshtrain::models
