// The Llama family (Llama 3, Llama 3.2, Qwen2 / Qwen2.5): pre-RMSNorm blocks, rotary position
// embeddings, grouped-query attention, a SwiGLU MLP, an untied or tied LM head, and Qwen2's
// q/k/v biases, built from runtime ops and the tensor-parallel layers.
//
// Parameters are named as Hugging Face's LlamaForCausalLM / Qwen2ForCausalLM name them and have
// their [out, in] shapes, so that interchange is a copy. q_proj, k_proj and v_proj (and
// gate_proj, up_proj) are separate parameters laid out next to each other in the flat buffer,
// so that the three (two) of them are one fused [q | k | v] ([gate | up]) weight for one matmul
// without any copy; under TP each is split by rows on its own, so a rank's fused weight stacks
// its q rows, then its k rows, then its v rows, which is the layout ops::attention_forward and
// ops::swiglu_forward take.
//
// Pipeline stages. A Llama is built for a contiguous range of layers [first_layer, last_layer)
// (LlamaStage); the first stage (first_layer == 0) also holds the token embedding, the last
// (last_layer == n_layer) the final norm, the LM head and the loss. A stage takes and returns
// the hidden states [B, T, C] at its boundaries, and keeps the activations of up to
// `micro_batches` micro-batches at once (forward_micro / backward_micro with a micro-batch
// slot), so that a 1F1B schedule can keep P micro-batches in flight. The whole model with one
// slot is the default, and forward / backward are forward_micro / backward_micro on slot 0.
// models/README.md documents the contract for schedules.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "models/gpt.hpp"
#include "parallel/flat_layout.hpp"
#include "parallel/tensor_parallel.hpp"
#include "runtime/ops.hpp"
#include "runtime/precision.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain::models {

struct LlamaConfig {
  std::string arch = "llama";  // "llama" (LlamaForCausalLM) or "qwen2" (Qwen2ForCausalLM)
  int n_layer = 4;
  int n_head = 8;
  int n_kv_head = 4;  // divides n_head (grouped-query attention; = n_head: multi-head)
  int n_embd = 256;
  int intermediate_size = 688;  // the SwiGLU MLP's hidden width F
  int head_dim = 0;             // 0: n_embd / n_head (Hugging Face's default)
  int block_size = 256;         // the longest sequence the model is run at (positions)
  int vocab_size = 256;         // real vocabulary
  int padded_vocab = 256;       // rows of the embedding (and head): a multiple of 128 x TP
  ops::RopeConfig rope;         // rope_theta and rope_scaling
  float rms_norm_eps = 1e-5f;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;         // q/k/v biases (Qwen2 always; Llama with attention_bias)
  bool o_bias = false;           // o_proj bias (Llama with attention_bias)
  int bos_id = -1, eos_id = -1;  // from config.json or the tokenizer; -1: none

  // Real shapes: llama3-8b, llama3-70b, llama3.2-1b (tied), qwen2.5-0.5b (tied, qkv bias);
  // and small ones for CPUs and tests: llama-tiny (2 x 64, 4 heads, 2 KV heads) and
  // llama-small (6 x 384, 6 heads, 2 KV heads, F = 1024: the FLOPs of gpt-small), both with the
  // 256-symbol byte vocabulary until a tokenizer sets vocab_size. Throws InvalidArgument
  // listing the names.
  static LlamaConfig preset(const std::string& name);
  static std::vector<std::string> preset_names();
  static bool is_preset(const std::string& name);
  // Throws InvalidArgument naming the field (as a model.* config key) when inconsistent.
  void validate() const;
  // Throws InvalidArgument naming the field when the model cannot be split across `tp` ranks:
  // n_head, intermediate_size and padded_vocab must divide; n_kv_head must be a multiple of tp,
  // or tp a multiple of n_kv_head (then each KV head is held by tp / n_kv_head consecutive
  // ranks, whose query heads are the ones that use it: Megatron-LM's and vLLM's replication).
  void validate_tp(int tp) const;

