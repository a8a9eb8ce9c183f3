#include "models/llama.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>

#include "runtime/ops.hpp"
#include "runtime/rng.hpp"

namespace meshtrain::models {

namespace {

struct PresetRow {
  const char* name;
  LlamaConfig (*make)();
};

LlamaConfig llama3(int layers, int width, int heads, int kv, int ffn) {
  LlamaConfig c;
  c.arch = "llama";
  c.n_layer = layers;
  c.n_embd = width;
  c.n_head = heads;
  c.n_kv_head = kv;
  c.intermediate_size = ffn;
  c.block_size = 8192;
  c.vocab_size = 128256;
  c.padded_vocab = GPTConfig::pad_vocab(128256);
  c.rope.theta = 500000.0;
  c.rms_norm_eps = 1e-5f;
  c.bos_id = 128000;
  c.eos_id = 128001;
  return c;
}

const std::vector<PresetRow>& preset_rows() {
  static const std::vector<PresetRow> rows = {
      {"llama3-8b", [] { return llama3(32, 4096, 32, 8, 14336); }},
      {"llama3-70b", [] { return llama3(80, 8192, 64, 8, 28672); }},
      {"llama3.2-1b",
       [] {
         LlamaConfig c = llama3(16, 2048, 32, 8, 8192);
         c.tie_word_embeddings = true;
         c.block_size = 131072;
         c.rope.scaling = ops::RopeConfig::Scaling::kLlama3;
         c.rope.factor = 32.0;
         c.rope.low_freq_factor = 1.0;
         c.rope.high_freq_factor = 4.0;
         c.rope.original_max_position = 8192;
         c.eos_id = 128009;
         return c;
       }},
      {"qwen2.5-0.5b",
       [] {
         LlamaConfig c;
         c.arch = "qwen2";
         c.n_layer = 24;
         c.n_embd = 896;
         c.n_head = 14;
         c.n_kv_head = 2;
         c.intermediate_size = 4864;
         c.block_size = 32768;
         c.vocab_size = 151936;
         c.padded_vocab = GPTConfig::pad_vocab(151936);
         c.rope.theta = 1000000.0;
         c.rms_norm_eps = 1e-6f;
         c.tie_word_embeddings = true;
         c.qkv_bias = true;
         c.bos_id = -1;
         c.eos_id = 151643;
         return c;
       }},
      {"llama-small",
       [] {
         LlamaConfig c;
         c.n_layer = 6;
         c.n_embd = 384;
         c.n_head = 6;
         c.n_kv_head = 2;
         c.intermediate_size = 1152;
         c.block_size = 256;
         return c;
       }},
      {"llama-tiny",
       [] {
         LlamaConfig c;
         c.n_layer = 2;
         c.n_embd = 64;
         c.n_head = 4;
         c.n_kv_head = 2;
         c.intermediate_size = 160;
         c.block_size = 64;
         return c;
       }},
  };
  return rows;
}

}  // namespace

LlamaConfig LlamaConfig::preset(const std::string& name) {
  for (const PresetRow& r : preset_rows())
    if (name == r.name) return r.make();
  std::string names;
  for (const PresetRow& r : preset_rows())
    names += (names.empty() ? "" : ", ") + std::string(r.name);
  MT_FAIL("unknown Llama-family preset '{}': expected one of {}", name, names);
}

std::vector<std::string> LlamaConfig::preset_names() {
  std::vector<std::string> out;
  for (const PresetRow& r : preset_rows()) out.emplace_back(r.name);
  return out;
}

bool LlamaConfig::is_preset(const std::string& name) {
  for (const PresetRow& r : preset_rows())
    if (name == r.name) return true;
  return false;
}

void LlamaConfig::validate() const {
  MT_CHECK(arch == "llama" || arch == "qwen2", "model.arch '{}': expected gpt2, llama or qwen2",
           arch);
  MT_CHECK(n_layer >= 1, "model.n_layer must be at least 1, got {}", n_layer);
  MT_CHECK(n_head >= 1, "model.n_head must be at least 1, got {}", n_head);
  MT_CHECK(n_kv_head >= 1 && n_head % n_kv_head == 0,
           "model.n_kv_head ({}) must be at least 1 and divide model.n_head ({})", n_kv_head,
           n_head);
  MT_CHECK(n_embd >= 1, "model.n_embd must be at least 1, got {}", n_embd);
  MT_CHECK(head_dim > 0 || n_embd % n_head == 0,
           "model.n_embd ({}) must be a multiple of model.n_head ({}) (or give head_dim)", n_embd,
           n_head);
  MT_CHECK(head_size() >= 2 && head_size() % 2 == 0,
           "the head dimension ({}) must be even for rotary embeddings", head_size());
  MT_CHECK(intermediate_size >= 1, "model.intermediate_size must be at least 1, got {}",
           intermediate_size);
  MT_CHECK(block_size >= 1, "model.block_size must be at least 1, got {}", block_size);
  MT_CHECK(vocab_size >= 2, "model.vocab_size must be at least 2, got {}", vocab_size);
  MT_CHECK(padded_vocab >= vocab_size, "model.padded_vocab ({}) is below model.vocab_size ({})",
           padded_vocab, vocab_size);
  MT_CHECK(rope.theta > 0, "model.rope_theta must be positive, got {}", rope.theta);
  MT_CHECK(rms_norm_eps > 0, "model.rms_norm_eps must be positive, got {}", rms_norm_eps);
  MT_CHECK(arch != "qwen2" || qkv_bias, "model.arch qwen2 always has q/k/v biases (qkv_bias)");
}

void LlamaConfig::validate_tp(int tp) const {
  MT_CHECK(tp >= 1, "the tensor-parallel size must be at least 1, got {}", tp);
  if (tp == 1) return;
  MT_CHECK(n_head % tp == 0,
           "the model cannot be split across {} tensor-parallel ranks (train.tp = {}): "
           "model.n_head ({}) must be a multiple of train.tp (each rank holds whole query heads; "
           "model.n_kv_head = {})",
           tp, tp, n_head, n_kv_head);
  // KV heads: split when TP divides them; with fewer KV heads than ranks each KV head is held
  // by tp / n_kv_head consecutive ranks (Megatron-LM's and vLLM's replication), which needs
  // every rank's query heads to share one KV head.
  MT_CHECK(n_kv_head % tp == 0 || tp % n_kv_head == 0,
           "the model cannot be split across {} tensor-parallel ranks (train.tp = {}): "
           "model.n_kv_head ({}) must be a multiple of train.tp, or train.tp a multiple of "
           "model.n_kv_head (each KV head then held by train.tp / model.n_kv_head ranks)",
           tp, tp, n_kv_head);
  MT_CHECK(intermediate_size % tp == 0,
           "the model cannot be split across {} tensor-parallel ranks: model.intermediate_size "
           "({}) must be a multiple of the tensor-parallel size",
           tp, intermediate_size);
  MT_CHECK(padded_vocab % tp == 0,
           "the model cannot be split across {} tensor-parallel ranks: the padded vocabulary ({}) "
           "must be a multiple of the tensor-parallel size (pad_vocab(vocab_size, 128 x TP))",
           tp, padded_vocab);
}

namespace {
// Elements of one layer: split ones (divided by TP), the KV projections (k, v and their biases:
// divided by TP, or by n_kv_head when fewer KV heads than ranks replicate them) and replicated
// ones.
struct LayerCount {
  std::int64_t split = 0, kv = 0, replicated = 0;
};
LayerCount layer_count(const LlamaConfig& c) {
  const std::int64_t C = c.n_embd, D = c.head_size(), H = c.n_head, KV = c.n_kv_head,
                     F = c.intermediate_size;
  LayerCount n;
  n.split = H * D * C + H * D * C + 3 * C * F;
  n.kv = 2 * KV * D * C;
  if (c.qkv_bias) {
    n.split += H * D;
    n.kv += 2 * KV * D;
  }
  n.replicated = 2 * C + (c.o_bias ? C : 0);
  return n;
}
// The ways the KV heads are split over `tp` ranks (fewer than tp: each is replicated).
int kv_splits(const LlamaConfig& c, int tp) {
  return std::min(tp, c.n_kv_head);
}
}  // namespace

std::int64_t LlamaConfig::num_parameters() const {
  const LayerCount l = layer_count(*this);
  const std::int64_t emb = static_cast<std::int64_t>(vocab_size) * n_embd;
  return emb * (tie_word_embeddings ? 1 : 2) + n_layer * (l.split + l.kv + l.replicated) + n_embd;
}

std::int64_t LlamaConfig::num_parameters_per_rank(int tp) const {
  validate_tp(tp);
  const LayerCount l = layer_count(*this);
  const std::int64_t emb = static_cast<std::int64_t>(padded_vocab) * n_embd;
  const std::int64_t split = emb * (tie_word_embeddings ? 1 : 2) + n_layer * l.split;
  return split / tp + n_layer * (l.kv / kv_splits(*this, tp) + l.replicated) + n_embd;
}

double LlamaConfig::training_flops_per_token(int seq) const {
  const LayerCount l = layer_count(*this);
  const double bias = qkv_bias ? static_cast<double>(n_head + 2 * n_kv_head) * head_size() : 0.0;
  // Matmul weights: every layer's projections, and the LM head (tied or not); the embedding
  // lookup of an untied model is not a matmul.
  const double matmul =
      static_cast<double>(n_layer) * (static_cast<double>(l.split + l.kv) - bias) +
      static_cast<double>(vocab_size) * n_embd;
  return 6.0 * matmul +
         12.0 * n_layer * static_cast<double>(n_head) * head_size() * static_cast<double>(seq);
}

std::string LlamaConfig::str() const {
  return fmt::format(
      "{}: {} layers, {} heads ({} KV), width {}, MLP {}, block {}, vocab {} (padded {}), {}, "
      "{:.2f}M params",
      arch, n_layer, n_head, n_kv_head, n_embd, intermediate_size, block_size, vocab_size,
      padded_vocab, tie_word_embeddings ? "tied" : "untied", num_parameters() / 1e6);
}

MemoryEstimate estimate_memory(const LlamaConfig& cfg, const PrecisionPolicy& policy, int batch,
                               int seq, int tp, int dp, bool zero, bool sequence_parallel) {
  MT_CHECK(dp >= 1, "estimate_memory: the data-parallel size must be at least 1, got {}", dp);
  const std::int64_t n = cfg.num_parameters_per_rank(tp);
  MemoryEstimate m = parameter_memory(n, policy, dp, zero);
  const std::int64_t bt = static_cast<std::int64_t>(batch) * seq, c = cfg.n_embd;
  const std::int64_t a = static_cast<std::int64_t>(dtype_size(policy.activation));
  const std::int64_t d = cfg.head_size(), hl = cfg.n_head / tp,
                     kvl = cfg.n_kv_head / kv_splits(cfg, tp), fl = cfg.intermediate_size / tp;
  // r: the share of the tokens the norm and residual region holds (sequence parallelism: 1/TP).
  const std::int64_t r = sequence_parallel && tp > 1 ? tp : 1;
  // Per layer, as Llama::ensure_slot allocates: residual, ln1, residual2, ln2 (C, replicated
  // under TP, a token shard under SP); qkv ((H + 2 KV) D), atty (H D), gate|up (2F), swiglu
  // (F), split over TP; fp32 rstd x 2 (on the shard under SP) and lse per local head.
  const std::int64_t per_layer = bt * c * a * 4 / r +
                                 bt * ((hl + 2 * kvl) * d + hl * d + 3 * fl) * a + bt * 4 * 2 / r +
                                 static_cast<std::int64_t>(batch) * hl * seq * 4;
  // Final: residual out, lnf and its rstd (shards under SP), logits (this rank's columns), fp32
  // losses and lse; backward scratch dresidual, dln (C, shards under SP), datty, dqkv, dgate|up,
  // dswiglu (split); under SP two [B, T, C] workspaces for the gathered and pre-scatter tensors
  // and the C fp32 of one RMSNorm's summed gradient.
  const std::int64_t sp_work = r > 1 ? bt * c * a * 2 + c * 4 : 0;
  const std::int64_t final_acts = bt * c * a * 2 / r + bt * (cfg.padded_vocab / tp) * a +
                                  bt * 4 / r + bt * 4 * 2 + bt * c * a * 2 / r +
                                  bt * (hl * d + (hl + 2 * kvl) * d + 3 * fl) * a + sp_work;
  m.activations = cfg.n_layer * per_layer + final_acts;
  return m;
}

std::vector<ParamInfo> Llama::build_layout(const LlamaConfig& cfg, int tp, LlamaStage stage,
                                           Indices* idx) {
  cfg.validate();
  cfg.validate_tp(tp);
  const int last = stage.last_layer < 0 ? cfg.n_layer : stage.last_layer;
  MT_CHECK(stage.first_layer >= 0 && stage.first_layer < last && last <= cfg.n_layer,
           "Llama stage [{}, {}) is not a non-empty range of the model's {} layers",
           stage.first_layer, last, cfg.n_layer);
  std::vector<ParamInfo> params;
  std::int64_t n = 0;
  auto add = [&](const std::string& name, const Shape& full, bool decay, int shard_dim = -1,
                 int max_shards = 0) {
    ParamInfo p;
    p.name = name;
    p.offset = n;
    p.full_shape = full;
    p.shard_dim = shard_dim;
    p.shard_parts = 1;
    p.max_shards = max_shards;
    p.shape = shard_dim < 0 ? full : parallel::shard_shape(full, shard_dim, 1, p.shard_count(tp));
    p.decay = decay;
    n += p.numel();
    params.push_back(std::move(p));
    return static_cast<int>(params.size()) - 1;
  };
  Indices ix;
  const std::int64_t c = cfg.n_embd, d = cfg.head_size(), f = cfg.intermediate_size;
  const std::int64_t qw = cfg.n_head * d, kvw = cfg.n_kv_head * d;
  auto embedding = [&] {
    const int i = add("model.embed_tokens.weight", Shape{cfg.padded_vocab, c}, true, 0);
    params[i].real_rows = cfg.vocab_size;
    return i;
  };
  if (stage.first_layer == 0) {
    ix.embed = embedding();
  } else if (last == cfg.n_layer && cfg.tie_word_embeddings) {
    // The last stage's copy of a tied embedding sits at offset 0, as GPT's does: its gradient is
    // final only once the embedding group has summed it, and at offset 0 it lands in the last
    // DP bucket, so the layers' buckets are reduced during backward meanwhile. The gradient
    // norm and checkpoints count the first stage's original only.
    ix.tied_copy = embedding();
    params[ix.tied_copy].tied_copy = true;
  }
  for (int l = stage.first_layer; l < last; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    Layer L;
    L.ln1 = add(p + "input_layernorm.weight", Shape{c}, false);
    // Adjacent, so that [q | k | v] is one fused weight (and bias) in the flat buffer.
    L.q_w = add(p + "self_attn.q_proj.weight", Shape{qw, c}, true, 0);
    // K and V are cut into at most n_kv_head slices: with more ranks than KV heads, the ranks
    // whose query heads share KV head j each hold it (ParamSlot::max_shards).
    L.k_w = add(p + "self_attn.k_proj.weight", Shape{kvw, c}, true, 0, cfg.n_kv_head);
    L.v_w = add(p + "self_attn.v_proj.weight", Shape{kvw, c}, true, 0, cfg.n_kv_head);
    if (cfg.qkv_bias) {
      L.q_b = add(p + "self_attn.q_proj.bias", Shape{qw}, false, 0);
      add(p + "self_attn.k_proj.bias", Shape{kvw}, false, 0, cfg.n_kv_head);
      add(p + "self_attn.v_proj.bias", Shape{kvw}, false, 0, cfg.n_kv_head);
    }
    L.o_w = add(p + "self_attn.o_proj.weight", Shape{c, qw}, true, 1);
    if (cfg.o_bias) L.o_b = add(p + "self_attn.o_proj.bias", Shape{c}, false);
    L.ln2 = add(p + "post_attention_layernorm.weight", Shape{c}, false);
    L.gate = add(p + "mlp.gate_proj.weight", Shape{f, c}, true, 0);
    L.up = add(p + "mlp.up_proj.weight", Shape{f, c}, true, 0);
    L.down = add(p + "mlp.down_proj.weight", Shape{c, f}, true, 1);
    ix.layers.push_back(L);
  }
  if (last == cfg.n_layer) {
    ix.norm = add("model.norm.weight", Shape{c}, false);
    if (!cfg.tie_word_embeddings) {
      ix.head = add("lm_head.weight", Shape{cfg.padded_vocab, c}, true, 0);
      params[ix.head].real_rows = cfg.vocab_size;
    }
  }
  if (idx != nullptr) *idx = std::move(ix);
  return params;
}

std::vector<ParamInfo> Llama::param_layout(const LlamaConfig& cfg, int tp, LlamaStage stage) {
  return build_layout(cfg, tp, stage, nullptr);
}

Llama::Llama(const LlamaConfig& cfg, const PrecisionPolicy& policy, Device& device,
             parallel::TPGroup tp, LlamaStage stage, int micro_batches)
    : cfg_(cfg), policy_(policy), device_(&device), tp_(tp) {
  MT_CHECK(micro_batches >= 1, "Llama: micro_batches must be at least 1, got {}", micro_batches);
  Indices ix;
  params_ = build_layout(cfg_, tp_.size(), stage, &ix);
  first_ = stage.first_layer;
  last_ = stage.last_layer < 0 ? cfg_.n_layer : stage.last_layer;
  // A stage's input and output would be the token shard, which forward_micro's [B, T, C]
  // hidden-state contract cannot describe (B and T are read from it).
  MT_CHECK(!tp_.sequence_parallel() || (first_ == 0 && last_ == cfg_.n_layer),
           "Llama stage [{}, {}): sequence parallelism (tp.sequence_parallel) runs a Llama-family "
           "model whole only; its pipeline stage boundary on the token shard is not defined yet",
           first_, last_);
  const int k = tp_.size();
  heads_ = cfg_.n_head / k;
  kv_heads_ = cfg_.n_kv_head / kv_splits(cfg_, k);
  ffn_ = cfg_.intermediate_size / k;
  q_width_ = static_cast<std::int64_t>(heads_) * cfg_.head_size();
  kv_width_ = static_cast<std::int64_t>(kv_heads_) * cfg_.head_size();
  vocab_start_ = static_cast<std::int64_t>(cfg_.padded_vocab / k) * tp_.rank();
  embed_ = ix.embed;
  norm_ = ix.norm;
  head_ = ix.head;
  tied_copy_ = ix.tied_copy;
  layers_ = std::move(ix.layers);
  num_params_ = parallel::flat_numel(params_, "Llama");
  params_flat_ = Tensor::zeros(Shape{num_params_}, policy_.param, device);
  grads_flat_ = Tensor::zeros(Shape{num_params_}, DType::kF32, device);
  if (has_head()) {
    const int w = head_ >= 0 ? head_ : (tied_copy_ >= 0 ? tied_copy_ : embed_);
    head_w_ = param(w);
  }
  slots_.resize(static_cast<std::size_t>(micro_batches));
  if (k > cfg_.n_kv_head) {
    // The ranks sharing a KV head: consecutive, tp / n_kv_head of them (as ParamSlot's
    // replicas). Collective over the TP group.
    const int reps = k / cfg_.n_kv_head;
    kv_group_ = std::make_unique<comm::Communicator>(
        tp_.comm()->split(/*color=*/tp_.rank() / reps, /*key=*/tp_.rank() % reps));
  }
}

Tensor Llama::param(std::size_t i) const {
  const ParamInfo& p = params_.at(i);
  return params_flat_.slice(p.offset, p.shape.numel()).view(p.shape);
}

Tensor Llama::grad(std::size_t i) const {
  const ParamInfo& p = params_.at(i);
  return grads_flat_.slice(p.offset, p.shape.numel()).view(p.shape);
}

Tensor Llama::fused(int first_slot, int count) const {
  const ParamInfo& a = params_.at(first_slot);
  const ParamInfo& z = params_.at(first_slot + count - 1);
  const std::int64_t n = z.offset + z.numel() - a.offset;
  if (a.shape.ndim() == 1) return params_flat_.slice(a.offset, n);
  return params_flat_.slice(a.offset, n).view(Shape{n / a.shape[1], a.shape[1]});
}

Tensor Llama::fused_grad(int first_slot, int count) const {
  const ParamInfo& a = params_.at(first_slot);
  const ParamInfo& z = params_.at(first_slot + count - 1);
  const std::int64_t n = z.offset + z.numel() - a.offset;
  if (a.shape.ndim() == 1) return grads_flat_.slice(a.offset, n);
  return grads_flat_.slice(a.offset, n).view(Shape{n / a.shape[1], a.shape[1]});
}

Tensor Llama::initial_weights(std::uint64_t seed) const {
  // Streams are the parameters' indices in the whole model's TP = 1 layout, so that every stage
  // and every TP rank draws the values the whole model has; the tied copy draws the embedding.
  std::map<std::string, std::uint64_t> stream;
  {
    const std::vector<ParamInfo> whole = param_layout(cfg_, 1);
    for (std::size_t i = 0; i < whole.size(); ++i) stream.emplace(whole[i].name, i);
  }
  Tensor weights = Tensor::zeros(Shape{num_params_}, DType::kF32, *device_);
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const ParamInfo& p = params_[i];
    Tensor m = parallel::slot_view(weights, p);
    const bool split = p.shard_dim >= 0 && p.shard_count(tp_.size()) > 1;
    Tensor full = split ? Tensor::empty(p.full_shape, DType::kF32) : m;
    const bool is_bias = p.name.size() >= 5 && p.name.compare(p.name.size() - 5, 5, ".bias") == 0;
    const bool is_norm = p.name.find("norm") != std::string::npos;
    if (is_bias) {
      full.zero_();
    } else if (is_norm) {
      full.copy_from(Tensor::from_floats(std::vector<float>(p.full_shape.numel(), 1.0f),
                                         p.full_shape, DType::kF32));
    } else {
      fill_normal(full, Philox(seed, stream.at(p.name)), 0.0f, 0.02f);
    }
    if (p.real_rows >= 0 && p.real_rows < p.full_shape[0])
      full.slice(p.real_rows, p.full_shape[0] - p.real_rows).zero_();
    if (split) parallel::copy_slot_shard(m, full, p, tp_.rank(), tp_.size());
  }
  return weights;
}

