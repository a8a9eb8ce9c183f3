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
#include "parallel/pipeline.hpp"
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
// The parameter, gradient and optimizer fields of a MemoryEstimate for `n` parameters on one
// rank (activations 0): compute parameters in policy.param, fp32 gradients, and the fp32 master
// weights (16-bit policies) and AdamW moments, of every parameter or, with ZeRO-1 over dp > 1
// ranks, of a ceil(n / dp) shard, with the shard-sized reduce-scatter buffer. Both families'
// estimates, whole and per pipeline stage, start from it.
MemoryEstimate parameter_memory(std::int64_t n, const PrecisionPolicy& policy, int dp, bool zero);
// Memory of one rank for a micro-batch of [batch, seq], with the model split across `tp`
// tensor-parallel ranks (1: the whole model), as GPT and the optimizer allocate it. Data
// parallelism over `dp` ranks changes nothing per rank, but for ZeRO-1 (zero, train.zero = 1,
// parallel/optimizer.hpp): the fp32 master weights (16-bit policies) and the AdamW state exist
// only as this rank's 1/dp shard, and the averaged gradients are reduce-scattered into a
// shard-sized buffer; the model keeps its whole parameters and gradients (backward writes
// every gradient). Buckets are cut at multiples of dp, so a shard is ceil(n / dp) elements, up
// to one more per bucket. sequence_parallel (with tp > 1): the LayerNorm and residual
// activations and their statistics are a 1/tp token shard, plus two [batch, seq, C] workspaces.
MemoryEstimate estimate_memory(const GPTConfig& cfg, const PrecisionPolicy& policy, int batch,
                               int seq, int tp = 1, int dp = 1, bool zero = false,
                               bool sequence_parallel = false);