  int head_size() const { return head_dim > 0 ? head_dim : n_embd / n_head; }
  std::int64_t num_parameters() const;
  std::int64_t num_parameters_per_rank(int tp) const;
  // Training FLOPs per token at sequence length seq: 6 per weight of every matmul (q, k, v, o,
  // gate, up, down, the LM head; not the embedding lookup when untied) plus attention's
  // 12 x layers x n_head x head_dim x seq (queries see every key: GQA saves memory, not FLOPs).
  double training_flops_per_token(int seq) const;
  std::string str() const;
};

// Memory of one rank, as estimate_memory(GPTConfig, ...) says it for GPT (same fields and
// meaning), for the whole model on one pipeline stage with one micro-batch in flight.
// sequence_parallel (with tp > 1): the RMSNorm and residual activations and their statistics
// are a 1/tp token shard, plus two [batch, seq, C] workspaces.
MemoryEstimate estimate_memory(const LlamaConfig& cfg, const PrecisionPolicy& policy, int batch,
                               int seq, int tp = 1, int dp = 1, bool zero = false,
                               bool sequence_parallel = false);

// The layers a model object holds: [first_layer, last_layer); -1 as last_layer means n_layer.
struct LlamaStage {
  int first_layer = 0;
  int last_layer = -1;
};

class Llama {
 public:
  // With a TP group of K > 1 ranks this rank holds its shard of every split parameter and the
  // passes are collective over the group (as GPT); with fewer KV heads than ranks the
  // constructor is collective too (it splits the ranks sharing a KV head off the group).
  // A group with sequence parallelism shards the residual stream and the RMSNorms over its
  // ranks' tokens as GPT does (models/README.md); decode() runs without it (one token). Only
  // the whole model runs it: a stage boundary on the token shard is not defined for this family
  // yet. `micro_batches` activation slots are kept (allocated on first use of each slot).
  // Throws InvalidArgument for a config or a stage that cannot be built.
  Llama(const LlamaConfig& cfg, const PrecisionPolicy& policy, Device& device = cpu_device(),
        parallel::TPGroup tp = {}, LlamaStage stage = {}, int micro_batches = 1);

  const LlamaConfig& config() const { return cfg_; }
  const PrecisionPolicy& policy() const { return policy_; }
  Device& device() const { return *device_; }
  const parallel::TPGroup& tp() const { return tp_; }
  int first_layer() const { return first_; }
  int last_layer() const { return last_; }
  bool has_embedding() const { return first_ == 0; }
  bool has_head() const { return last_ == cfg_.n_layer; }
  int micro_batches() const { return static_cast<int>(slots_.size()); }

  // Names (Hugging Face's), shapes, offsets and shards of this stage's parameters, in flat
  // order: model.embed_tokens (first stage), then per layer input_layernorm, q/k/v_proj
  // weights, their biases (qkv_bias), o_proj (and its bias), post_attention_layernorm,
  // gate/up/down_proj; then model.norm and lm_head (last stage; lm_head only when untied). The
  // last stage of a split model with tied embeddings holds its own copy of
  // model.embed_tokens.weight first, at offset 0 (Megatron's way, and GPT's place for it;
  // ParamSlot::tied_copy; its grads-ready range comes last): a pipeline schedule must sum the
  // two copies' gradients (tied_embedding_slot()).
  const std::vector<ParamInfo>& params() const { return params_; }
  static std::vector<ParamInfo> param_layout(const LlamaConfig& cfg, int tp = 1,
                                             LlamaStage stage = {});
  std::int64_t num_parameters() const { return num_params_; }
  std::int64_t vocab_start() const { return vocab_start_; }
  // The slot of the embedding copy the last stage of a split tied model holds, or -1.
  int tied_embedding_slot() const { return tied_copy_; }

  // Hugging Face's initialisation (normal(0, 0.02) for every weight, zero biases, unit norm
  // weights, zero padding rows), each full tensor drawn from (seed, its index in the whole
  // model's TP = 1 layout) and cut to the shard: every TP and PP layout trains the same model.
  Tensor initial_weights(std::uint64_t seed) const;
  void set_weights(const Tensor& weights);
  void init_weights(std::uint64_t seed) { set_weights(initial_weights(seed)); }