void Llama::set_weights(const Tensor& weights) {
  MT_CHECK(weights.defined() && weights.dtype() == DType::kF32 && weights.numel() == num_params_,
           "Llama::set_weights: expected fp32 flat weights of {} elements, got {}", num_params_,
           weights.defined() ? weights.str() : std::string("(none)"));
  if (weights.data() != params_flat_.data()) params_flat_.copy_from(weights);
}

void Llama::ensure_rope(int positions) {
  if (rope_.defined() && rope_.dim(0) >= positions) return;
  // Grown geometrically up to the longest sequence actually run, never to
  // max_position_embeddings (131072 rows for Llama 3.1 would be 64 MiB of table).
  int rows = std::max(positions, rope_.defined() ? static_cast<int>(rope_.dim(0)) * 2 : positions);
  rows = std::min(rows, cfg_.block_size);
  MT_ASSERT(rows >= positions, "rope table of {} rows for {} positions", rows, positions);
  rope_ = Tensor::empty(Shape{rows, cfg_.head_size()}, DType::kF32, *device_);
  ops::rope_table(rope_, cfg_.rope);
}

void Llama::ensure_slot(Slot& s, int batch, int seq) {
  if (batch == s.batch && seq == s.seq) return;
  Device& d = *device_;
  const DType a = policy_.activation;
  const std::int64_t b = batch, t = seq, c = cfg_.n_embd;
  // The norm and residual region: every token, or this rank's token shard under sequence
  // parallelism (parallel/tensor_parallel.hpp).
  const bool sp = tp_.sequence_parallel();
  const std::int64_t ts = sp ? tp_.shard_tokens(b * t) : b * t;
  const Shape region = sp ? Shape{ts, c} : Shape{b, t, c};
  s.acts.clear();
  for (int l = first_; l < last_; ++l) {
    LayerActs x;
    x.residual = Tensor::empty(region, a, d);
    x.ln1 = Tensor::empty(region, a, d);
    x.ln1_rstd = Tensor::empty(Shape{ts}, DType::kF32, d);
    x.qkv = Tensor::empty(Shape{b, t, q_width_ + 2 * kv_width_}, a, d);
    x.atty = Tensor::empty(Shape{b, t, q_width_}, a, d);
    x.lse = Tensor::empty(Shape{b, heads_, t}, DType::kF32, d);
    x.residual2 = Tensor::empty(region, a, d);
    x.ln2 = Tensor::empty(region, a, d);
    x.ln2_rstd = Tensor::empty(Shape{ts}, DType::kF32, d);
    x.gateup = Tensor::empty(Shape{b, t, 2 * static_cast<std::int64_t>(ffn_)}, a, d);
    x.swi = Tensor::empty(Shape{b, t, ffn_}, a, d);
    s.acts.push_back(std::move(x));
  }
  s.residual_out = Tensor::empty(region, a, d);
  if (has_head()) {
    s.lnf = Tensor::empty(region, a, d);
    s.lnf_rstd = Tensor::empty(Shape{ts}, DType::kF32, d);
    s.logits = Tensor::empty(Shape{b, t, cfg_.padded_vocab / tp_.size()}, a, d);
    s.losses = Tensor::empty(Shape{b * t}, DType::kF32, d);
    s.lse = Tensor::empty(Shape{b * t}, DType::kF32, d);
  }
  s.batch = batch;
  s.seq = seq;
}