// The same for one pipeline stage (parallel/pipeline.hpp) that keeps `in_flight` micro-batches
// of activations alive (1F1B: P - stage; GPipe: every micro-batch): its parameters (a head-only
// stage counts its tied copy of wte), their optimizer state, and in_flight x its layers'
// activations (the head's logits on the last stage) plus one set of backward scratch.
MemoryEstimate estimate_stage_memory(const GPTConfig& cfg, const PrecisionPolicy& policy, int batch,
                                     int seq, int tp, int dp, bool zero,
                                     const parallel::StageRange& stage, int in_flight,
                                     bool sequence_parallel = false);

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
  //
  // Pipeline parallelism: `stage` (parallel/pipeline.hpp) makes this object one stage of the
  // model: layers [first_layer, last_layer), the embeddings (wte, wpe) when stage.embedding, and
  // ln_f, the LM head and the loss when stage.head. A head stage without the embedding holds a
  // copy of wte for its LM head (ParamSlot::tied_copy, drawn from the same seed, so that the
  // copies start equal); its gradient must be summed with the first stage's (the embedding
  // group) before the update, which keeps them equal. An interleaved stage (stage.chunks: V
  // non-contiguous layer ranges) holds every chunk's layers in one flat buffer, chunk after
  // chunk; forward_micro/backward_micro run one chunk at a time, the embedding with chunk 0 and
  // the head with the last. The default stage is the whole model,
  // whose layout, arithmetic and speed are those of a model built without one.
  GPT(const GPTConfig& cfg, const PrecisionPolicy& policy, Device& device = cpu_device(),
      parallel::TPGroup tp = {}, parallel::StageRange stage = {});

  const GPTConfig& config() const { return cfg_; }
  const PrecisionPolicy& policy() const { return policy_; }
  Device& device() const { return *device_; }
  const std::vector<ParamInfo>& params() const { return params_; }
  // What params() of a model of cfg split over `tp` tensor-parallel ranks holds (names, shapes,
  // offsets, shards), computed without allocating the model: readers check files against it
  // before anything the size of the model is allocated. Throws InvalidArgument as the
  // constructor does for a config it cannot build.
  static std::vector<ParamInfo> param_layout(const GPTConfig& cfg, int tp = 1,
                                             parallel::StageRange stage = {});
  // This object's part of the model (the whole model: every layer, embedding and head).
  const parallel::StageRange& stage() const { return stage_; }
  // Whether this object is the whole model (not one pipeline stage of it).
  bool is_whole() const {
    return stage_.embedding && stage_.head && stage_.first_layer == 0 &&
           stage_.last_layer == cfg_.n_layer && stage_.num_chunks() == 1;
  }
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
  const Tensor& logits() const { return micro_.empty() ? none_ : micro_[0].logits; }
  // Per-token fp32 losses of the last forward with targets.
  const Tensor& losses() const { return micro_.empty() ? none_ : micro_[0].losses; }
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

  // ---- pipeline stages: one micro-batch at a time, in activation slots -----------------------
  //
  // forward()/backward() above are slot 0 of a whole model. A stage keeps the activations of
  // each micro-batch in flight in its own slot (slot s holds [B, T] activations from its forward
  // to its backward; the executor in parallel/pipeline.hpp picks slot = micro % slots).
  // The boundary between stages is the residual stream [B, T, C] in the activation dtype.
  //
  // Forward of one micro-batch in `slot`. tokens: [B, T] int32 (read by the embedding stage;
  // any stage uses its shape); targets: as forward() (read by the head stage). A stage without
  // the embedding reads its input from stage_input(slot, B, T). tokens and targets must not
  // change until the slot's backward. Returns the mean loss on the head stage, NaN elsewhere.
  // chunk: which of the stage's model chunks runs (stage().chunks; interleaved pipelines), its
  // layers only; the embedding belongs to chunk 0 and the head to the last chunk. A slot holds
  // one chunk's activations at a time.
  float forward_micro(int slot, const Tensor& tokens, const Tensor& targets, int chunk = 0);
  // Backward of the slot's forward. output_grad: the gradient of stage_output(slot) (stages
  // without the head; ignored on the head stage, which starts from its loss). Gradients
  // accumulate into flat_grads() as backward() does, and the grads-ready hook is called the same
  // way (a head stage without the embedding reports its wte copy last, as offset 0).
  // chunk: the one the slot's forward ran.
  void backward_micro(int slot, float loss_multiplier, const Tensor& output_grad, int chunk = 0);
  // The buffer the slot's input activations are received into ([B, T, C], allocating the
  // slot for that shape), for a stage without the embedding.
  Tensor stage_input(int slot, int batch, int seq);
  // The slot's output activations after forward_micro (a stage without the head).
  Tensor stage_output(int slot) const;
  // After backward_micro on a stage without the embedding: the gradient of its input,
  // [B, T, C], valid until the next backward.
  const Tensor& input_grad() const { return dresidual_; }

 private:
  struct Layer {
    int ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, fcproj_w, fcproj_b;
  };
  struct LayerActs {
    Tensor residual;  // input of the layer [B, T, C]
    Tensor ln1, ln1_mean, ln1_rstd, qkv, atty, lse, residual2, ln2, ln2_mean, ln2_rstd, fch,
        fch_gelu;
  };
  // One micro-batch's activations (a pipeline slot): what backward reads.
  struct Micro {
    int batch = 0, seq = 0;
    std::vector<LayerActs> layers;
    bool have_targets = false;
    float valid_targets = 0;
    Tensor tokens, targets;
    // residual_out: the stream after the last layer (the stage output); the rest on the head.
    Tensor residual_out, lnf, lnf_mean, lnf_rstd, logits, losses, lse;
    // Under TP, per micro-batch: they keep the ids and statistics backward needs.
    parallel::VocabParallelEmbedding embedding;
    parallel::VocabParallelCrossEntropy cross_entropy;
  };
  Micro& ensure_activations(int slot, int batch, int seq);
  void ensure_head(Micro& mb);
  void ensure_scratch(int batch, int seq);
  // Where the parameters the forward and backward passes use sit in params().
  struct Indices {
    int wte = 0, wpe = 0, lnf_w = 0, lnf_b = 0;
    std::vector<Layer> layers;
    // Each parameter's index in the whole model's params() (what initialisation draws from).
    std::vector<int> global;
  };
  static std::vector<ParamInfo> build_layout(const GPTConfig& cfg, int tp,
                                             parallel::StageRange stage, Indices* idx);

  GPTConfig cfg_;
  PrecisionPolicy policy_;
  Device* device_;
  parallel::TPGroup tp_;
  parallel::StageRange stage_;
  int heads_ = 0;  // heads on this rank: n_head / TP
  std::int64_t vocab_start_ = 0;
  parallel::VocabParallelEmbedding dec_embedding_;
  std::vector<ParamInfo> params_;
  std::int64_t num_params_ = 0;
  int wte_ = 0, wpe_ = 0, lnf_w_ = 0, lnf_b_ = 0;
  std::vector<Layer> layers_;  // this stage's layers, first to last (chunk after chunk)
  int chunk_layers_ = 0;       // layers per chunk: layers_.size() / stage_.num_chunks()
  std::vector<int> global_;
  Tensor params_flat_, grads_flat_;
  GradsReadyHook grads_ready_;

  // Activations per slot, each for its [B, T]; reused across steps of the same shape.
  std::vector<Micro> micro_;
  Tensor none_;  // logits() and losses() before any forward
  // Backward scratch, shared by the slots, for [scratch_batch_, scratch_seq_].
  int scratch_batch_ = 0, scratch_seq_ = 0;
  Tensor dresidual_, dln_, datty_, dqkv_, dfch_;
  // Sequence parallelism (tp_.sequence_parallel()): the norm and residual activations above,
  // dresidual_ and dln_ hold this rank's token shard [B T / K, C]; these hold every token:
  // sp_x_ [B, T, C] the all-gathered input of a column-parallel layer (forward, and again in
  // backward for its weight gradient), a row-parallel layer's partial output before the
  // reduce-scatter, and the all-gathered output gradient of a row-parallel layer; sp_dx_
  // [B, T, C] a column-parallel layer's partial input gradient before the reduce-scatter;
  // sp_norm_grads_ fp32 [2C] one LayerNorm's weight and bias gradient of this micro-batch's
  // shard, summed over the group before it joins the accumulated gradients.
  Tensor sp_x_, sp_dx_, sp_norm_grads_;
  // Under sequence parallelism: layernorm_backward of this rank's tokens, its weight and bias
  // gradients (parameters w and w + 1, adjacent) summed over the TP group, then accumulated.
  void layernorm_backward_sp(Tensor& dx, int w, const Tensor& dy, const Tensor& x,
                             const Tensor& mean, const Tensor& rstd, bool accumulate_dx);
  // Decoding: per-layer key and value caches [1, block_size, C] and one position's buffers.
  std::vector<Tensor> k_cache_, v_cache_;
  Tensor dec_token_, dec_x_, dec_ln_, dec_mean_, dec_rstd_, dec_qkv_, dec_atty_, dec_tmp_, dec_fch_,
      dec_fch_gelu_, dec_logits_, dec_logits_full_;
  int cache_len_ = 0;
};

}  // namespace meshtrain::models
