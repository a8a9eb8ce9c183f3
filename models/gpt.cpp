#include "models/gpt.hpp"

#include <cmath>
#include <limits>

#include "runtime/ops.hpp"
#include "runtime/rng.hpp"

namespace meshtrain::models {

GPTConfig GPTConfig::preset(const std::string& name) {
  GPTConfig c;
  auto gpt2 = [&](int layers, int heads, int width) {
    c.n_layer = layers;
    c.n_head = heads;
    c.n_embd = width;
    c.block_size = 1024;
    c.vocab_size = 50257;
    c.padded_vocab = pad_vocab(50257);
  };
  if (name == "gpt2") {
    gpt2(12, 12, 768);
  } else if (name == "gpt2-medium") {
    gpt2(24, 16, 1024);
  } else if (name == "gpt2-large") {
    gpt2(36, 20, 1280);
  } else if (name == "gpt2-xl") {
    gpt2(48, 25, 1600);
  } else if (name == "gpt-small") {
    c = GPTConfig{};
  } else if (name == "gpt-tiny") {
    c.n_layer = 2;
    c.n_head = 4;
    c.n_embd = 64;
    c.block_size = 64;
  } else {
    MT_FAIL(
        "unknown model preset '{}': expected one of gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
        "gpt-small, gpt-tiny",
        name);
  }
  return c;
}

std::vector<std::string> GPTConfig::preset_names() {
  return {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt-small", "gpt-tiny"};
}

int GPTConfig::pad_vocab(int vocab_size, int multiple) {
  MT_CHECK(multiple >= 1, "vocabulary padding multiple must be positive, got {}", multiple);
  return (vocab_size + multiple - 1) / multiple * multiple;
}

void GPTConfig::validate() const {
  MT_CHECK(n_layer >= 1, "model.n_layer must be at least 1, got {}", n_layer);
  MT_CHECK(n_head >= 1, "model.n_head must be at least 1, got {}", n_head);
  MT_CHECK(n_embd >= 1 && n_embd % n_head == 0,
           "model.n_embd ({}) must be a positive multiple of model.n_head ({})", n_embd, n_head);
  MT_CHECK(block_size >= 1, "model.block_size must be at least 1, got {}", block_size);
  MT_CHECK(vocab_size >= 2, "model.vocab_size must be at least 2, got {}", vocab_size);
  MT_CHECK(padded_vocab >= vocab_size, "model.padded_vocab ({}) is below model.vocab_size ({})",
           padded_vocab, vocab_size);
}

void GPTConfig::validate_tp(int tp) const {
  MT_CHECK(tp >= 1, "the tensor-parallel size must be at least 1, got {}", tp);
  if (tp == 1) return;
  MT_CHECK(n_head % tp == 0,
           "the model cannot be split across {} tensor-parallel ranks: model.n_head ({}) must be "
           "a multiple of the tensor-parallel size (each rank holds whole attention heads); "
           "choose a tensor-parallel size that divides {}",
           tp, n_head, n_head);
  MT_CHECK(n_embd % tp == 0,
           "the model cannot be split across {} tensor-parallel ranks: model.n_embd ({}) must be "
           "a multiple of the tensor-parallel size",
           tp, n_embd);
  MT_CHECK(padded_vocab % tp == 0,
           "the model cannot be split across {} tensor-parallel ranks: the padded vocabulary ({}) "
           "must be a multiple of the tensor-parallel size (pad_vocab(vocab_size, 128 x TP))",
           tp, padded_vocab);
}

std::int64_t GPTConfig::num_parameters_per_rank(int tp) const {
  validate_tp(tp);
  const std::int64_t c = n_embd;
  // Split: wte, c_attn (weight and bias), attn.c_proj weight, c_fc (weight and bias),
  // mlp.c_proj weight. Replicated: wpe, LayerNorms, both c_proj biases.
  const std::int64_t split =
      static_cast<std::int64_t>(padded_vocab) * c +
      n_layer * ((3 * c * c + 3 * c) + c * c + (4 * c * c + 4 * c) + 4 * c * c);
  return split / tp + (num_parameters() - split);
}

std::int64_t GPTConfig::num_parameters() const {
  const std::int64_t c = n_embd;
  const std::int64_t per_layer =
      2 * c + (3 * c * c + 3 * c) + (c * c + c) + 2 * c + (4 * c * c + 4 * c) + (4 * c * c + c);
  return static_cast<std::int64_t>(padded_vocab) * c + static_cast<std::int64_t>(block_size) * c +
         n_layer * per_layer + 2 * c;
}

double GPTConfig::training_flops_per_token(int seq) const {
  // The position embedding is a lookup, not a matmul; the tied embedding is a matmul (LM head).
  const double n =
      static_cast<double>(num_parameters() - static_cast<std::int64_t>(block_size) * n_embd);
  return 6.0 * n + 12.0 * n_layer * n_embd * static_cast<double>(seq);
}

std::string GPTConfig::str() const {
  return fmt::format(
      "{} layers, {} heads, width {}, block {}, vocab {} (padded {}), {:.2f}M params", n_layer,
      n_head, n_embd, block_size, vocab_size, padded_vocab, num_parameters() / 1e6);
}

MemoryEstimate parameter_memory(std::int64_t n, const PrecisionPolicy& policy, int dp, bool zero) {
  MemoryEstimate m;
  const std::int64_t held = zero && dp > 1 ? (n + dp - 1) / dp : n;
  m.parameters = n * static_cast<std::int64_t>(dtype_size(policy.param));
  m.gradients = n * 4;
  m.master_weights = policy.has_master_copy() ? held * 4 : 0;
  m.optimizer_state = 2 * held * 4;
  m.gradient_shard = zero && dp > 1 ? held * 4 : 0;
  m.optimizer_elements = held;
  return m;
}

MemoryEstimate estimate_memory(const GPTConfig& cfg, const PrecisionPolicy& policy, int batch,
                               int seq, int tp, int dp, bool zero, bool sequence_parallel) {
  MT_CHECK(dp >= 1, "estimate_memory: the data-parallel size must be at least 1, got {}", dp);
  const std::int64_t n = cfg.num_parameters_per_rank(tp);
  MemoryEstimate m = parameter_memory(n, policy, dp, zero);
  const std::int64_t bt = static_cast<std::int64_t>(batch) * seq, c = cfg.n_embd;
  const std::int64_t a = static_cast<std::int64_t>(dtype_size(policy.activation));
  // r: the share of the tokens the norm and residual region holds (sequence parallelism: 1/TP).
  const std::int64_t r = sequence_parallel && tp > 1 ? tp : 1;
  // Per layer, as GPT::ensure_activations allocates: residual, ln1, residual2, ln2 (C each,
  // replicated under TP, a token shard under SP); qkv, atty, fch and fch_gelu (3C, C, 4C, 4C,
  // split over TP); the LayerNorms' fp32 statistics (4 per token, on the shard under SP) and
  // lse (per local head).
  const std::int64_t per_layer = bt * c * a * 4 / r + bt * c * a * (3 + 1 + 4 + 4) / tp +
                                 bt * 4 * 4 / r +
                                 static_cast<std::int64_t>(batch) * (cfg.n_head / tp) * seq * 4;
  // Final: residual out, lnf and its statistics (shards under SP), this rank's logits columns,
  // fp32 losses and lse; backward scratch (dresidual, dln: C, shards under SP; datty: C / TP;
  // dqkv: 3C / TP; dfch: 4C / TP); under SP two [B, T, C] workspaces for the gathered and
  // pre-scatter tensors and the 2C fp32 of one LayerNorm's summed gradients.
  const std::int64_t sp_work = r > 1 ? bt * c * a * 2 + 2 * c * 4 : 0;
  const std::int64_t final_acts = bt * c * a * 2 / r + bt * (cfg.padded_vocab / tp) * a +
                                  bt * 4 * 2 / r + bt * 4 * 2 + bt * c * a * 2 / r +
                                  bt * c * a * (1 + 3 + 4) / tp + bt * 4 * 2 + sp_work;
  m.activations = cfg.n_layer * per_layer + final_acts;
  return m;
}

MemoryEstimate estimate_stage_memory(const GPTConfig& cfg, const PrecisionPolicy& policy, int batch,
                                     int seq, int tp, int dp, bool zero,
                                     const parallel::StageRange& stage, int in_flight,
                                     bool sequence_parallel) {
  MT_CHECK(dp >= 1 && in_flight >= 1, "estimate_stage_memory: dp {} and in_flight {}", dp,
           in_flight);
  const std::vector<ParamInfo> layout = GPT::param_layout(cfg, tp, stage);
  const std::int64_t n = layout.back().offset + layout.back().numel();
  MemoryEstimate m = parameter_memory(n, policy, dp, zero);
  const std::int64_t bt = static_cast<std::int64_t>(batch) * seq, c = cfg.n_embd;
  const std::int64_t a = static_cast<std::int64_t>(dtype_size(policy.activation));
  // As estimate_memory, per micro-batch slot: the stage's layers and its output; the head's
  // lnf, logits and fp32 statistics on the last stage.
  // (r: sequence parallelism's share of the tokens in the norm and residual region; the stage
  // boundary, the residual stream, is that shard.)
  const std::int64_t r = sequence_parallel && tp > 1 ? tp : 1;
  const std::int64_t per_layer = bt * c * a * 4 / r + bt * c * a * (3 + 1 + 4 + 4) / tp +
                                 bt * 4 * 4 / r +
                                 static_cast<std::int64_t>(batch) * (cfg.n_head / tp) * seq * 4;
  // A slot holds one chunk's layers (interleaved: in_flight counts (micro-batch, chunk) pairs).
  // The head's activations are counted in every slot: exact for one chunk, an overestimate
  // under interleaving, where only the last chunk's slots allocate them.
  const int last = stage.last_layer < 0 ? cfg.n_layer : stage.last_layer;
  const int layers =
      stage.chunks.empty() ? last - stage.first_layer : stage.count() / stage.num_chunks();
  std::int64_t slot = layers * per_layer + bt * c * a / r;
  if (stage.head)
    slot += bt * c * a / r + bt * (cfg.padded_vocab / tp) * a + bt * 4 * 2 / r + bt * 4 * 2;
  const std::int64_t scratch =
      bt * c * a * 2 / r + bt * c * a * (1 + 3 + 4) / tp + (r > 1 ? bt * c * a * 2 + 2 * c * 4 : 0);
  m.activations = in_flight * slot + scratch;
  return m;
}

std::vector<ParamInfo> GPT::build_layout(const GPTConfig& cfg, int tp, parallel::StageRange stage,
                                         Indices* idx) {
  cfg.validate();
  cfg.validate_tp(tp);
  if (stage.last_layer < 0) stage.last_layer = cfg.n_layer;
  MT_CHECK(stage.first_layer >= 0 && stage.first_layer < stage.last_layer &&
               stage.last_layer <= cfg.n_layer,
           "GPT stage: layers [{}, {}) are not a non-empty range of the model's {} layers",
           stage.first_layer, stage.last_layer, cfg.n_layer);
  // Interleaved: chunks of equal size in increasing layer order (one activation slot holds any
  // chunk's layers).
  for (int c = 0; c < stage.num_chunks(); ++c) {
    const auto [lo, hi] = stage.chunk(c);
    const auto first = stage.chunk(0);
    MT_CHECK(lo >= 0 && hi <= cfg.n_layer && hi - lo == first.second - first.first && hi > lo &&
                 (c == 0 || lo >= stage.chunk(c - 1).second),
             "GPT stage: chunk {} [{}, {}) is not a non-empty range of {} layers after the "
             "previous chunk within the model's {} layers",
             c, lo, hi, first.second - first.first, cfg.n_layer);
  }
  std::vector<ParamInfo> params;
  Indices ix;
  std::int64_t n = 0;
  // full: the unsharded shape; shard_dim -1 = replicated. global: the parameter's index in the
  // whole model (2 embeddings, 12 per layer, then ln_f).
  auto add = [&](const std::string& name, const Shape& full, bool decay, int global,
                 int shard_dim = -1, int shard_parts = 1) {
    ParamInfo p;
    p.name = name;
    p.shape = shard_dim < 0 ? full : parallel::shard_shape(full, shard_dim, shard_parts, tp);
    p.offset = n;
    p.full_shape = full;
    p.shard_dim = shard_dim;
    p.shard_parts = shard_parts;
    p.decay = decay;
    n += p.numel();
    params.push_back(std::move(p));
    ix.global.push_back(global);
    return static_cast<int>(params.size()) - 1;
  };
  const std::int64_t c = cfg.n_embd;
  // wte first: on the embedding stage for the lookup (and the head, when it has both), on a
  // head-only stage as the LM head's tied copy. At offset 0 its gradient is final last.
  if (stage.embedding || stage.head) {
    ix.wte = add("wte.weight", Shape{cfg.padded_vocab, c}, true, 0, 0);
    // The rows past the real vocabulary are padding whose count depends on the layout.
    params[ix.wte].real_rows = cfg.vocab_size;
    params[ix.wte].tied_copy = !stage.embedding;
  }
  if (stage.embedding) ix.wpe = add("wpe.weight", Shape{cfg.block_size, c}, true, 1);
  // The stage's layers, chunk after chunk: one flat buffer for all of them (the optimizer, the
  // reducer, ZeRO-1 and checkpoints see one buffer per rank; names are the whole model's).
  std::vector<int> held;
  for (int c = 0; c < stage.num_chunks(); ++c)
    for (int l = stage.chunk(c).first; l < stage.chunk(c).second; ++l) held.push_back(l);
  for (int l : held) {
    const std::string p = "h." + std::to_string(l) + ".";
    const int g = 2 + 12 * l;
    Layer L;
    L.ln1_w = add(p + "ln_1.weight", Shape{c}, false, g);
    L.ln1_b = add(p + "ln_1.bias", Shape{c}, false, g + 1);
    // Column-parallel, Q, K and V each split by heads.
    L.qkv_w = add(p + "attn.c_attn.weight", Shape{3 * c, c}, true, g + 2, 0, 3);
    L.qkv_b = add(p + "attn.c_attn.bias", Shape{3 * c}, false, g + 3, 0, 3);
    // Row-parallel: split along its input (the heads); the bias is replicated.
    L.proj_w = add(p + "attn.c_proj.weight", Shape{c, c}, true, g + 4, 1);
    L.proj_b = add(p + "attn.c_proj.bias", Shape{c}, false, g + 5);
    L.ln2_w = add(p + "ln_2.weight", Shape{c}, false, g + 6);
    L.ln2_b = add(p + "ln_2.bias", Shape{c}, false, g + 7);
    L.fc_w = add(p + "mlp.c_fc.weight", Shape{4 * c, c}, true, g + 8, 0);
    L.fc_b = add(p + "mlp.c_fc.bias", Shape{4 * c}, false, g + 9, 0);
    L.fcproj_w = add(p + "mlp.c_proj.weight", Shape{c, 4 * c}, true, g + 10, 1);
    L.fcproj_b = add(p + "mlp.c_proj.bias", Shape{c}, false, g + 11);
    ix.layers.push_back(L);
  }
  if (stage.head) {
    ix.lnf_w = add("ln_f.weight", Shape{c}, false, 2 + 12 * cfg.n_layer);
    ix.lnf_b = add("ln_f.bias", Shape{c}, false, 3 + 12 * cfg.n_layer);
  }
  const bool whole = stage.embedding && stage.head && stage.first_layer == 0 &&
                     stage.last_layer == cfg.n_layer && stage.num_chunks() == 1;
  MT_ASSERT(!whole || n == cfg.num_parameters_per_rank(tp), "{} vs {}", n,
            cfg.num_parameters_per_rank(tp));
  if (idx != nullptr) *idx = std::move(ix);
  return params;
}

std::vector<ParamInfo> GPT::param_layout(const GPTConfig& cfg, int tp, parallel::StageRange stage) {
  return build_layout(cfg, tp, stage, nullptr);
}

GPT::GPT(const GPTConfig& cfg, const PrecisionPolicy& policy, Device& device, parallel::TPGroup tp,
         parallel::StageRange stage)
    : cfg_(cfg), policy_(policy), device_(&device), tp_(tp), stage_(stage) {
  Indices ix;
  params_ = build_layout(cfg_, tp_.size(), stage_, &ix);
  if (stage_.last_layer < 0) stage_.last_layer = cfg_.n_layer;
  heads_ = cfg_.n_head / tp_.size();
  vocab_start_ = static_cast<std::int64_t>(cfg_.padded_vocab / tp_.size()) * tp_.rank();
  wte_ = ix.wte;
  wpe_ = ix.wpe;
  lnf_w_ = ix.lnf_w;
  lnf_b_ = ix.lnf_b;
  layers_ = std::move(ix.layers);
  chunk_layers_ = static_cast<int>(layers_.size()) / stage_.num_chunks();
  global_ = std::move(ix.global);
  num_params_ = params_.back().offset + params_.back().numel();
  params_flat_ = Tensor::zeros(Shape{num_params_}, policy_.param, device);
  grads_flat_ = Tensor::zeros(Shape{num_params_}, DType::kF32, device);
}

Tensor GPT::param(std::size_t i) const {
  const ParamInfo& p = params_.at(i);
  return params_flat_.slice(p.offset, p.shape.numel()).view(p.shape);
}

Tensor GPT::grad(std::size_t i) const {
  const ParamInfo& p = params_.at(i);
  return grads_flat_.slice(p.offset, p.shape.numel()).view(p.shape);
}

Tensor GPT::initial_weights(std::uint64_t seed) const {
  Tensor weights = Tensor::zeros(Shape{num_params_}, DType::kF32, *device_);
  const float residual_scale = 1.0f / std::sqrt(2.0f * static_cast<float>(cfg_.n_layer));
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const ParamInfo& p = params_[i];
    Tensor m = parallel::slot_view(weights, p);
    // A shard gets the full tensor's values at its place: the full tensor is drawn, then cut.
    const bool split = p.shard_dim >= 0 && tp_.size() > 1;
    Tensor full = split ? Tensor::empty(p.full_shape, DType::kF32) : m;
    const bool is_bias = p.name.size() >= 5 && p.name.compare(p.name.size() - 5, 5, ".bias") == 0;
    const bool is_ln = p.name.find("ln_") != std::string::npos;
    if (is_bias) {
      full.zero_();
    } else if (is_ln) {
      full.copy_from(Tensor::from_floats(std::vector<float>(p.full_shape.numel(), 1.0f),
                                         p.full_shape, DType::kF32));
    } else {
      const bool residual = p.name.find("c_proj.weight") != std::string::npos;
      // Drawn by the parameter's index in the whole model: every pipeline split (and the tied
      // copy of wte) gets the values of the same model.
      fill_normal(full, Philox(seed, static_cast<std::uint64_t>(global_[i])), 0.0f,
                  residual ? 0.02f * residual_scale : 0.02f);
    }
    // Padded vocabulary rows are zero: they are never a target, and their logits never win
    // because cross-entropy ignores those columns.
    if (global_[i] == 0 && cfg_.padded_vocab > cfg_.vocab_size)
      full.slice(cfg_.vocab_size, cfg_.padded_vocab - cfg_.vocab_size).zero_();
    if (split) parallel::copy_shard(m, full, p.shard_dim, p.shard_parts, tp_.rank(), tp_.size());
  }
  return weights;
}

void GPT::set_weights(const Tensor& weights) {
  MT_CHECK(weights.defined() && weights.dtype() == DType::kF32 && weights.numel() == num_params_,
           "GPT::set_weights: expected fp32 flat weights of {} elements, got {}", num_params_,
           weights.defined() ? weights.str() : std::string("(none)"));
  if (weights.data() != params_flat_.data()) params_flat_.copy_from(weights);
}

GPT::Micro& GPT::ensure_activations(int slot, int batch, int seq) {
  MT_CHECK(slot >= 0 && slot < 4096, "GPT: activation slot {} out of range", slot);
  if (static_cast<int>(micro_.size()) <= slot) micro_.resize(static_cast<std::size_t>(slot) + 1);
  Micro& mb = micro_[static_cast<std::size_t>(slot)];
  ensure_scratch(batch, seq);
  if (batch == mb.batch && seq == mb.seq) return mb;
  Device& d = *device_;
  const DType a = policy_.activation;
  // c: the residual width (replicated under TP); cl: this rank's heads' width.
  const std::int64_t b = batch, t = seq, c = cfg_.n_embd, cl = c / tp_.size();
  // The norm and residual region: every token, or this rank's token shard under sequence
  // parallelism (parallel/tensor_parallel.hpp).
  const bool sp = tp_.sequence_parallel();
  const std::int64_t ts = sp ? tp_.shard_tokens(b * t) : b * t;
  const Shape region = sp ? Shape{ts, c} : Shape{b, t, c};
  mb.layers.clear();
  // A slot holds one chunk's layers (every layer but under interleaving).
  for (int l = 0; l < chunk_layers_; ++l) {
    LayerActs x;
    x.residual = Tensor::empty(region, a, d);
    x.ln1 = Tensor::empty(region, a, d);
    x.ln1_mean = Tensor::empty(Shape{ts}, DType::kF32, d);
    x.ln1_rstd = Tensor::empty(Shape{ts}, DType::kF32, d);
    x.qkv = Tensor::empty(Shape{b, t, 3 * cl}, a, d);
    x.atty = Tensor::empty(Shape{b, t, cl}, a, d);
    x.lse = Tensor::empty(Shape{b, heads_, t}, DType::kF32, d);
    x.residual2 = Tensor::empty(region, a, d);
    x.ln2 = Tensor::empty(region, a, d);
    x.ln2_mean = Tensor::empty(Shape{ts}, DType::kF32, d);
    x.ln2_rstd = Tensor::empty(Shape{ts}, DType::kF32, d);
    x.fch = Tensor::empty(Shape{b, t, 4 * cl}, a, d);
    x.fch_gelu = Tensor::empty(Shape{b, t, 4 * cl}, a, d);
    mb.layers.push_back(std::move(x));
  }
  mb.residual_out = Tensor::empty(region, a, d);
  // The head's activations: allocated by the first forward of the head chunk in this slot
  // (ensure_head), so that under interleaving the slots of the other chunks hold no logits.
  mb.lnf = mb.lnf_mean = mb.lnf_rstd = mb.logits = mb.losses = mb.lse = Tensor();
  mb.batch = batch;
  mb.seq = seq;
  return mb;
}

void GPT::ensure_head(Micro& mb) {
  if (mb.lnf.defined()) return;
  Device& d = *device_;
  const DType a = policy_.activation;
  const std::int64_t b = mb.batch, t = mb.seq, c = cfg_.n_embd;
  // As ensure_activations: the norm's region is the token shard under sequence parallelism.
  const bool sp = tp_.sequence_parallel();
  const std::int64_t ts = sp ? tp_.shard_tokens(b * t) : b * t;
  mb.lnf = Tensor::empty(sp ? Shape{ts, c} : Shape{b, t, c}, a, d);
  mb.lnf_mean = Tensor::empty(Shape{ts}, DType::kF32, d);
  mb.lnf_rstd = Tensor::empty(Shape{ts}, DType::kF32, d);
  mb.logits = Tensor::empty(Shape{b, t, cfg_.padded_vocab / tp_.size()}, a, d);
  mb.losses = Tensor::empty(Shape{b * t}, DType::kF32, d);
  mb.lse = Tensor::empty(Shape{b * t}, DType::kF32, d);
}

void GPT::ensure_scratch(int batch, int seq) {
  if (batch == scratch_batch_ && seq == scratch_seq_) return;
  Device& d = *device_;
  const DType a = policy_.activation;
  const std::int64_t b = batch, t = seq, c = cfg_.n_embd, cl = c / tp_.size();
  const bool sp = tp_.sequence_parallel();
  const Shape region = sp ? Shape{tp_.shard_tokens(b * t), c} : Shape{b, t, c};
  dresidual_ = Tensor::empty(region, a, d);
  dln_ = Tensor::empty(region, a, d);
  if (sp) {
    sp_x_ = Tensor::empty(Shape{b, t, c}, a, d);
    sp_dx_ = Tensor::empty(Shape{b, t, c}, a, d);
    sp_norm_grads_ = Tensor::empty(Shape{2 * c}, DType::kF32, d);
  }
  datty_ = Tensor::empty(Shape{b, t, cl}, a, d);
  dqkv_ = Tensor::empty(Shape{b, t, 3 * cl}, a, d);
  dfch_ = Tensor::empty(Shape{b, t, 4 * cl}, a, d);
  scratch_batch_ = batch;
  scratch_seq_ = seq;
}

std::int64_t GPT::activation_bytes() const {
  std::int64_t total = 0;
  auto add = [&](const Tensor& t) {
    if (t.defined()) total += static_cast<std::int64_t>(t.nbytes());
  };
  for (const Micro& mb : micro_) {
    for (const LayerActs& x : mb.layers) {
      for (const Tensor* t :
           {&x.residual, &x.ln1, &x.ln1_mean, &x.ln1_rstd, &x.qkv, &x.atty, &x.lse, &x.residual2,
            &x.ln2, &x.ln2_mean, &x.ln2_rstd, &x.fch, &x.fch_gelu})
        add(*t);
    }
    for (const Tensor* t :
         {&mb.residual_out, &mb.lnf, &mb.lnf_mean, &mb.lnf_rstd, &mb.logits, &mb.losses, &mb.lse})
      add(*t);
  }
  for (const Tensor* t :
       {&dresidual_, &dln_, &datty_, &dqkv_, &dfch_, &sp_x_, &sp_dx_, &sp_norm_grads_})
    add(*t);
  return total;
}

void GPT::layernorm_backward_sp(Tensor& dx, int w, const Tensor& dy, const Tensor& x,
                                const Tensor& mean, const Tensor& rstd, bool accumulate_dx) {
  // The gradients already hold earlier micro-batches' sums over the group: only this
  // micro-batch's share is summed, then added (summing the accumulated gradient would count
  // the earlier ones K times).
  const std::int64_t c = cfg_.n_embd;
  sp_norm_grads_.zero_();
  Tensor dw = sp_norm_grads_.slice(0, c), db = sp_norm_grads_.slice(c, c);
  ops::layernorm_backward(dx, dw, db, dy, x, param(static_cast<std::size_t>(w)), mean, rstd,
                          accumulate_dx);
  const ParamInfo& p = params_[static_cast<std::size_t>(w)];
  MT_ASSERT(params_[static_cast<std::size_t>(w) + 1].offset == p.offset + c,
            "{}: its bias must follow it in the flat buffer", p.name);
  Tensor g = grads_flat_.slice(p.offset, 2 * c);
  parallel::accumulate_group_sum(g, sp_norm_grads_, tp_);
}

float GPT::forward(const Tensor& tokens, const Tensor& targets) {
  return forward_micro(0, tokens, targets);
}

void GPT::backward(float loss_multiplier) {
  backward_micro(0, loss_multiplier, Tensor());
}

Tensor GPT::stage_input(int slot, int batch, int seq) {
  return ensure_activations(slot, batch, seq).layers[0].residual;
}

Tensor GPT::stage_output(int slot) const {
  MT_CHECK(slot >= 0 && slot < static_cast<int>(micro_.size()) &&
               micro_[static_cast<std::size_t>(slot)].residual_out.defined(),
           "GPT::stage_output: slot {} has no forward", slot);
  return micro_[static_cast<std::size_t>(slot)].residual_out;
}

float GPT::forward_micro(int slot, const Tensor& tokens, const Tensor& targets, int chunk) {
  MT_CHECK(tokens.defined() && tokens.dtype() == DType::kI32 && tokens.ndim() == 2,
           "GPT forward: tokens must be int32 [B, T], got {}", tokens.str());
  const int b = static_cast<int>(tokens.dim(0)), t = static_cast<int>(tokens.dim(1));
  MT_CHECK(t >= 1 && t <= cfg_.block_size,
           "GPT forward: sequence length {} must be in [1, {}] (model.block_size)", t,
           cfg_.block_size);
  MT_CHECK(b >= 1, "GPT forward: batch size must be at least 1, got {}", b);
  if (targets.defined()) {
    MT_CHECK(targets.dtype() == DType::kI32 && targets.shape() == tokens.shape(),
             "GPT forward: targets must be int32 {} like tokens, got {}", tokens.shape().str(),
             targets.str());
  }
  MT_CHECK(chunk >= 0 && chunk < stage_.num_chunks(), "GPT forward: chunk {} of a stage of {}",
           chunk, stage_.num_chunks());
  Micro& mb = ensure_activations(slot, b, t);
  std::vector<LayerActs>& acts = mb.layers;
  // Sequence parallelism: the LayerNorms and residual adds run on this rank's token shard;
  // every column-parallel layer reads the shard's all-gather (sp_x_), every row-parallel one
  // reduce-scatters its partial sums into the shard (parallel/tensor_parallel.hpp).
  const bool sp = tp_.sequence_parallel();
  auto gathered = [&](const Tensor& shard) -> const Tensor& {
    if (!sp) return shard;
    tp_.gather_tokens(sp_x_, shard);
    return sp_x_;
  };
  auto row_forward = [&](Tensor& y, const Tensor& x, int w, int bias) {
    Tensor bt = param(static_cast<std::size_t>(bias));
    if (sp) {
      parallel::row_linear_forward_sp(y, sp_x_, x, param(static_cast<std::size_t>(w)), &bt, tp_);
    } else {
      parallel::row_linear_forward(y, x, param(static_cast<std::size_t>(w)), &bt, tp_);
    }
  };
  // Under interleaving the embedding runs on chunk 0 and the head on the last chunk.
  const bool embedding = stage_.embedding && chunk == 0;
  const bool head = stage_.head && chunk + 1 == stage_.num_chunks();
  const Layer* layers = layers_.data() + static_cast<std::ptrdiff_t>(chunk) * chunk_layers_;
  if (head) ensure_head(mb);
  if (embedding) {
    mb.tokens = tokens.device().is_cpu() && !device_->is_cpu() ? tokens.to(*device_) : tokens;
    // Tokens outside the real vocabulary would index padded rows: refuse them.
    const std::vector<std::int32_t> ids = tokens.to_ints();
    for (std::size_t i = 0; i < ids.size(); ++i)
      MT_CHECK(ids[i] >= 0 && ids[i] < cfg_.vocab_size,
               "GPT forward: token id {} at (batch {}, position {}) is outside the vocabulary "
               "of {}",
               ids[i], i / t, i % t, cfg_.vocab_size);
    // Under TP: the embedding is vocab-parallel; in each block the QKV projection and c_fc are
    // column-parallel (f: no communication), attention runs this rank's heads, and both c_proj
    // are row-parallel (g: one allreduce each); the LM head is column-parallel over the
    // vocabulary and feeds the vocab-parallel cross-entropy.
    if (sp) {
      // The rows are summed into this rank's token shard (a reduce-scatter), sp_x_ the
      // workspace every token's partial rows are written to.
      mb.embedding.forward(sp_x_, ids, b, t, param(wte_), param(wpe_), vocab_start_, tp_,
                           &acts[0].residual);
    } else if (tp_.active()) {
      mb.embedding.forward(acts[0].residual, ids, b, t, param(wte_), param(wpe_), vocab_start_,
                           tp_);
    } else {
      ops::embedding_forward(acts[0].residual, mb.tokens, param(wte_), param(wpe_));
    }
  }
  // (A stage without the embedding received its input into acts[0].residual: stage_input.)
  // Each residual add is fused with the LayerNorm that reads its result
  // (ops::residual_layernorm_forward: the same bits as add then layernorm_forward on the CPU),
  // and the MLP's c_fc with its GELU (ops::linear_gelu_forward: a cuBLASLt epilogue on CUDA).
  ops::layernorm_forward(acts[0].ln1, acts[0].ln1_mean, acts[0].ln1_rstd, acts[0].residual,
                         param(layers[0].ln1_w), param(layers[0].ln1_b));
  const int n = chunk_layers_;
  for (int l = 0; l < n; ++l) {
    const Layer& L = layers[l];
    LayerActs& x = acts[static_cast<std::size_t>(l)];
    Tensor qkv_b = param(L.qkv_b);
    parallel::column_linear_forward(x.qkv, gathered(x.ln1), param(L.qkv_w), &qkv_b);
    ops::attention_forward(x.atty, x.lse, x.qkv, heads_);
    row_forward(x.residual2, x.atty, L.proj_w, L.proj_b);
    ops::residual_layernorm_forward(x.residual2, x.ln2, x.ln2_mean, x.ln2_rstd, x.residual2,
                                    x.residual, param(L.ln2_w), param(L.ln2_b));
    Tensor fc_b = param(L.fc_b);
    parallel::column_linear_gelu_forward(x.fch, x.fch_gelu, gathered(x.ln2), param(L.fc_w), &fc_b);
    const bool last = l + 1 == n;
    Tensor& next = last ? mb.residual_out : acts[static_cast<std::size_t>(l) + 1].residual;
    row_forward(next, x.fch_gelu, L.fcproj_w, L.fcproj_b);
    if (last && head) {
      ops::residual_layernorm_forward(next, mb.lnf, mb.lnf_mean, mb.lnf_rstd, next, x.residual2,
                                      param(lnf_w_), param(lnf_b_));
    } else if (last) {
      // The stage's output: the residual stream, whose LayerNorm the next stage computes (the
      // same bits as the fused op on the CPU).
      ops::add(next, next, x.residual2);
    } else {
      LayerActs& nx = acts[static_cast<std::size_t>(l) + 1];
      const Layer& NL = layers[l + 1];
      ops::residual_layernorm_forward(next, nx.ln1, nx.ln1_mean, nx.ln1_rstd, next, x.residual2,
                                      param(NL.ln1_w), param(NL.ln1_b));
    }
  }
  if (!head) {
    mb.have_targets = true;  // backward takes the output gradient instead
    return std::numeric_limits<float>::quiet_NaN();
  }
  parallel::column_linear_forward(mb.logits, gathered(mb.lnf), param(wte_), nullptr);
  mb.have_targets = targets.defined();
  if (!mb.have_targets) return std::numeric_limits<float>::quiet_NaN();
  mb.targets = targets.device().is_cpu() && !device_->is_cpu() ? targets.to(*device_) : targets;
  const std::int64_t vocab_local = cfg_.padded_vocab / tp_.size();
  Tensor logits2d = mb.logits.view(Shape{static_cast<std::int64_t>(b) * t, vocab_local});
  Tensor targets1d = mb.targets.view(Shape{static_cast<std::int64_t>(b) * t});
  const std::vector<std::int32_t> tg = targets.to_ints();
  if (tp_.active()) {
    mb.cross_entropy.forward(mb.losses, logits2d, tg, vocab_start_, cfg_.vocab_size, tp_);
  } else {
    ops::cross_entropy_forward(mb.losses, mb.lse, logits2d, targets1d, cfg_.vocab_size);
  }
  std::int64_t counted = 0;
  for (std::int32_t v : tg) counted += v >= 0;
  mb.valid_targets = static_cast<float>(counted);
  if (counted == 0) return 0.0f;
  double sum = 0.0;
  for (float v : mb.losses.to_floats()) sum += v;
  return static_cast<float>(sum / static_cast<double>(counted));
}

void GPT::backward_micro(int slot, float loss_multiplier, const Tensor& output_grad, int chunk) {
  MT_CHECK(slot >= 0 && slot < static_cast<int>(micro_.size()) &&
               micro_[static_cast<std::size_t>(slot)].have_targets,
           "GPT backward needs a forward with targets first");
  MT_CHECK(chunk >= 0 && chunk < stage_.num_chunks(), "GPT backward: chunk {} of a stage of {}",
           chunk, stage_.num_chunks());
  Micro& mb = micro_[static_cast<std::size_t>(slot)];
  std::vector<LayerActs>& acts = mb.layers;
  const bool embedding = stage_.embedding && chunk == 0;
  const bool head = stage_.head && chunk + 1 == stage_.num_chunks();
  const Layer* layers = layers_.data() + static_cast<std::ptrdiff_t>(chunk) * chunk_layers_;
  ensure_scratch(mb.batch, mb.seq);
  const std::int64_t bt = static_cast<std::int64_t>(mb.batch) * mb.seq;
  // Sequence parallelism: the backward of the forward's all-gather before a column-parallel
  // layer is a reduce-scatter of its input gradient (column_linear_backward_sp, which re-gathers
  // the layer's input for its weight gradient: the gathered copy is not kept per layer); that
  // of the reduce-scatter after a row-parallel layer is an all-gather of its output gradient.
  // The LayerNorms saw this rank's tokens only: their weight gradients are summed over the group.
  const bool sp = tp_.sequence_parallel();
  auto column_backward = [&](Tensor& dy, const Tensor& x, int w, int bias) {
    Tensor dw = grad(static_cast<std::size_t>(w));
    Tensor db = bias >= 0 ? grad(static_cast<std::size_t>(bias)) : Tensor();
    Tensor* dbp = bias >= 0 ? &db : nullptr;
    if (sp) {
      tp_.gather_tokens(sp_x_, x);
      parallel::column_linear_backward_sp(dln_, sp_dx_, dw, dbp, dy, sp_x_,
                                          param(static_cast<std::size_t>(w)), tp_);
    } else {
      parallel::column_linear_backward(&dln_, dw, dbp, dy, x, param(static_cast<std::size_t>(w)),
                                       tp_);
    }
  };
  auto row_backward = [&](Tensor& dx, const Tensor& x, int w, int bias) {
    Tensor dw = grad(static_cast<std::size_t>(w)), db = grad(static_cast<std::size_t>(bias));
    if (sp) tp_.gather_tokens(sp_x_, dresidual_);
    parallel::row_linear_backward(&dx, dw, &db, sp ? sp_x_ : dresidual_, x,
                                  param(static_cast<std::size_t>(w)));
  };
  auto norm_backward = [&](int w, int b, const Tensor& x, const Tensor& mean, const Tensor& rstd,
                           bool accumulate_dx) {
    if (sp) {
      layernorm_backward_sp(dresidual_, w, dln_, x, mean, rstd, accumulate_dx);
    } else {
      Tensor dgw = grad(static_cast<std::size_t>(w)), dgb = grad(static_cast<std::size_t>(b));
      ops::layernorm_backward(dresidual_, dgw, dgb, dln_, x, param(static_cast<std::size_t>(w)),
                              mean, rstd, accumulate_dx);
    }
  };
  auto ready = [&](int first, int last) {
    if (grads_ready_)
      grads_ready_(params_[static_cast<std::size_t>(first)].offset,
                   params_[static_cast<std::size_t>(last)].offset +
                       params_[static_cast<std::size_t>(last)].shape.numel());
  };
  if (head && mb.valid_targets == 0 && !embedding) {
    // No counted target: a zero loss gradient, but the stages before this one still wait for
    // their input gradient.
    mb.have_targets = false;
    dresidual_.zero_();
    ready(lnf_w_, lnf_b_);
  } else if (head) {
    if (mb.valid_targets == 0) return;
    Tensor logits2d = mb.logits.view(Shape{bt, cfg_.padded_vocab / tp_.size()});
    // dlogits overwrite the logits in place: the largest activation is not held twice.
    if (tp_.active()) {
      mb.cross_entropy.backward(logits2d, logits2d, loss_multiplier / mb.valid_targets);
    } else {
      ops::cross_entropy_backward(logits2d, logits2d, mb.lse, mb.targets.view(Shape{bt}),
                                  cfg_.vocab_size, loss_multiplier / mb.valid_targets);
    }
    mb.have_targets = false;  // the logits are gone
    column_backward(mb.logits, mb.lnf, wte_, -1);
    norm_backward(lnf_w_, lnf_b_, mb.residual_out, mb.lnf_mean, mb.lnf_rstd,
                  /*accumulate_dx=*/false);
    ready(lnf_w_, lnf_b_);
  } else {
    MT_CHECK(output_grad.defined() && output_grad.shape() == mb.residual_out.shape(),
             "GPT stage backward: the output gradient must be {} like the stage output, got {}",
             mb.residual_out.shape().str(), output_grad.defined() ? output_grad.str() : "(none)");
    mb.have_targets = false;
    dresidual_.copy_from(output_grad);
  }
  for (int l = chunk_layers_ - 1; l >= 0; --l) {
    const Layer& L = layers[l];
    LayerActs& x = acts[static_cast<std::size_t>(l)];
    // dresidual holds the gradient of this layer's output.
    row_backward(dfch_, x.fch_gelu, L.fcproj_w, L.fcproj_b);
    ready(L.fcproj_w, L.fcproj_b);
    ops::gelu_backward(dfch_, dfch_, x.fch);
    column_backward(dfch_, x.ln2, L.fc_w, L.fc_b);
    ready(L.fc_w, L.fc_b);
    norm_backward(L.ln2_w, L.ln2_b, x.residual2, x.ln2_mean, x.ln2_rstd, /*accumulate_dx=*/true);
    ready(L.ln2_w, L.ln2_b);
    row_backward(datty_, x.atty, L.proj_w, L.proj_b);
    ready(L.proj_w, L.proj_b);
    ops::attention_backward(dqkv_, datty_, x.qkv, x.atty, x.lse, heads_);
    column_backward(dqkv_, x.ln1, L.qkv_w, L.qkv_b);
    ready(L.qkv_w, L.qkv_b);
    norm_backward(L.ln1_w, L.ln1_b, x.residual, x.ln1_mean, x.ln1_rstd, /*accumulate_dx=*/true);
    ready(L.ln1_w, L.ln1_b);
  }
  if (embedding) {
    Tensor dwte = grad(wte_), dwpe = grad(wpe_);
    if (sp) {
      // Every rank's wte rows are looked up by tokens of every shard: the gathered gradient.
      tp_.gather_tokens(sp_x_, dresidual_);
      mb.embedding.backward(dwte, dwpe, sp_x_);
    } else if (tp_.active()) {
      mb.embedding.backward(dwte, dwpe, dresidual_);
    } else {
      ops::embedding_backward(dwte, dwpe, dresidual_, mb.tokens);
    }
    ready(wte_, wpe_);
  } else if (head) {
    ready(wte_, wte_);  // the tied copy: final once every micro-batch's head has run
  }
}

}  // namespace meshtrain::models