void Llama::ensure_scratch(int batch, int seq) {
  if (batch == scratch_b_ && seq == scratch_t_) return;
  Device& d = *device_;
  const DType a = policy_.activation;
  const std::int64_t b = batch, t = seq, c = cfg_.n_embd;
  const bool sp = tp_.sequence_parallel();
  const Shape region = sp ? Shape{tp_.shard_tokens(b * t), c} : Shape{b, t, c};
  dresidual_ = Tensor::empty(region, a, d);
  dln_ = Tensor::empty(region, a, d);
  if (sp) {
    sp_x_ = Tensor::empty(Shape{b, t, c}, a, d);
    sp_dx_ = Tensor::empty(Shape{b, t, c}, a, d);
    sp_norm_grad_ = Tensor::empty(Shape{c}, DType::kF32, d);
  }
  datty_ = Tensor::empty(Shape{b, t, q_width_}, a, d);
  dqkv_ = Tensor::empty(Shape{b, t, q_width_ + 2 * kv_width_}, a, d);
  dgateup_ = Tensor::empty(Shape{b, t, 2 * static_cast<std::int64_t>(ffn_)}, a, d);
  dswi_ = Tensor::empty(Shape{b, t, ffn_}, a, d);
  scratch_b_ = batch;
  scratch_t_ = seq;
}

