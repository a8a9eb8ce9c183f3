// The GPT-2 family: pre-LayerNorm blocks, learned position embeddings, a tied input/output
// embedding, a 4x GELU MLP and causal attention, built from runtime ops.
//
// Parameters live in one flat buffer in the compute dtype, gradients in one flat fp32 buffer,
// both in the order of params(): embeddings first, then layer by layer, then the final
// LayerNorm. Flat buffers are what gradient buckets, ZeRO shards and checkpoints are cut from.
// The fp32 master weights that 16-bit policies update are the optimizer's
// (parallel/optimizer.hpp); the model is given weights (set_weights) and computes with their
// rounding.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "parallel/flat_layout.hpp"
#include "parallel/tensor_parallel.hpp"
#include "runtime/precision.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain::models {

struct GPTConfig {
  int n_layer = 6;
  int n_head = 6;
  int n_embd = 384;
  int block_size = 256;    // maximum sequence length (rows of wpe)
  int vocab_size = 256;    // real vocabulary
  int padded_vocab = 256;  // rows of wte: vocab_size rounded up to a multiple of 128

  // gpt2 (124M), gpt2-medium (350M), gpt2-large (774M), gpt2-xl (1.5B) with GPT-2's 50257
  // tokens; gpt-small (6 x 384, 6 heads) and gpt-tiny (2 x 64, 4 heads) with the 256-symbol
  // byte vocabulary, for CPUs and tests. Throws InvalidArgument listing the names.
  static GPTConfig preset(const std::string& name);
  static std::vector<std::string> preset_names();
  // Rounds vocab_size up to a multiple of `multiple` (128 by default, so that the LM-head
  // matmul has friendly shapes; with tensor parallelism, a multiple of 128 x TP).
  static int pad_vocab(int vocab_size, int multiple = 128);
  // Throws InvalidArgument naming the field when the config is inconsistent.
  void validate() const;
  // Throws InvalidArgument naming the field when the model cannot be split across `tp`
  // tensor-parallel ranks: heads (and so width and MLP width) and padded_vocab must divide.
  void validate_tp(int tp) const;

  int head_size() const { return n_embd / n_head; }
  // Every parameter, including the position embedding and the tied embedding once.
  std::int64_t num_parameters() const;
  // Parameters one rank holds under tensor parallelism over `tp` ranks: a 1/tp shard of the
  // split ones plus every replicated one (LayerNorms, row-parallel biases, wpe).
  std::int64_t num_parameters_per_rank(int tp) const;
  // Training FLOPs per token at sequence length seq (forward + backward: 6 per parameter
  // multiply-add, plus attention's 12 x layers x width x seq, as in PaLM's appendix B / llm.c).
  double training_flops_per_token(int seq) const;
  std::string str() const;
};

struct MemoryEstimate {
  std::int64_t parameters = 0;  // bytes
  std::int64_t gradients = 0;
  std::int64_t master_weights = 0;
  std::int64_t optimizer_state = 0;
  std::int64_t gradient_shard = 0;  // ZeRO-1: the averaged gradients this rank updates with
  std::int64_t activations = 0;     // per micro-batch, kept for backward
  // Elements of master weights and of each AdamW moment this rank holds: every parameter, or
  // its ZeRO-1 shard.
  std::int64_t optimizer_elements = 0;
  std::int64_t total() const {
    return parameters + gradients + master_weights + optimizer_state + gradient_shard + activations;
  }
};
// Memory of one rank for a micro-batch of [batch, seq], with the model split across `tp`
// tensor-parallel ranks (1: the whole model), as GPT and the optimizer allocate it. Data
// parallelism over `dp` ranks changes nothing per rank, but for ZeRO-1 (zero, train.zero = 1,
// parallel/optimizer.hpp): the fp32 master weights (16-bit policies) and the AdamW state exist
// only as this rank's 1/dp shard, and the averaged gradients are reduce-scattered into a
// shard-sized buffer; the model keeps its whole parameters and gradients (backward writes
// every gradient). Buckets are cut at multiples of dp, so a shard is ceil(n / dp) elements, up
// to one more per bucket.
MemoryEstimate estimate_memory(const GPTConfig& cfg, const PrecisionPolicy& policy, int batch,
                               int seq, int tp = 1, int dp = 1, bool zero = false);