namespace meshtrain::models {

std::vector<float> GPT::decode(std::int32_t token) {
  MT_CHECK(stage_.embedding && stage_.head && stage_.first_layer == 0 &&
               stage_.last_layer == cfg_.n_layer,
           "decode needs the whole model; this object is pipeline stage [{}, {}) of {} layers",
           stage_.first_layer, stage_.last_layer, cfg_.n_layer);
  MT_CHECK(token >= 0 && token < cfg_.vocab_size,
           "decode: token id {} is outside the vocabulary of {}", token, cfg_.vocab_size);
  MT_CHECK(
      cache_len_ < cfg_.block_size,
      "decode: the KV cache holds the model's {} positions; reset_cache() and re-feed a window",
      cfg_.block_size);
  Device& d = *device_;
  const DType a = policy_.activation;
  const std::int64_t c = cfg_.n_embd, cl = c / tp_.size();
  if (k_cache_.empty()) {
    for (int l = 0; l < cfg_.n_layer; ++l) {
      k_cache_.push_back(Tensor::empty(Shape{1, cfg_.block_size, cl}, a, d));
      v_cache_.push_back(Tensor::empty(Shape{1, cfg_.block_size, cl}, a, d));
    }
    dec_token_ = Tensor::empty(Shape{1, 1}, DType::kI32, d);
    dec_x_ = Tensor::empty(Shape{1, c}, a, d);
    dec_ln_ = Tensor::empty(Shape{1, c}, a, d);
    dec_mean_ = Tensor::empty(Shape{1}, DType::kF32, d);
    dec_rstd_ = Tensor::empty(Shape{1}, DType::kF32, d);
    dec_qkv_ = Tensor::empty(Shape{1, 3 * cl}, a, d);
    dec_atty_ = Tensor::empty(Shape{1, cl}, a, d);
    dec_tmp_ = Tensor::empty(Shape{1, c}, a, d);
    dec_fch_ = Tensor::empty(Shape{1, 4 * cl}, a, d);
    dec_fch_gelu_ = Tensor::empty(Shape{1, 4 * cl}, a, d);
    dec_logits_ = Tensor::empty(Shape{1, cfg_.padded_vocab / tp_.size()}, a, d);
    if (tp_.active()) dec_logits_full_ = Tensor::empty(Shape{cfg_.padded_vocab}, a, d);
  }
  const int pos = cache_len_;
  std::int32_t host_token = token;
  dec_token_.copy_from(Tensor::wrap(&host_token, Shape{1, 1}, DType::kI32));
  Tensor x3 = dec_x_.view(Shape{1, 1, c});
  // Position pos is row pos of wpe: pass that row as a one-position table.
  if (tp_.active()) {
    dec_embedding_.forward(x3, {token}, 1, 1, param(wte_), param(wpe_).slice(pos, 1), vocab_start_,
                           tp_);
  } else {
    ops::embedding_forward(x3, dec_token_, param(wte_), param(wpe_).slice(pos, 1));
  }
  for (int l = 0; l < cfg_.n_layer; ++l) {
    const Layer& L = layers_[l];
    ops::layernorm_forward(dec_ln_, dec_mean_, dec_rstd_, dec_x_, param(L.ln1_w), param(L.ln1_b));
    Tensor qkv_b = param(L.qkv_b), proj_b = param(L.proj_b), fc_b = param(L.fc_b),
           fcproj_b = param(L.fcproj_b);
    parallel::column_linear_forward(dec_qkv_, dec_ln_, param(L.qkv_w), &qkv_b);
    ops::attention_decode(dec_atty_, k_cache_[l], v_cache_[l], dec_qkv_, pos, heads_);
    parallel::row_linear_forward(dec_tmp_, dec_atty_, param(L.proj_w), &proj_b, tp_);
    ops::add(dec_x_, dec_x_, dec_tmp_);
    ops::layernorm_forward(dec_ln_, dec_mean_, dec_rstd_, dec_x_, param(L.ln2_w), param(L.ln2_b));
    parallel::column_linear_forward(dec_fch_, dec_ln_, param(L.fc_w), &fc_b);
    ops::gelu_forward(dec_fch_gelu_, dec_fch_);
    parallel::row_linear_forward(dec_tmp_, dec_fch_gelu_, param(L.fcproj_w), &fcproj_b, tp_);
    ops::add(dec_x_, dec_x_, dec_tmp_);
  }
  ops::layernorm_forward(dec_ln_, dec_mean_, dec_rstd_, dec_x_, param(lnf_w_), param(lnf_b_));
  parallel::column_linear_forward(dec_logits_, dec_ln_, param(wte_), nullptr);
  ++cache_len_;
  // Sampling needs the whole distribution: one row of logits is gathered (rank r's columns
  // are vocabulary rows [r V/K, (r + 1) V/K), so rank order is vocabulary order).
  if (tp_.active()) tp_.comm()->all_gather(dec_logits_.flat(), dec_logits_full_).wait();
  std::vector<float> logits = (tp_.active() ? dec_logits_full_ : dec_logits_).to_floats();
  logits.resize(static_cast<std::size_t>(cfg_.vocab_size));  // padded columns never win
  return logits;
}

}  // namespace meshtrain::models