std::int64_t Llama::activation_bytes() const {
  std::int64_t total = 0;
  auto add = [&](const Tensor& t) {
    if (t.defined()) total += static_cast<std::int64_t>(t.nbytes());
  };
  for (const Slot& s : slots_) {
    for (const LayerActs& x : s.acts)
      for (const Tensor* t : {&x.residual, &x.ln1, &x.ln1_rstd, &x.qkv, &x.atty, &x.lse,
                              &x.residual2, &x.ln2, &x.ln2_rstd, &x.gateup, &x.swi})
        add(*t);
    for (const Tensor* t : {&s.residual_out, &s.lnf, &s.lnf_rstd, &s.logits, &s.losses, &s.lse})
      add(*t);
  }
  for (const Tensor* t : {&dresidual_, &dln_, &datty_, &dqkv_, &dgateup_, &dswi_, &sp_x_, &sp_dx_,
                          &sp_norm_grad_, &rope_})
    add(*t);
  return total;
}

const Tensor& Llama::output_hidden(int micro) const {
  MT_CHECK(micro >= 0 && micro < micro_batches(), "Llama: micro-batch slot {} of {}", micro,
           micro_batches());
  return slots_[micro].residual_out;
}

float Llama::forward_micro(int micro, const Tensor& input, const Tensor& targets) {
  MT_CHECK(micro >= 0 && micro < micro_batches(),
           "Llama forward: micro-batch slot {} is outside [0, {})", micro, micro_batches());
  MT_CHECK(input.defined() && input.ndim() >= 2, "Llama forward: no input");
  const int b = static_cast<int>(input.dim(0)), t = static_cast<int>(input.dim(1));
  if (has_embedding()) {
    MT_CHECK(input.dtype() == DType::kI32 && input.ndim() == 2,
             "Llama forward: the first stage takes int32 tokens [B, T], got {}", input.str());
  } else {
    MT_CHECK(input.ndim() == 3 && input.dim(2) == cfg_.n_embd,
             "Llama forward: stage [{}, {}) takes hidden states [B, T, {}], got {}", first_, last_,
             cfg_.n_embd, input.str());
  }
  MT_CHECK(t >= 1 && t <= cfg_.block_size,
           "Llama forward: sequence length {} must be in [1, {}] (model.block_size)", t,
           cfg_.block_size);
  MT_CHECK(b >= 1, "Llama forward: batch size must be at least 1, got {}", b);
  if (targets.defined()) {
    MT_CHECK(has_head(), "Llama forward: targets given to stage [{}, {}), which has no head",
             first_, last_);
    MT_CHECK(targets.dtype() == DType::kI32 && targets.ndim() == 2 && targets.dim(0) == b &&
                 targets.dim(1) == t,
             "Llama forward: targets must be int32 [{}, {}], got {}", b, t, targets.str());
  }
  Slot& s = slots_[micro];
  ensure_slot(s, b, t);
  ensure_rope(t);
  const float eps = cfg_.rms_norm_eps;
  LayerActs& x0 = s.acts[0];
  // Sequence parallelism: the RMSNorms and residual adds run on this rank's token shard; every
  // column-parallel layer (q|k|v, gate|up, the LM head) reads the shard's all-gather (sp_x_),
  // and o_proj and down_proj reduce-scatter their partial sums into the shard
  // (parallel/tensor_parallel.hpp). Rotary embeddings and attention run on the gathered
  // [B, T, ...] projections, where every position is present, so they see the positions they
  // would without it.
  const bool sp = tp_.sequence_parallel();
  if (sp) ensure_scratch(b, t);
  auto gathered = [&](const Tensor& shard) -> const Tensor& {
    if (!sp) return shard;
    tp_.gather_tokens(sp_x_, shard);
    return sp_x_;
  };
  auto row_forward = [&](Tensor& y, const Tensor& x, int w, int bias) {
    Tensor bias_t;
    if (bias >= 0) bias_t = param(bias);
    const Tensor* bp = bias >= 0 ? &bias_t : nullptr;
    if (sp) {
      parallel::row_linear_forward_sp(y, sp_x_, x, param(w), bp, tp_);
    } else {
      parallel::row_linear_forward(y, x, param(w), bp, tp_);
    }
  };
  if (has_embedding()) {
    s.tokens = input.device().is_cpu() && !device_->is_cpu() ? input.to(*device_) : input;
    const std::vector<std::int32_t> ids = input.to_ints();
    for (std::size_t i = 0; i < ids.size(); ++i)
      MT_CHECK(ids[i] >= 0 && ids[i] < cfg_.vocab_size,
               "Llama forward: token id {} at (batch {}, position {}) is outside the vocabulary "
               "of {}",
               ids[i], i / t, i % t, cfg_.vocab_size);
    if (sp) {
      // The rows are summed into this rank's token shard (a reduce-scatter); sp_x_ is the
      // workspace every token's partial rows are written to.
      s.embedding.forward(sp_x_, ids, b, t, param(embed_), Tensor(), vocab_start_, tp_,
                          &x0.residual);
    } else if (tp_.active()) {
      s.embedding.forward(x0.residual, ids, b, t, param(embed_), Tensor(), vocab_start_, tp_);
    } else {
      ops::embedding_forward(x0.residual, s.tokens, param(embed_), Tensor());
    }
  } else {
    x0.residual.copy_from(input);
  }
  ops::rmsnorm_forward(x0.ln1, x0.ln1_rstd, x0.residual, param(layers_[0].ln1), eps);
  const int n = last_ - first_;
  for (int i = 0; i < n; ++i) {
    const Layer& L = layers_[i];
    LayerActs& x = s.acts[i];
    Tensor qkv_b;
    if (L.q_b >= 0) qkv_b = fused(L.q_b, 3);
    parallel::column_linear_forward(x.qkv, gathered(x.ln1), fused(L.q_w, 3),
                                    L.q_b >= 0 ? &qkv_b : nullptr);
    ops::rope_forward(x.qkv, x.qkv, rope_, heads_, kv_heads_);
    ops::attention_forward(x.atty, x.lse, x.qkv, heads_, kv_heads_);
    // o_proj's bias (Llama with attention_bias) is added by TP rank 0 before the sum, where
    // every token is present: its gradient needs no sum over the shards.
    row_forward(x.residual2, x.atty, L.o_w, L.o_b);
    ops::residual_rmsnorm_forward(x.residual2, x.ln2, x.ln2_rstd, x.residual2, x.residual,
                                  param(L.ln2), eps);
    parallel::column_linear_forward(x.gateup, gathered(x.ln2), fused(L.gate, 2), nullptr);
    ops::swiglu_forward(x.swi, x.gateup);
    const bool last = i + 1 == n;
    Tensor& next = last ? s.residual_out : s.acts[i + 1].residual;
    row_forward(next, x.swi, L.down, -1);
    if (!last) {
      LayerActs& nx = s.acts[i + 1];
      ops::residual_rmsnorm_forward(next, nx.ln1, nx.ln1_rstd, next, x.residual2,
                                    param(layers_[i + 1].ln1), eps);
    } else if (has_head()) {
      ops::residual_rmsnorm_forward(next, s.lnf, s.lnf_rstd, next, x.residual2, param(norm_), eps);
    } else {
      ops::add(next, next, x.residual2);
    }
  }
  s.have_targets = false;
  if (!has_head()) return std::numeric_limits<float>::quiet_NaN();
  parallel::column_linear_forward(s.logits, gathered(s.lnf), head_w_, nullptr);
  if (!targets.defined()) return std::numeric_limits<float>::quiet_NaN();
  s.have_targets = true;
  s.targets = targets.device().is_cpu() && !device_->is_cpu() ? targets.to(*device_) : targets;
  const std::int64_t bt = static_cast<std::int64_t>(b) * t;
  const std::int64_t vocab_local = cfg_.padded_vocab / tp_.size();
  Tensor logits2d = s.logits.view(Shape{bt, vocab_local});
  const std::vector<std::int32_t> tg = targets.to_ints();
  if (tp_.active()) {
    s.cross_entropy.forward(s.losses, logits2d, tg, vocab_start_, cfg_.vocab_size, tp_);
  } else {
    ops::cross_entropy_forward(s.losses, s.lse, logits2d, s.targets.view(Shape{bt}),
                               cfg_.vocab_size);
  }
  std::int64_t counted = 0;
  for (std::int32_t v : tg) counted += v >= 0;
  s.valid_targets = static_cast<float>(counted);
  if (counted == 0) return 0.0f;
  double sum = 0.0;
  for (float v : s.losses.to_floats()) sum += v;
  return static_cast<float>(sum / static_cast<double>(counted));
}