// A parameter's place in the flat buffers and its TP sharding (parallel/flat_layout.hpp): names
// are Hugging Face GPT-2's ("wte.weight", "h.0.attn.c_attn.weight", ...), shapes ours (linear
// weights are [out, in], as nn.Linear, not HF's Conv1D [in, out]), decay on 2-D weights only.
// Which tensors split (parallel/tensor_parallel.hpp): wte along 0 (vocab rows), c_attn weight and
// bias along 0 in 3 parts, mlp.c_fc weight and bias along 0, both c_proj weights along 1; the
// rest is replicated. wte's full_shape[0] is padded_vocab, which depends on the layout (a
// multiple of 128 x TP): its rows from vocab_size on (real_rows) are zero, so resharding wte
// across layouts copies the first vocab_size rows and zero-fills the rest.
using ParamInfo = parallel::ParamSlot;

class GPT {
 public:
  // With a TP group of K > 1 ranks, this rank holds its shard of every split parameter (see
  // ParamInfo) and forward, backward and decode are collective over the group: every rank of it
  // calls them in the same order on the same tokens. Throws InvalidArgument (validate_tp) when
  // the model cannot be split K ways. The group's communicator must outlive the model.
  GPT(const GPTConfig& cfg, const PrecisionPolicy& policy, Device& device = cpu_device(),
      parallel::TPGroup tp = {});

  const GPTConfig& config() const { return cfg_; }
  const PrecisionPolicy& policy() const { return policy_; }
  Device& device() const { return *device_; }
  const std::vector<ParamInfo>& params() const { return params_; }
  // What params() of a model of cfg split over `tp` tensor-parallel ranks holds (names, shapes,
  // offsets, shards), computed without allocating the model: readers check files against it
  // before anything the size of the model is allocated. Throws InvalidArgument as the
  // constructor does for a config it cannot build.
  static std::vector<ParamInfo> param_layout(const GPTConfig& cfg, int tp = 1);
  // Parameters this rank holds (all of them at TP = 1).
  std::int64_t num_parameters() const { return num_params_; }
  const parallel::TPGroup& tp() const { return tp_; }
  // First row of the padded vocabulary this rank's wte shard holds.
  std::int64_t vocab_start() const { return vocab_start_; }

  // GPT-2 initialisation from (seed, stream = parameter index): normal(0, 0.02) weights,
  // residual projections (attn.c_proj, mlp.c_proj) scaled by 1/sqrt(2 x layers), zero biases,
  // unit LayerNorm weights, zero padding rows of wte; as fp32 flat weights laid out as params(),
  // on the model's device. Identical on every rank and device for one seed; under TP each rank
  // gets its shard of the full model's values (the same model as at TP = 1).
  Tensor initial_weights(std::uint64_t seed) const;
  // Writes the compute parameters from fp32 flat weights laid out as params() (any device):
  // their rounding to the compute dtype, a copy under fp32.
  void set_weights(const Tensor& weights);
  // set_weights(initial_weights(seed)): a model to run without an optimizer (tests, sampling).
  void init_weights(std::uint64_t seed) { set_weights(initial_weights(seed)); }

  // Flat buffers: compute parameters and fp32 gradients. param(i) and grad(i) are views of
  // parameter i shaped as params()[i].shape.
  Tensor& flat_params() { return params_flat_; }
  Tensor& flat_grads() { return grads_flat_; }
  Tensor param(std::size_t i) const;
  Tensor grad(std::size_t i) const;