  Tensor& flat_params() { return params_flat_; }
  Tensor& flat_grads() { return grads_flat_; }
  Tensor param(std::size_t i) const;
  Tensor grad(std::size_t i) const;

  // ---- the whole model, one micro-batch (GPT's surface) ------------------------------------
  // forward_micro(0, tokens, targets) / backward_micro(0, ...): see there.
  float forward(const Tensor& tokens, const Tensor& targets = Tensor()) {
    return forward_micro(0, tokens, targets);
  }
  void backward(float loss_multiplier = 1.0f) { backward_micro(0, loss_multiplier); }
  // Logits of the last forward of slot 0 (last stage), [B, T, padded_vocab / TP].
  const Tensor& logits() const { return slots_.at(0).logits; }
  const Tensor& losses() const { return slots_.at(0).losses; }

  // ---- stages and micro-batches -------------------------------------------------------------
  // Forward of one micro-batch in activation slot `micro` (0 <= micro < micro_batches()).
  // input: int32 tokens [B, T] on the first stage, else the previous stage's hidden states
  // [B, T, C] (activation dtype, any device: copied in). targets (last stage only; int32
  // [B, T], negative = ignored): returns the mean loss over counted targets; without targets
  // (or on a stage without the head) returns NaN. The slot keeps the activations until its
  // backward_micro; a slot must not be reused before then unless its forward had no targets.
  float forward_micro(int micro, const Tensor& input, const Tensor& targets = Tensor());
  // The hidden states this stage hands to the next one after forward_micro(micro): [B, T, C],
  // owned by the slot (valid until its next forward).
  const Tensor& output_hidden(int micro) const;
  // Backward of slot `micro`. On the last stage the gradient starts from the slot's loss (mean
  // over its counted targets, x loss_multiplier) and doutput is ignored; on other stages
  // doutput is the next stage's input gradient [B, T, C] and loss_multiplier is ignored.
  // Gradients are ACCUMULATED into flat_grads(), with grads-ready calls as GPT's.
  void backward_micro(int micro, float loss_multiplier = 1.0f, const Tensor& doutput = Tensor());
  // The gradient of this stage's input hidden states after backward_micro(micro) on a stage
  // without the embedding: [B, T, C], valid until the next backward.
  const Tensor& input_grad() const { return dresidual_; }

  void zero_grads() { grads_flat_.zero_(); }
  using GradsReadyHook = std::function<void(std::int64_t begin, std::int64_t end)>;
  void set_grads_ready_hook(GradsReadyHook hook) { grads_ready_ = std::move(hook); }

  // KV-cached decoding of one sequence (whole model only): the fp32 logits of the real
  // vocabulary for the token after `token`, run at position cache_length(). The cache grows
  // as needed up to block_size positions and stores only the KV heads.
  std::vector<float> decode(std::int32_t token);
  void reset_cache() { cache_len_ = 0; }
  int cache_length() const { return cache_len_; }

  std::int64_t activation_bytes() const;