void Llama::backward_micro(int micro, float loss_multiplier, const Tensor& doutput) {
  MT_CHECK(micro >= 0 && micro < micro_batches(),
           "Llama backward: micro-batch slot {} is outside [0, {})", micro, micro_batches());
  Slot& s = slots_[micro];
  MT_CHECK(s.batch > 0, "Llama backward: slot {} has no forward", micro);
  const std::int64_t bt = static_cast<std::int64_t>(s.batch) * s.seq;
  ensure_scratch(s.batch, s.seq);
  // Sequence parallelism: the backward of the forward's all-gather before a column-parallel
  // layer is a reduce-scatter of its input gradient (column_linear_backward_sp, after
  // re-gathering the layer's input for its weight gradient: the gathered copy is not kept per
  // layer); that of the reduce-scatter after o_proj and down_proj is an all-gather of their
  // output gradient. The RMSNorms saw this rank's tokens only: rmsnorm_backward sums their
  // weight gradients over the group.
  const bool sp = tp_.sequence_parallel();
  auto column_backward = [&](Tensor& dy, const Tensor& x, const Tensor& w, Tensor& dw) {
    if (sp) {
      tp_.gather_tokens(sp_x_, x);
      parallel::column_linear_backward_sp(dln_, sp_dx_, dw, nullptr, dy, sp_x_, w, tp_);
    } else {
      parallel::column_linear_backward(&dln_, dw, nullptr, dy, x, w, tp_);
    }
  };
  auto row_backward = [&](Tensor& dx, const Tensor& x, int w, int bias) {
    Tensor dw = grad(w), db;
    if (bias >= 0) db = grad(bias);
    if (sp) tp_.gather_tokens(sp_x_, dresidual_);
    parallel::row_linear_backward(&dx, dw, bias >= 0 ? &db : nullptr, sp ? sp_x_ : dresidual_, x,
                                  param(w));
  };
  auto ready = [&](int first, int last) {
    if (grads_ready_)
      grads_ready_(params_[first].offset, params_[last].offset + params_[last].shape.numel());
  };
  if (has_head() && !has_embedding() && s.have_targets && s.valid_targets == 0) {
    // No counted target: a zero loss gradient, but the stages before this one still wait for
    // their input gradient (as GPT's head-only stage).
    s.have_targets = false;
    dresidual_.zero_();
    ready(norm_, head_ >= 0 ? head_ : norm_);
  } else if (has_head()) {
    MT_CHECK(s.have_targets, "Llama backward needs a forward with targets first");
    s.have_targets = false;  // the logits are overwritten by their gradient
    if (s.valid_targets == 0) return;
    Tensor logits2d = s.logits.view(Shape{bt, cfg_.padded_vocab / tp_.size()});
    if (tp_.active()) {
      s.cross_entropy.backward(logits2d, logits2d, loss_multiplier / s.valid_targets);
    } else {
      ops::cross_entropy_backward(logits2d, logits2d, s.lse, s.targets.view(Shape{bt}),
                                  cfg_.vocab_size, loss_multiplier / s.valid_targets);
    }
    const int hw = head_ >= 0 ? head_ : (tied_copy_ >= 0 ? tied_copy_ : embed_);
    Tensor dhead = grad(hw);
    column_backward(s.logits, s.lnf, head_w_, dhead);
    rmsnorm_backward(norm_, s.residual_out, s.lnf_rstd, /*accumulate_dx=*/false);
    // The tied embedding of a whole model is final only after the embedding's backward.
    ready(norm_, head_ >= 0 ? head_ : norm_);
  } else {
    MT_CHECK(doutput.defined() && doutput.numel() == dresidual_.numel(),
             "Llama backward: stage [{}, {}) needs the output gradient [{}, {}, {}], got {}",
             first_, last_, s.batch, s.seq, cfg_.n_embd,
             doutput.defined() ? doutput.str() : std::string("(none)"));
    dresidual_.copy_from(doutput);
  }
  for (int i = last_ - first_ - 1; i >= 0; --i) {
    const Layer& L = layers_[i];
    LayerActs& x = s.acts[i];
    row_backward(dswi_, x.swi, L.down, -1);
    ready(L.down, L.down);
    ops::swiglu_backward(dgateup_, dswi_, x.gateup);
    Tensor dw = fused_grad(L.gate, 2);
    column_backward(dgateup_, x.ln2, fused(L.gate, 2), dw);
    ready(L.gate, L.up);
    rmsnorm_backward(L.ln2, x.residual2, x.ln2_rstd, /*accumulate_dx=*/true);
    ready(L.ln2, L.ln2);
    row_backward(datty_, x.atty, L.o_w, L.o_b);
    ready(L.o_w, L.o_b >= 0 ? L.o_b : L.o_w);
    ops::attention_backward(dqkv_, datty_, x.qkv, x.atty, x.lse, heads_, kv_heads_);
    ops::rope_backward(dqkv_, dqkv_, rope_, heads_, kv_heads_);
    qkv_backward(L, x);
    ready(L.q_w, L.q_b >= 0 ? L.q_b + 2 : L.v_w);
    rmsnorm_backward(L.ln1, x.residual, x.ln1_rstd, /*accumulate_dx=*/true);
    ready(L.ln1, L.ln1);
  }
  if (has_embedding()) {
    Tensor dwte = grad(embed_), none;
    if (sp) {
      // Every rank's rows are looked up by tokens of every shard: the gathered gradient.
      tp_.gather_tokens(sp_x_, dresidual_);
      s.embedding.backward(dwte, none, sp_x_);
    } else if (tp_.active()) {
      s.embedding.backward(dwte, none, dresidual_);
    } else {
      ops::embedding_backward(dwte, none, dresidual_, s.tokens);
    }
    ready(embed_, embed_);
  }
  // The head's copy of a tied embedding (offset 0) last, as GPT's head-only stage reports it.
  if (tied_copy_ >= 0) ready(tied_copy_, tied_copy_);
}

