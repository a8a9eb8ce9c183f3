#include "models/decoder.hpp"

#include "runtime/error.hpp"

namespace meshtrain::models {

std::vector<std::string> ModelConfig::preset_names() {
  std::vector<std::string> out = GPTConfig::preset_names();
  for (const std::string& n : LlamaConfig::preset_names()) out.push_back(n);
  return out;
}

ModelConfig ModelConfig::preset(const std::string& name) {
  ModelConfig c;
  if (LlamaConfig::is_preset(name)) {
    c.llama = LlamaConfig::preset(name);
    c.arch = c.llama.arch;
    return c;
  }
  for (const std::string& n : GPTConfig::preset_names()) {
    if (n == name) {
      c.gpt = GPTConfig::preset(name);
      return c;
    }
  }
  std::string names;
  for (const std::string& n : preset_names()) names += (names.empty() ? "" : ", ") + n;
  MT_FAIL("unknown model preset '{}': expected one of {}", name, names);
}

void ModelConfig::validate() const {
  MT_CHECK(arch == "gpt2" || arch == "llama" || arch == "qwen2",
           "model.arch '{}': expected gpt2, llama or qwen2", arch);
  if (is_gpt()) {
    gpt.validate();
  } else {
    MT_ASSERT(llama.arch == arch, "ModelConfig arch {} vs llama.arch {}", arch, llama.arch);
    llama.validate();
  }
}

void ModelConfig::validate_tp(int tp) const {
  if (is_gpt()) {
    gpt.validate_tp(tp);
  } else {
    llama.validate_tp(tp);
  }
}

ModelConfig ModelConfig::unsplit() const {
  ModelConfig c = *this;
  if (c.is_gpt()) {
    c.gpt.padded_vocab = GPTConfig::pad_vocab(c.gpt.vocab_size);
  } else {
    c.llama.padded_vocab = GPTConfig::pad_vocab(c.llama.vocab_size);
  }
  return c;
}

namespace {

// A StageRange with last_layer resolved, checked against the model: the embedding and head
// flags are what the layer range says (a Llama stage derives them from its layers).
parallel::StageRange resolved(const ModelConfig& cfg, parallel::StageRange stage) {
  if (stage.last_layer < 0) stage.last_layer = cfg.n_layer();
  MT_CHECK(stage.first_layer >= 0 && stage.first_layer < stage.last_layer &&
               stage.last_layer <= cfg.n_layer(),
           "pipeline stage: layers [{}, {}) are not a non-empty range of the model's {} layers "
           "(model.n_layer)",
           stage.first_layer, stage.last_layer, cfg.n_layer());
  MT_CHECK(stage.embedding == (stage.first_layer == 0) &&
               stage.head == (stage.last_layer == cfg.n_layer()),
           "pipeline stage [{}, {}) of {} layers: the embedding belongs to the stage of layer 0 "
           "and the head to the stage of the last layer (parallel::stage_range)",
           stage.first_layer, stage.last_layer, cfg.n_layer());
  return stage;
}

// A Llama stage is one contiguous block of layers: interleaved model chunks are GPT's only
// (launch/config.cpp refuses pp.schedule = "interleaved" for the family first, by key).
void check_llama_contiguous(const parallel::StageRange& stage, const std::string& arch) {
  MT_CHECK(stage.num_chunks() == 1,
           "a {} pipeline stage holds one contiguous block of layers: {} model chunks "
           "(pp.virtual_stages > 1, the interleaved schedule) are implemented for gpt2 only",
           arch, stage.num_chunks());
}

}  // namespace

std::vector<ParamInfo> ModelConfig::param_layout(int tp, parallel::StageRange stage) const {
  if (is_gpt()) return GPT::param_layout(gpt, tp, stage);
  const parallel::StageRange r = resolved(*this, stage);
  check_llama_contiguous(r, llama.arch);
  return Llama::param_layout(llama, tp, LlamaStage{r.first_layer, r.last_layer});
}

MemoryEstimate estimate_memory(const ModelConfig& cfg, const PrecisionPolicy& policy, int batch,
                               int seq, int tp, int dp, bool zero, bool sequence_parallel) {
  return cfg.is_gpt()
             ? estimate_memory(cfg.gpt, policy, batch, seq, tp, dp, zero, sequence_parallel)
             : estimate_memory(cfg.llama, policy, batch, seq, tp, dp, zero, sequence_parallel);
}

MemoryEstimate estimate_stage_memory(const LlamaConfig& cfg, const PrecisionPolicy& policy,
                                     int batch, int seq, int tp, int dp, bool zero,
                                     const parallel::StageRange& stage, int in_flight) {
  MT_CHECK(dp >= 1 && in_flight >= 1, "estimate_stage_memory: dp {} and in_flight {}", dp,
           in_flight);
  const parallel::StageRange r = resolved(ModelConfig(cfg), stage);
  // Parameters as the stage lays them out (a tied copy on the last stage included).
  const std::vector<ParamInfo> layout =
      Llama::param_layout(cfg, tp, LlamaStage{r.first_layer, r.last_layer});
  const std::int64_t n = parallel::flat_numel(layout, "estimate_stage_memory");
  MemoryEstimate m = parameter_memory(n, policy, dp, zero);
  // Activations as estimate_memory(LlamaConfig) counts them for the whole model with one slot
  // (layers x per_layer + final): one layer's share is the difference one more layer makes;
  // final holds the stage output (residual_out), the head's lnf, logits and three fp32 values
  // per token (losses, lse, rstd), and the backward scratch every stage has.
  LlamaConfig one = cfg, two = cfg;
  one.n_layer = 1;
  two.n_layer = 2;
  const std::int64_t a1 = estimate_memory(one, policy, batch, seq, tp, dp, zero).activations;
  const std::int64_t per_layer =
      estimate_memory(two, policy, batch, seq, tp, dp, zero).activations - a1;
  const std::int64_t bt = static_cast<std::int64_t>(batch) * seq, c = cfg.n_embd;
  const std::int64_t a = static_cast<std::int64_t>(dtype_size(policy.activation));
  const std::int64_t head = bt * c * a + bt * (cfg.padded_vocab / tp) * a + bt * 4 * 3;
  const std::int64_t scratch = a1 - per_layer - bt * c * a - head;
  std::int64_t slot = r.count() * per_layer + bt * c * a;
  if (r.head) slot += head;
  // A stage without the embedding also keeps each slot's received input.
  if (!r.embedding) slot += bt * c * a;
  m.activations = in_flight * slot + scratch;
  return m;
}

MemoryEstimate estimate_stage_memory(const ModelConfig& cfg, const PrecisionPolicy& policy,
                                     int batch, int seq, int tp, int dp, bool zero,
                                     const parallel::StageRange& stage, int in_flight,
                                     bool sequence_parallel) {
  return cfg.is_gpt()
             ? estimate_stage_memory(cfg.gpt, policy, batch, seq, tp, dp, zero, stage, in_flight,
                                     sequence_parallel)
             : estimate_stage_memory(cfg.llama, policy, batch, seq, tp, dp, zero, stage, in_flight);
}

Decoder::Decoder(const ModelConfig& cfg, const PrecisionPolicy& policy, Device& device,
                 parallel::TPGroup tp, parallel::StageRange stage, int slots)
    : cfg_(cfg) {
  cfg_.validate();
  MT_CHECK(slots >= 1, "Decoder: at least one activation slot, got {}", slots);
  stage_ = resolved(cfg_, stage);
  if (cfg_.is_gpt()) {
    // The stage as given: a whole GPT built without one keeps exactly its arithmetic.
    gpt_ = std::make_unique<GPT>(cfg_.gpt, policy, device, tp, stage);
  } else {
    check_llama_contiguous(stage_, cfg_.arch);
    llama_ = std::make_unique<Llama>(cfg_.llama, policy, device, tp,
                                     LlamaStage{stage_.first_layer, stage_.last_layer}, slots);
  }
  // Both families put the embedding first (offset 0) on the first stage, and the last stage's
  // copy of it, marked tied_copy, at offset 0 too.
  if (!is_whole() && cfg_.tied_embeddings()) {
    if (stage_.embedding) embedding_group_param_ = 0;
    for (std::size_t i = 0; i < params().size(); ++i)
      if (params()[i].tied_copy) embedding_group_param_ = static_cast<int>(i);
  }
  if (llama_ && !stage_.embedding) inputs_.resize(static_cast<std::size_t>(slots));
}

std::int64_t Decoder::activation_bytes() const {
  if (gpt_) return gpt_->activation_bytes();
  std::int64_t n = llama_->activation_bytes();
  for (const Tensor& t : inputs_)
    if (t.defined()) n += static_cast<std::int64_t>(t.nbytes());
  return n;
}

Tensor Decoder::stage_input(int slot, int batch, int seq) {
  if (gpt_) return gpt_->stage_input(slot, batch, seq);
  MT_CHECK(!stage_.embedding && slot >= 0 && slot < static_cast<int>(inputs_.size()),
           "stage_input: slot {} of a stage with {} input slots (the first stage reads tokens)",
           slot, inputs_.size());
  Tensor& in = inputs_[static_cast<std::size_t>(slot)];
  const Shape want{batch, seq, cfg_.llama.n_embd};
  if (!in.defined() || in.shape() != want)
    in = Tensor::empty(want, llama_->policy().activation, llama_->device());
  return in;
}

Tensor Decoder::stage_output(int slot) const {
  return gpt_ ? gpt_->stage_output(slot) : llama_->output_hidden(slot);
}

float Decoder::forward_micro(int slot, const Tensor& tokens, const Tensor& targets, int chunk) {
  if (gpt_) return gpt_->forward_micro(slot, tokens, targets, chunk);
  MT_ASSERT(chunk == 0, "a Llama stage has one model chunk, not chunk {}", chunk);
  if (stage_.embedding)
    return llama_->forward_micro(slot, tokens, stage_.head ? targets : Tensor());
  MT_CHECK(slot >= 0 && slot < static_cast<int>(inputs_.size()) &&
               inputs_[static_cast<std::size_t>(slot)].defined(),
           "forward_micro: slot {} has received no input (stage_input first)", slot);
  return llama_->forward_micro(slot, inputs_[static_cast<std::size_t>(slot)],
                               stage_.head ? targets : Tensor());
}

void Decoder::backward_micro(int slot, float loss_multiplier, const Tensor& output_grad,
                             int chunk) {
  if (gpt_) {
    gpt_->backward_micro(slot, loss_multiplier, output_grad, chunk);
  } else {
    MT_ASSERT(chunk == 0, "a Llama stage has one model chunk, not chunk {}", chunk);
    llama_->backward_micro(slot, loss_multiplier, stage_.head ? Tensor() : output_grad);
  }
}

}  // namespace meshtrain::models