 private:
  struct Layer {
    int ln1 = 0, q_w = 0, k_w = 0, v_w = 0, q_b = -1, o_w = 0, o_b = -1, ln2 = 0, gate = 0, up = 0,
        down = 0;
  };
  struct LayerActs {
    // input of the layer [B, T, C]; this and ln1, residual2, ln2, the rstds: the token shard
    // [B T / K, C] under sequence parallelism
    Tensor residual;
    Tensor ln1, ln1_rstd, qkv, atty, lse, residual2, ln2, ln2_rstd, gateup, swi;
  };
  struct Slot {
    int batch = 0, seq = 0;
    bool have_targets = false;
    float valid_targets = 0;
    Tensor tokens, targets;
    std::vector<LayerActs> acts;
    Tensor residual_out, lnf, lnf_rstd, logits, losses, lse;
    // Under TP both keep state from forward to backward: one per slot.
    parallel::VocabParallelEmbedding embedding;
    parallel::VocabParallelCrossEntropy cross_entropy;
  };
  struct Indices {
    int embed = -1, norm = -1, head = -1, tied_copy = -1;
    std::vector<Layer> layers;  // this stage's layers
  };
  static std::vector<ParamInfo> build_layout(const LlamaConfig& cfg, int tp, LlamaStage stage,
                                             Indices* idx);
  void ensure_slot(Slot& s, int batch, int seq);
  void ensure_scratch(int batch, int seq);
  void ensure_rope(int positions);
  // The fused [q|k|v] weight or bias (three adjacent slots) and [gate|up] weight as one view.
  Tensor fused(int first_slot, int count) const;
  Tensor fused_grad(int first_slot, int count) const;
  const Tensor& head_weight() const;
  // The fused q|k|v projection's backward (dln_ and the layer's q/k/v gradients), summing the
  // k/v gradients over the ranks that share a KV head when there are fewer KV heads than ranks.
  void qkv_backward(const Layer& L, const LayerActs& x);

  LlamaConfig cfg_;
  PrecisionPolicy policy_;
  Device* device_;
  parallel::TPGroup tp_;
  int first_ = 0, last_ = 0;
  int heads_ = 0, kv_heads_ = 0, ffn_ = 0;   // this rank's
  std::int64_t q_width_ = 0, kv_width_ = 0;  // this rank's H D and KV D
  std::int64_t vocab_start_ = 0;
  parallel::VocabParallelEmbedding dec_embedding_;
  std::vector<ParamInfo> params_;
  std::int64_t num_params_ = 0;
  int embed_ = -1, norm_ = -1, head_ = -1, tied_copy_ = -1;
  std::vector<Layer> layers_;
  Tensor params_flat_, grads_flat_;
  Tensor head_w_;  // view of the LM head's weight (lm_head, or the tied embedding)
  GradsReadyHook grads_ready_;
  // With fewer KV heads than TP ranks: the tp / n_kv_head consecutive ranks that hold this
  // rank's KV head (split from the TP group), and the fp32 scratch of one micro-batch's fused
  // q|k|v weight and bias gradients, summed over it. Null otherwise.
  std::unique_ptr<comm::Communicator> kv_group_;
  Tensor kv_dw_, kv_db_;

  std::vector<Slot> slots_;
  Tensor rope_;  // fp32 [positions, head_dim]
  // Backward scratch, shared by the slots.
  int scratch_b_ = 0, scratch_t_ = 0;
  Tensor dresidual_, dln_, datty_, dqkv_, dgateup_, dswi_;
  // Sequence parallelism (tp_.sequence_parallel()): dresidual_ and dln_ (and the slots' norm and
  // residual activations) hold this rank's token shard [B T / K, C]; these hold every token, as
  // GPT's: sp_x_ [B, T, C] the all-gathered input of a column-parallel layer (in forward, and
  // again in backward for its weight gradient), a row-parallel layer's partial output before
  // the reduce-scatter, and the all-gathered output gradient of a row-parallel layer; sp_dx_
  // [B, T, C] a column-parallel layer's partial input gradient before the reduce-scatter;
  // sp_norm_grad_ fp32 [C] one RMSNorm's weight gradient of this micro-batch's shard.
  Tensor sp_x_, sp_dx_, sp_norm_grad_;
  // rmsnorm_backward into dresidual_ from dln_; under sequence parallelism the weight gradient
  // of this rank's tokens is summed over the group (parallel::accumulate_group_sum).
  void rmsnorm_backward(int w, const Tensor& x, const Tensor& rstd, bool accumulate_dx);
  // Decoding.
  std::vector<Tensor> k_cache_, v_cache_;
  int cache_cap_ = 0;
  Tensor dec_token_, dec_x_, dec_ln_, dec_rstd_, dec_qkv_, dec_atty_, dec_tmp_, dec_gateup_,
      dec_swi_, dec_logits_, dec_logits_full_;
  int cache_len_ = 0;
};

}  // namespace meshtrain::models