void Llama::rmsnorm_backward(int w, const Tensor& x, const Tensor& rstd, bool accumulate_dx) {
  Tensor dg = grad(w);
  if (!tp_.sequence_parallel()) {
    ops::rmsnorm_backward(dresidual_, dg, dln_, x, param(w), rstd, accumulate_dx);
    return;
  }
  sp_norm_grad_.zero_();
  ops::rmsnorm_backward(dresidual_, sp_norm_grad_, dln_, x, param(w), rstd, accumulate_dx);
  parallel::accumulate_group_sum(dg, sp_norm_grad_, tp_);
}

void Llama::qkv_backward(const Layer& L, const LayerActs& x) {
  Tensor dw = fused_grad(L.q_w, 3), db;
  if (L.q_b >= 0) db = fused_grad(L.q_b, 3);
  // The fused projection's backward into dw, db (+=): under sequence parallelism from the
  // re-gathered ln1, its input gradient reduce-scattered into dln_'s token shard.
  const bool sp = tp_.sequence_parallel();
  if (sp) tp_.gather_tokens(sp_x_, x.ln1);
  auto project = [&](Tensor& gw, Tensor* gb) {
    if (sp) {
      parallel::column_linear_backward_sp(dln_, sp_dx_, gw, gb, dqkv_, sp_x_, fused(L.q_w, 3), tp_);
    } else {
      parallel::column_linear_backward(&dln_, gw, gb, dqkv_, x.ln1, fused(L.q_w, 3), tp_);
    }
  };
  if (!kv_group_) {
    project(dw, L.q_b >= 0 ? &db : nullptr);
    return;
  }
  // Replicated KV heads: this rank's k/v gradient is only its own query heads' share. The ranks
  // holding the KV head sum their shares over their sub-group before the update, so every
  // replica takes the same step (the TP = 1 gradient, summed in another order). This micro-
  // batch's gradient is formed apart from what flat_grads() has accumulated, which is already
  // the sum (identical on every replica) and must not be summed again.
  if (!kv_dw_.defined()) {
    kv_dw_ = Tensor::empty(dw.shape(), DType::kF32, *device_);
    if (L.q_b >= 0) kv_db_ = Tensor::empty(db.shape(), DType::kF32, *device_);
  }
  kv_dw_.zero_();
  if (L.q_b >= 0) kv_db_.zero_();
  project(kv_dw_, L.q_b >= 0 ? &kv_db_ : nullptr);
  // The k|v rows follow the q rows in the fused weight and bias: one allreduce each. Only the
  // sharers' shard travels, which is why a sub-communicator rather than a TP-wide allreduce of
  // every KV head's gradient (n_kv_head times the bytes).
  const std::int64_t c = cfg_.n_embd;
  kv_group_->allreduce(kv_dw_.flat().slice(q_width_ * c, 2 * kv_width_ * c)).wait();
  if (L.q_b >= 0) kv_group_->allreduce(kv_db_.slice(q_width_, 2 * kv_width_)).wait();
  Tensor dw_flat = dw.flat();
  ops::add(dw_flat, dw_flat, kv_dw_.flat());
  if (L.q_b >= 0) ops::add(db, db, kv_db_);
}