  // Forward on tokens [B, T] (int32). With targets ([B, T], negative = ignore), computes the
  // per-token losses and returns their mean over counted targets; without, returns NaN and
  // leaves logits() ready. Activations are kept for backward.
  float forward(const Tensor& tokens, const Tensor& targets = Tensor());
  // Logits of the last forward, [B, T, padded_vocab / TP] (this rank's vocabulary columns).
  // Overwritten by backward.
  const Tensor& logits() const { return logits_; }
  // Per-token fp32 losses of the last forward with targets.
  const Tensor& losses() const { return losses_; }
  // Backward of the last forward with targets. Gradients are ACCUMULATED into flat_grads(),
  // of (mean loss) x loss_multiplier: pass 1 / accumulation steps (x the loss scale under fp16).
  void backward(float loss_multiplier = 1.0f);
  void zero_grads() { grads_flat_.zero_(); }
  // Called by backward each time the gradients of flat elements [begin, end) are final for this
  // backward: the final LayerNorm, then each layer's weight-and-bias pairs from the last layer's
  // MLP projection to the first layer's ln_1, then the embeddings (wte is also written by the LM
  // head, so it is final only at the end). The ranges tile the flat buffer, in decreasing
  // offsets. Several calls per layer give a reducer as many chances to progress communication. The
  // data-parallel reducer starts a bucket's reduction from here while backward goes on. Not called
  // when no target was counted.
  using GradsReadyHook = std::function<void(std::int64_t begin, std::int64_t end)>;
  void set_grads_ready_hook(GradsReadyHook hook) { grads_ready_ = std::move(hook); }

  // Incremental decoding of one sequence with a KV cache: decode(token) runs `token` at the
  // next position (cache_length()) and returns the fp32 logits of the real vocabulary for the
  // token after it. At most block_size positions; reset_cache() starts a new sequence. Under TP
  // every rank gets the whole vocabulary's logits (one row all-gathered).
  std::vector<float> decode(std::int32_t token);
  void reset_cache() { cache_len_ = 0; }
  int cache_length() const { return cache_len_; }

  // Bytes of activation buffers currently held.
  std::int64_t activation_bytes() const;

 private:
  struct Layer {
    int ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, fcproj_w, fcproj_b;
  };
  struct LayerActs {
    Tensor residual;  // input of the layer [B, T, C]
    Tensor ln1, ln1_mean, ln1_rstd, qkv, atty, lse, residual2, ln2, ln2_mean, ln2_rstd, fch,
        fch_gelu;
  };
  void ensure_activations(int batch, int seq);
  // Where the parameters the forward and backward passes use sit in params().
  struct Indices {
    int wte = 0, wpe = 0, lnf_w = 0, lnf_b = 0;
    std::vector<Layer> layers;
  };
  static std::vector<ParamInfo> build_layout(const GPTConfig& cfg, int tp, Indices* idx);

  GPTConfig cfg_;
  PrecisionPolicy policy_;
  Device* device_;
  parallel::TPGroup tp_;
  int heads_ = 0;  // heads on this rank: n_head / TP
  std::int64_t vocab_start_ = 0;
  parallel::VocabParallelEmbedding embedding_, dec_embedding_;
  parallel::VocabParallelCrossEntropy cross_entropy_;
  std::vector<ParamInfo> params_;
  std::int64_t num_params_ = 0;
  int wte_ = 0, wpe_ = 0, lnf_w_ = 0, lnf_b_ = 0;
  std::vector<Layer> layers_;
  Tensor params_flat_, grads_flat_;
  GradsReadyHook grads_ready_;

  // Activations for the current [B, T]; reused across steps of the same shape.
  int batch_ = 0, seq_ = 0;
  bool have_targets_ = false;
  float valid_targets_ = 0;
  Tensor tokens_, targets_;
  std::vector<LayerActs> acts_;
  Tensor residual_out_, lnf_, lnf_mean_, lnf_rstd_, logits_, losses_, lse_;
  // Backward scratch.
  Tensor dresidual_, dln_, datty_, dqkv_, dfch_;
  // Decoding: per-layer key and value caches [1, block_size, C] and one position's buffers.
  std::vector<Tensor> k_cache_, v_cache_;
  Tensor dec_token_, dec_x_, dec_ln_, dec_mean_, dec_rstd_, dec_qkv_, dec_atty_, dec_tmp_, dec_fch_,
      dec_fch_gelu_, dec_logits_, dec_logits_full_;
  int cache_len_ = 0;
};

}  // namespace meshtrain::models