std::vector<float> Llama::decode(std::int32_t token) {
  MT_CHECK(has_embedding() && has_head(), "decode needs the whole model, not stage [{}, {})",
           first_, last_);
  MT_CHECK(token >= 0 && token < cfg_.vocab_size,
           "decode: token id {} is outside the vocabulary of {}", token, cfg_.vocab_size);
  MT_CHECK(
      cache_len_ < cfg_.block_size,
      "decode: the KV cache holds the model's {} positions; reset_cache() and re-feed a window",
      cfg_.block_size);
  Device& d = *device_;
  const DType a = policy_.activation;
  const std::int64_t c = cfg_.n_embd;
  if (!dec_x_.defined()) {
    dec_token_ = Tensor::empty(Shape{1, 1}, DType::kI32, d);
    dec_x_ = Tensor::empty(Shape{1, c}, a, d);
    dec_ln_ = Tensor::empty(Shape{1, c}, a, d);
    dec_rstd_ = Tensor::empty(Shape{1}, DType::kF32, d);
    dec_qkv_ = Tensor::empty(Shape{1, q_width_ + 2 * kv_width_}, a, d);
    dec_atty_ = Tensor::empty(Shape{1, q_width_}, a, d);
    dec_tmp_ = Tensor::empty(Shape{1, c}, a, d);
    dec_gateup_ = Tensor::empty(Shape{1, 2 * static_cast<std::int64_t>(ffn_)}, a, d);
    dec_swi_ = Tensor::empty(Shape{1, ffn_}, a, d);
    dec_logits_ = Tensor::empty(Shape{1, cfg_.padded_vocab / tp_.size()}, a, d);
    if (tp_.active()) dec_logits_full_ = Tensor::empty(Shape{cfg_.padded_vocab}, a, d);
  }
  const int pos = cache_len_;
  if (pos >= cache_cap_) {
    // The cache grows geometrically (copying what it holds), so a short generation with a
    // long-context model does not allocate max_position_embeddings rows per layer.
    const int cap = std::min(cfg_.block_size, std::max(256, 2 * cache_cap_));
    for (int l = 0; l < last_ - first_; ++l) {
      for (std::vector<Tensor>* cache : {&k_cache_, &v_cache_}) {
        Tensor grown = Tensor::empty(Shape{1, cap, kv_width_}, a, d);
        if (static_cast<int>(cache->size()) <= l) {
          cache->push_back(grown);
        } else {
          if (pos > 0)
            grown.view(Shape{cap, kv_width_})
                .slice(0, pos)
                .copy_from((*cache)[l].view(Shape{cache_cap_, kv_width_}).slice(0, pos));
          (*cache)[l] = grown;
        }
      }
    }
    cache_cap_ = cap;
  }
  ensure_rope(pos + 1);
  const float eps = cfg_.rms_norm_eps;
  std::int32_t host_token = token;
  dec_token_.copy_from(Tensor::wrap(&host_token, Shape{1, 1}, DType::kI32));
  Tensor x3 = dec_x_.view(Shape{1, 1, c});
  if (tp_.active()) {
    dec_embedding_.forward(x3, {token}, 1, 1, param(embed_), Tensor(), vocab_start_, tp_);
  } else {
    ops::embedding_forward(x3, dec_token_, param(embed_), Tensor());
  }
  for (int i = 0; i < last_ - first_; ++i) {
    const Layer& L = layers_[i];
    ops::rmsnorm_forward(dec_ln_, dec_rstd_, dec_x_, param(L.ln1), eps);
    Tensor qkv_b, o_b;
    if (L.q_b >= 0) qkv_b = fused(L.q_b, 3);
    if (L.o_b >= 0) o_b = param(L.o_b);
    parallel::column_linear_forward(dec_qkv_, dec_ln_, fused(L.q_w, 3),
                                    L.q_b >= 0 ? &qkv_b : nullptr);
    ops::rope_forward(dec_qkv_, dec_qkv_, rope_, heads_, kv_heads_, pos);
    ops::attention_decode(dec_atty_, k_cache_[i], v_cache_[i], dec_qkv_, pos, heads_, kv_heads_);
    parallel::row_linear_forward(dec_tmp_, dec_atty_, param(L.o_w), L.o_b >= 0 ? &o_b : nullptr,
                                 tp_);
    ops::add(dec_x_, dec_x_, dec_tmp_);
    ops::rmsnorm_forward(dec_ln_, dec_rstd_, dec_x_, param(L.ln2), eps);
    parallel::column_linear_forward(dec_gateup_, dec_ln_, fused(L.gate, 2), nullptr);
    ops::swiglu_forward(dec_swi_, dec_gateup_);
    parallel::row_linear_forward(dec_tmp_, dec_swi_, param(L.down), nullptr, tp_);
    ops::add(dec_x_, dec_x_, dec_tmp_);
  }
  ops::rmsnorm_forward(dec_ln_, dec_rstd_, dec_x_, param(norm_), eps);
  parallel::column_linear_forward(dec_logits_, dec_ln_, head_w_, nullptr);
  ++cache_len_;
  if (tp_.active()) tp_.comm()->all_gather(dec_logits_.flat(), dec_logits_full_).wait();
  std::vector<float> logits = (tp_.active() ? dec_logits_full_ : dec_logits_).to_floats();
  logits.resize(static_cast<std::size_t>(cfg_.vocab_size));
  return logits;
}

}  // namespace meshtrain::models
