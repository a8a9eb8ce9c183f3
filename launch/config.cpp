#include "launch/config.hpp"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>
#include <string_view>

#include <toml++/toml.h>

#include "launch/hf_llama.hpp"
#include "launch/toml_guard.hpp"
#include "parallel/grad_reducer.hpp"
#include "runtime/error.hpp"
#include "runtime/file_io.hpp"
#include "runtime/tokenizer.hpp"

namespace meshtrain::launch {
namespace {

enum class Kind { kInt, kUInt64, kDouble, kBool, kString, kStrings };

struct Key {
  std::string section, name;
  Kind kind;
  double lo, hi;                     // numeric range, inclusive
  std::vector<std::string> choices;  // allowed strings (empty = any)
  std::string help;
  std::function<void(TrainConfig&, const toml::node&, const std::string& where)> set;
  std::function<std::string(const TrainConfig&)> get;
  std::string full() const { return section + "." + name; }
};

std::string kind_name(Kind k) {
  switch (k) {
    case Kind::kInt:
    case Kind::kUInt64:
      return "integer";
    case Kind::kDouble:
      return "number";
    case Kind::kBool:
      return "boolean";
    case Kind::kString:
      return "string";
    case Kind::kStrings:
      return "list of strings";
  }
  return "?";
}

std::string node_kind(const toml::node& n) {
  switch (n.type()) {
    case toml::node_type::string:
      return "a string";
    case toml::node_type::integer:
      return "an integer";
    case toml::node_type::floating_point:
      return "a floating-point number";
    case toml::node_type::boolean:
      return "a boolean";
    case toml::node_type::array:
      return "an array";
    case toml::node_type::table:
      return "a table";
    default:
      return "a date or time";
  }
}

// A TOML basic string that reads back as s (valid UTF-8: TOML text and --set values are checked).
// Written here rather than by toml++'s printer, which chose multi-line literal strings that did
// not read back for some values with quotes and newlines (found by fuzzing).
std::string quote(const std::string& s) {
  std::string out = "\"";
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\r':
        out += "\\r";
        break;
      default:
        if (c < 0x20 || c == 0x7f)
          out += fmt::format("\\u{:04X}", c);
        else
          out += ch;
    }
  }
  return out + "\"";
}

template <typename T>
Key int_key(std::string section, std::string name, T TrainConfig::*member, double lo, double hi,
            std::string help) {
  Key k{std::move(section),
        std::move(name),
        std::is_same_v<T, std::uint64_t> ? Kind::kUInt64 : Kind::kInt,
        lo,
        hi,
        {},
        std::move(help),
        nullptr,
        nullptr};
  const std::string full = k.full();
  k.set = [member, lo, hi, full](TrainConfig& c, const toml::node& n, const std::string& where) {
    const auto v = n.value<std::int64_t>();
    MT_CHECK(n.is_integer() && v, "{}: '{}' must be an integer, got {}", where, full, node_kind(n));
    MT_CHECK(static_cast<double>(*v) >= lo && static_cast<double>(*v) <= hi,
             "{}: '{}' = {} is out of range: expected {} to {}", where, full, *v,
             static_cast<std::int64_t>(lo), static_cast<std::int64_t>(hi));
    c.*member = static_cast<T>(*v);
  };
  k.get = [member](const TrainConfig& c) { return std::to_string(c.*member); };
  return k;
}

Key double_key(std::string section, std::string name, double TrainConfig::*member, double lo,
               double hi, std::string help) {
  Key k{std::move(section), std::move(name), Kind::kDouble, lo, hi, {},
        std::move(help),    nullptr,         nullptr};
  const std::string full = k.full();
  k.set = [member, lo, hi, full](TrainConfig& c, const toml::node& n, const std::string& where) {
    const auto v = n.value<double>();
    MT_CHECK((n.is_floating_point() || n.is_integer()) && v, "{}: '{}' must be a number, got {}",
             where, full, node_kind(n));
    MT_CHECK(std::isfinite(*v) && *v >= lo && *v <= hi,
             "{}: '{}' = {} is out of range: expected {} to {}", where, full, *v, lo, hi);
    c.*member = *v;
  };
  k.get = [member](const TrainConfig& c) {
    // Shortest text that reads back as the same double, with a '.' or exponent as TOML wants.
    std::string s = fmt::format("{}", c.*member);
    if (s.find_first_of(".eE") == std::string::npos && s.find_first_of("in") == std::string::npos)
      s += ".0";
    return s;
  };
  return k;
}

Key bool_key(std::string section, std::string name, bool TrainConfig::*member, std::string help) {
  Key k{std::move(section), std::move(name), Kind::kBool, 0, 0, {},
        std::move(help),    nullptr,         nullptr};
  const std::string full = k.full();
  k.set = [member, full](TrainConfig& c, const toml::node& n, const std::string& where) {
    MT_CHECK(n.is_boolean(), "{}: '{}' must be true or false, got {}", where, full, node_kind(n));
    c.*member = *n.value<bool>();
  };
  k.get = [member](const TrainConfig& c) { return std::string(c.*member ? "true" : "false"); };
  return k;
}

Key string_key(std::string section, std::string name, std::string TrainConfig::*member,
               std::vector<std::string> choices, std::string help) {
  Key k{std::move(section), std::move(name), Kind::kString, 0, 0, choices,
        std::move(help),    nullptr,         nullptr};
  const std::string full = k.full();
  k.set = [member, choices, full](TrainConfig& c, const toml::node& n, const std::string& where) {
    MT_CHECK(n.is_string(), "{}: '{}' must be a string, got {}", where, full, node_kind(n));
    const std::string v = *n.value<std::string>();
    if (!choices.empty()) {
      bool ok = false;
      std::string list;
      for (const auto& ch : choices) {
        ok = ok || ch == v;
        list += (list.empty() ? "" : ", ") + ch;
      }
      MT_CHECK(ok, "{}: '{}' = \"{}\" is not one of: {}", where, full, v, list);
    }
    c.*member = v;
  };
  k.get = [member](const TrainConfig& c) { return quote(c.*member); };
  return k;
}

Key strings_key(std::string section, std::string name,
                std::vector<std::string> TrainConfig::*member, std::string help) {
  Key k{std::move(section), std::move(name), Kind::kStrings, 0, 0, {},
        std::move(help),    nullptr,         nullptr};
  const std::string full = k.full();
  k.set = [member, full](TrainConfig& c, const toml::node& n, const std::string& where) {
    std::vector<std::string> out;
    if (n.is_string()) {
      out.push_back(*n.value<std::string>());
    } else {
      MT_CHECK(n.is_array(), "{}: '{}' must be a list of strings, got {}", where, full,
               node_kind(n));
      for (const toml::node& e : *n.as_array()) {
        MT_CHECK(e.is_string(), "{}: every entry of '{}' must be a string", where, full);
        out.push_back(*e.value<std::string>());
      }
    }
    c.*member = out;
  };
  k.get = [member](const TrainConfig& c) {
    std::string s = "[";
    for (std::size_t i = 0; i < (c.*member).size(); ++i)
      s += (i ? ", " : "") + quote((c.*member)[i]);
    return s + "]";
  };
  return k;
}

const std::vector<Key>& keys() {
  constexpr double kMaxInt = std::numeric_limits<std::int32_t>::max();
  static const std::vector<Key> table = {
      string_key("model", "preset", &TrainConfig::model_preset, models::ModelConfig::preset_names(),
                 "model size preset (GPT-2 or Llama family)"),
      string_key("model", "arch", &TrainConfig::model_arch, {"auto", "gpt2", "llama", "qwen2"},
                 "decoder family: auto = the preset's; qwen2 = llama with q/k/v biases"),
      int_key("model", "n_layer", &TrainConfig::n_layer, 0, 1024, "layers (0 = preset)"),
      int_key("model", "n_head", &TrainConfig::n_head, 0, 1024, "attention heads (0 = preset)"),
      int_key("model", "n_embd", &TrainConfig::n_embd, 0, 65536, "width (0 = preset)"),
      int_key("model", "block_size", &TrainConfig::block_size, 0, 1 << 20,
              "maximum sequence length (0 = preset)"),
      int_key("model", "n_kv_head", &TrainConfig::n_kv_head, 0, 1024,
              "key/value heads, llama/qwen2 (0 = preset)"),
      int_key("model", "intermediate_size", &TrainConfig::intermediate_size, 0, 1 << 22,
              "SwiGLU MLP width, llama/qwen2 (0 = preset)"),
      double_key("model", "rope_theta", &TrainConfig::rope_theta, 0, 1e12,
                 "rotary embedding base, llama/qwen2 (0 = preset)"),
      double_key("model", "rms_norm_eps", &TrainConfig::rms_norm_eps, 0, 1,
                 "RMSNorm epsilon, llama/qwen2 (0 = preset)"),
      string_key("model", "tie_embeddings", &TrainConfig::tie_embeddings, {"auto", "true", "false"},
                 "LM head tied to the embedding, llama/qwen2 (auto = preset)"),
      string_key("model", "hf_config", &TrainConfig::hf_config, {},
                 "a Hugging Face Llama/Qwen2 config.json defining the model (import --hf)"),
      string_key("model", "vocab", &TrainConfig::vocab, {"auto", "bytes", "gpt2"},
                 "bytes: 256 symbols (text); gpt2: 50257 tokens (token shards); auto: by preset"),
      string_key("model", "init", &TrainConfig::model_init, {},
                 "start from these weights (a model.safetensors written by train or import) "
                 "instead of a random initialisation"),
      strings_key("data", "train", &TrainConfig::train_files,
                  "training files or globs (llm.c .bin shards or text); empty = built-in corpus"),
      strings_key("data", "val", &TrainConfig::val_files,
                  "validation files; empty = the last val_fraction of the training files"),
      string_key("data", "format", &TrainConfig::data_format, {"auto", "tokens", "text"},
                 "auto: .bin files are token shards, others text"),
      string_key("data", "tokenizer", &TrainConfig::data_tokenizer, {},
                 "a Hugging Face tokenizer.json: text is tokenized with it and the model's "
                 "vocabulary is its size"),
      double_key("data", "val_fraction", &TrainConfig::val_fraction, 0, 0.5,
                 "share of each training file held out for validation"),
      int_key("train", "steps", &TrainConfig::steps, 1, kMaxInt, "optimizer steps"),
      int_key("train", "batch_size", &TrainConfig::batch_size, 1, 1 << 16,
              "sequences per rank per micro-step"),
      int_key("train", "seq_len", &TrainConfig::seq_len, 1, 1 << 20, "tokens per sequence"),
      int_key("train", "grad_accum", &TrainConfig::grad_accum, 1, 1 << 16,
              "micro-steps per optimizer step"),
      string_key("train", "precision", &TrainConfig::precision, {"fp32", "bf16", "fp16"},
                 "precision policy"),
      string_key("train", "device", &TrainConfig::device, {"cpu", "cuda"},
                 "compute device; cuda: one GPU per rank, chosen by the local rank"),
      int_key("train", "seed", &TrainConfig::seed, 0, 9.007199254740992e15, "random seed"),
      double_key("train", "lr", &TrainConfig::lr, 0, 10, "peak learning rate"),
      double_key("train", "min_lr_ratio", &TrainConfig::min_lr_ratio, 0, 1,
                 "final learning rate as a fraction of lr"),
      int_key("train", "warmup_steps", &TrainConfig::warmup_steps, 0, kMaxInt,
              "linear warm-up steps"),
      string_key("train", "schedule", &TrainConfig::schedule, {"cosine", "constant", "wsd"},
                 "learning-rate schedule after warm-up"),
      double_key("train", "decay_fraction", &TrainConfig::decay_fraction, 0, 1,
                 "wsd: share of the steps spent decaying"),
      double_key("train", "weight_decay", &TrainConfig::weight_decay, 0, 10,
                 "AdamW decoupled weight decay (2-D weights only)"),
      double_key("train", "beta1", &TrainConfig::beta1, 0, 0.999999, "AdamW beta1"),
      double_key("train", "beta2", &TrainConfig::beta2, 0, 0.999999, "AdamW beta2"),
      double_key("train", "eps", &TrainConfig::eps, 1e-30, 1, "AdamW epsilon"),
      double_key("train", "grad_clip", &TrainConfig::grad_clip, 0, 1e6,
                 "clip the global gradient norm to this (0 = off)"),
      int_key("train", "max_bad_steps", &TrainConfig::max_bad_steps, 1, kMaxInt,
              "stop after this many non-finite steps in a row"),
      int_key("train", "threads", &TrainConfig::threads, 0, 4096,
              "CPU threads per rank (0 = automatic)"),
      int_key("train", "zero", &TrainConfig::zero, 0, 1,
              "1: ZeRO-1, AdamW on this rank's 1/DP shard (sharded Adam state)"),
      int_key("train", "tp", &TrainConfig::tp, 1, 1 << 16,
              "tensor-parallel size K: mpirun -np N runs DP = N/K x TP = K, TP innermost"),
      int_key("train", "pp", &TrainConfig::pp, 1, 1 << 16,
              "pipeline-parallel size P: mpirun -np N runs DP = N/(K P) x PP = P x TP = K, PP "
              "outermost; each stage holds a contiguous block of layers"),
      bool_key("tp", "sequence_parallel", &TrainConfig::tp_sequence_parallel,
               "sequence parallelism inside each TP group (needs train.tp > 1, train.seq_len a "
               "multiple of train.tp): LayerNorm and residual activations sharded over the "
               "group's ranks, all-gather and reduce-scatter in place of each allreduce"),
      string_key("pp", "schedule", &TrainConfig::pp_schedule, {"1f1b", "gpipe", "interleaved"},
                 "pipeline schedule of the train.grad_accum micro-batches: 1f1b (at most train.pp "
                 "micro-batches of activations alive per stage), gpipe (all forward, then all "
                 "backward) or interleaved (1F1B over pp.virtual_stages model chunks per stage: "
                 "about 1/V of 1F1B's bubble; train.grad_accum a multiple of train.pp)"),
      int_key("pp", "virtual_stages", &TrainConfig::pp_virtual_stages, 1, 1 << 10,
              "model chunks per pipeline stage V (pp.schedule = interleaved needs V >= 2): stage s "
              "holds chunks s, s + P, ... of V x P equal chunks, so model.n_layer must be a "
              "multiple of V x train.pp"),
      double_key("dp", "bucket_mb", &TrainConfig::dp_bucket_mb, 0, 1 << 16,
                 "data parallelism: gradient bucket size in MiB (0 = automatic: an eighth of the "
                 "gradients, 1 to 25 MiB)"),
      string_key("dp", "overlap", &TrainConfig::dp_overlap, {"on", "off"},
                 "data parallelism: reduce gradient buckets during backward (on) or after it"),
      string_key("dp", "reduce_dtype", &TrainConfig::dp_reduce_dtype, {"fp32", "bf16"},
                 "data parallelism: dtype gradients are averaged in (bf16: half the bytes)"),
      string_key("comm", "backend", &TrainConfig::comm_backend, {"auto", "nccl", "mpi"},
                 "collectives on model tensors (DP gradients, TP activations); auto: NCCL where "
                 "train.device = \"cuda\" and every rank of a group has its own GPU, else MPI"),
      int_key("eval", "every", &TrainConfig::eval_every, 0, kMaxInt,
              "validation loss every N steps (0 = only at the end)"),
      int_key("eval", "batches", &TrainConfig::eval_batches, 1, 1 << 20,
              "validation batches per evaluation"),
      int_key("sample", "every", &TrainConfig::sample_every, 0, kMaxInt,
              "generate a sample every N steps (0 = only at the end)"),
      int_key("sample", "tokens", &TrainConfig::sample_tokens, 0, 1 << 20, "tokens to generate"),
      double_key("sample", "temperature", &TrainConfig::temperature, 0, 100,
                 "sampling temperature (0 = greedy)"),
      int_key("sample", "top_k", &TrainConfig::top_k, 0, 1 << 20,
              "sample among the k most likely (0 = all)"),
      string_key("sample", "prompt", &TrainConfig::prompt, {}, "text the samples start from"),
      string_key("run", "dir", &TrainConfig::run_dir, {}, "run directory (config, metrics, logs)"),
      int_key("run", "log_every", &TrainConfig::log_every, 1, kMaxInt,
              "print a line every N steps"),
      string_key("trace", "steps", &TrainConfig::trace_steps, {},
                 "per-rank Chrome trace-event JSON (Perfetto) of these steps into "
                 "RUN_DIR/traces: \"5\", \"3-6\" or \"2,5-7\" (empty = off)"),
      int_key("checkpoint", "every", &TrainConfig::ckpt_every, 0, kMaxInt,
              "save a distributed checkpoint every N steps and at the end (0 = never)"),
      int_key("checkpoint", "keep", &TrainConfig::ckpt_keep, 0, kMaxInt,
              "newest checkpoints to keep (0 = all)"),
      string_key("checkpoint", "on_signal", &TrainConfig::ckpt_on_signal,
                 {"auto", "always", "never"},
                 "on SIGTERM, SIGINT or SIGUSR1 every rank stops after the step in flight and the "
                 "job exits with status 75; auto: with a checkpoint of that step if "
                 "checkpoint.every > 0, always: with one anyway, never: without"),
      string_key("checkpoint", "dir", &TrainConfig::ckpt_dir, {},
                 "checkpoint directory (empty = RUN_DIR/checkpoints)"),
      int_key("checkpoint", "rollback_after", &TrainConfig::rollback_after, 0, kMaxInt,
              "reload the last checkpoint after this many non-finite steps in a row, skipping the "
              "data since (0 = never)"),
      int_key("checkpoint", "max_rollbacks", &TrainConfig::max_rollbacks, 0, kMaxInt,
              "rollbacks allowed in one run before the job stops"),
  };
  return table;
}

const Key* find_key(const std::string& section, const std::string& name) {
  for (const Key& k : keys())
    if (k.section == section && k.name == name) return &k;
  return nullptr;
}

std::string known_keys_of(const std::string& section) {
  std::string s;
  for (const Key& k : keys())
    if (k.section == section) s += (s.empty() ? "" : ", ") + k.name;
  return s;
}

// The sections of the key table, in order.
std::string known_sections() {
  std::string s, last;
  for (const Key& k : keys())
    if (k.section != last) {
      s += (s.empty() ? "" : ", ") + k.section;
      last = k.section;
    }
  return s;
}

// The offset of the first byte of s that is not part of a well-formed UTF-8 sequence (no
// overlong forms, surrogates or code points above U+10FFFF), or npos.
std::size_t invalid_utf8_at(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    int n = 0;
    std::uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xe0) == 0xc0) {
      n = 1, cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      n = 2, cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      n = 3, cp = c & 0x07;
    } else {
      return i;
    }
    if (i + static_cast<std::size_t>(n) >= s.size()) return i;  // truncated sequence
    for (int k = 1; k <= n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xc0) != 0x80) return i;
      cp = (cp << 6) | (d & 0x3f);
    }
    static constexpr std::uint32_t kMin[4] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return i;
    i += static_cast<std::size_t>(n) + 1;
  }
  return std::string::npos;
}

void check_combinations(const TrainConfig& c) {
  trace_steps(c);
  if (c.tp_sequence_parallel) {
    MT_CHECK(c.tp > 1,
             "tp.sequence_parallel = true needs tensor parallelism, but train.tp = 1: it shards "
             "the activations over the TP group's ranks; set train.tp > 1 or "
             "tp.sequence_parallel = false");
    MT_CHECK(c.seq_len % c.tp == 0,
             "tp.sequence_parallel = true: train.seq_len ({}) must be a multiple of train.tp ({}), "
             "each rank holding an equal shard of the sequence; {} or {} would do",
             c.seq_len, c.tp, c.seq_len / c.tp * c.tp > 0 ? c.seq_len / c.tp * c.tp : c.tp,
             (c.seq_len / c.tp + 1) * c.tp);
  }
  // The interleaved schedule's own rules (the layer split is gpt_config's: it needs the model).
  const bool interleaved = c.pp_schedule == "interleaved";
  MT_CHECK(!interleaved || c.pp_virtual_stages >= 2,
           "pp.schedule = \"interleaved\" needs pp.virtual_stages >= 2 model chunks per stage, "
           "got pp.virtual_stages = {} (with one chunk per stage use pp.schedule = \"1f1b\")",
           c.pp_virtual_stages);
  MT_CHECK(interleaved || c.pp_virtual_stages == 1,
           "pp.virtual_stages = {}: model chunks per stage run only under pp.schedule = "
           "\"interleaved\", not \"{}\"",
           c.pp_virtual_stages, c.pp_schedule);
  MT_CHECK(!interleaved || c.pp >= 2,
           "pp.schedule = \"interleaved\" needs pipeline parallelism: train.pp = {} (at least 2)",
           c.pp);
  MT_CHECK(!interleaved || c.grad_accum % c.pp == 0,
           "pp.schedule = \"interleaved\" runs micro-batches in groups of train.pp = {} (as "
           "Megatron-LM does): train.grad_accum = {} must be a multiple of {}",
           c.pp, c.grad_accum, c.pp);
  MT_CHECK(c.temperature >= 0, "sample.temperature must be non-negative");
  MT_CHECK(c.rollback_after == 0 || c.rollback_after < c.max_bad_steps,
           "checkpoint.rollback_after ({}) must be below train.max_bad_steps ({}), which stops the "
           "job first",
           c.rollback_after, c.max_bad_steps);
}

// A config file holds a few hundred bytes; anything past this is not one.
constexpr std::uint64_t kMaxConfigBytes = 16u << 20;

// Applies a TOML config file: every section and key known, every value of its key's type.
void apply_file(TrainConfig& cfg, const std::string& path) {
  // A directory, a FIFO or a device is refused naming the path (std::ifstream opened a directory
  // as an empty file, and the run trained on the defaults).
  const std::string text = read_file(path, kMaxConfigBytes, "config file");
  int line = 0, column = 0;
  const std::string hazard = toml_hazard(text, line, column);
  MT_CHECK(hazard.empty(), "config file {}:{}:{}: {}", path, line, column, hazard);
  toml::table root;
  try {
    root = toml::parse(text, path);
  } catch (const toml::parse_error& e) {
    const auto& src = e.source();
    MT_FAIL("config file {}:{}:{}: {}", path, src.begin.line, src.begin.column, e.description());
  }
  for (const auto& [section, node] : root) {
    const std::string sec(section.str());
    const std::string at = fmt::format("{}:{}", path, node.source().begin.line);
    MT_CHECK(node.is_table(), "{}: '{}' must be a section ([{}]); top-level keys are not allowed",
             at, sec, sec);
    MT_CHECK(!known_keys_of(sec).empty(), "{}: unknown section [{}]: expected one of {}", at, sec,
             known_sections());
    for (const auto& [name, value] : *node.as_table()) {
      const std::string key(name.str());
      const std::string where = fmt::format("{}:{}", path, value.source().begin.line);
      const Key* k = find_key(sec, key);
      MT_CHECK(k != nullptr, "{}: unknown key '{}.{}'; keys of [{}] are: {}", where, sec, key, sec,
               known_keys_of(sec));
      k->set(cfg, value, where);
    }
  }
}

// Applies one override "section.key=value", the value a TOML value or, for a string key, the
// text itself.
void apply_override(TrainConfig& cfg, const std::string& o) {
  const auto eq = o.find('=');
  MT_CHECK(eq != std::string::npos && eq > 0,
           "--set '{}': expected section.key=value (for example train.lr=3e-4)", o);
  const std::string full = o.substr(0, eq), text = o.substr(eq + 1);
  const auto dot = full.find('.');
  MT_CHECK(dot != std::string::npos, "--set '{}': the key must be section.key", o);
  const Key* k = find_key(full.substr(0, dot), full.substr(dot + 1));
  MT_CHECK(
      k != nullptr, "--set '{}': unknown key '{}'{}", o, full,
      known_keys_of(full.substr(0, dot)).empty()
          ? std::string(": unknown section")
          : "; keys of [" + full.substr(0, dot) + "] are: " + known_keys_of(full.substr(0, dot)));
  const std::string where = "--set " + full;
  toml::table parsed;
  bool as_toml = true;
  int line = 0, column = 0;
  try {
    const std::string doc = "v = " + text;
    if (toml_hazard(doc, line, column).empty())
      parsed = toml::parse(doc);
    else
      as_toml = false;
  } catch (const toml::parse_error&) {
    as_toml = false;
  }
  // For a string key, text that is not a TOML string (or, for a list, an array) is the string
  // itself: "--set run.dir=2024" is the directory "2024", not an integer.
  const bool string_key = k->kind == Kind::kString || k->kind == Kind::kStrings;
  if (as_toml && string_key && !parsed.get("v")->is_string() &&
      !(k->kind == Kind::kStrings && parsed.get("v")->is_array()))
    as_toml = false;
  if (as_toml) {
    k->set(cfg, *parsed.get("v"), where);
  } else {
    // A bare word for a string key: "--set data.train=corpus.txt" needs no quotes.
    MT_CHECK(k->kind == Kind::kString || k->kind == Kind::kStrings, "{}: '{}' is not a valid {}",
             where, text, kind_name(k->kind));
    // TOML strings are UTF-8: anything else could not be written to config.toml and read back.
    const std::size_t bad = invalid_utf8_at(text);
    MT_CHECK(bad == std::string::npos, "{}: the value is not valid UTF-8 (byte {} of it)", where,
             bad);
    k->set(cfg, toml::value<std::string>(text), where);
  }
}

}  // namespace

TrainConfig load_config(const std::string& path, const std::vector<std::string>& overrides) {
  TrainConfig cfg;
  if (!path.empty()) apply_file(cfg, path);
  for (const std::string& o : overrides) apply_override(cfg, o);
  check_combinations(cfg);
  return cfg;
}

std::vector<int> trace_steps(const TrainConfig& cfg) {
  std::vector<int> out;
  const std::string& s = cfg.trace_steps;
  std::size_t at = 0;
  while (at < s.size()) {
    const std::size_t end = std::min(s.find(',', at), s.size());
    const std::string part = s.substr(at, end - at);
    int lo = 0, hi = 0;
    char dash = 0;
    char extra = 0;
    const int got = std::sscanf(part.c_str(), "%d%c%d%c", &lo, &dash, &hi, &extra);
    const bool ok =
        (got == 1 && (hi = lo) >= 1) || (got == 3 && dash == '-' && lo >= 1 && hi >= lo);
    MT_CHECK(ok && part.find_first_not_of("0123456789-") == std::string::npos,
             "trace.steps = \"{}\": '{}' is not a step or a range of steps (expected e.g. \"5\", "
             "\"3-6\" or \"2,5-7\", steps from 1)",
             s, part);
    MT_CHECK(hi - lo < 100000, "trace.steps = \"{}\": '{}' spans more than 100000 steps", s, part);
    for (int v = lo; v <= hi; ++v) out.push_back(v);
    at = end + 1;
  }
  return out;
}

std::int64_t dp_bucket_bytes(const TrainConfig& cfg, std::int64_t grad_bytes) {
  if (cfg.dp_bucket_mb <= 0) return parallel::auto_bucket_bytes(grad_bytes);
  return std::max<std::int64_t>(1, static_cast<std::int64_t>(cfg.dp_bucket_mb * (1 << 20)));
}

namespace {

int tokenizer_vocab(const TrainConfig& c) {
  return Tokenizer::from_file(c.data_tokenizer).vocab_size();
}

// Pipeline stages are contiguous blocks of at least one layer each (parallel::stage_range), and
// interleaved stages V x P equal model chunks.
void check_pp_layers(const TrainConfig& c, int n_layer) {
  MT_CHECK(n_layer >= c.pp,
           "train.pp = {}: the model's {} layers (model.n_layer) cannot be split into {} pipeline "
           "stages; every stage needs at least one layer, so train.pp must be at most {}",
           c.pp, n_layer, c.pp, n_layer);
  const int chunks = c.pp * c.pp_virtual_stages;
  MT_CHECK(c.pp_virtual_stages == 1 || n_layer % chunks == 0,
           "pp.virtual_stages = {} with train.pp = {}: the model's {} layers (model.n_layer) "
           "cannot be cut into {} x {} = {} equal model chunks; model.n_layer must be a multiple "
           "of pp.virtual_stages x train.pp",
           c.pp_virtual_stages, c.pp, n_layer, c.pp_virtual_stages, c.pp, chunks);
}

models::GPTConfig gpt_config(const TrainConfig& c) {
  models::GPTConfig m = models::GPTConfig::preset(c.model_preset);
  if (c.n_layer) m.n_layer = c.n_layer;
  if (c.n_head) m.n_head = c.n_head;
  if (c.n_embd) m.n_embd = c.n_embd;
  if (c.block_size) m.block_size = c.block_size;
  const bool bytes = c.vocab == "bytes" || (c.vocab == "auto" && m.vocab_size == 256);
  m.vocab_size = bytes ? 256 : 50257;
  if (c.vocab == "auto" && !c.data_tokenizer.empty()) m.vocab_size = tokenizer_vocab(c);
  // Under tensor parallelism every rank holds an equal, 128-aligned slice of the vocabulary.
  m.padded_vocab = models::GPTConfig::pad_vocab(m.vocab_size, 128 * c.tp);
  MT_CHECK(m.n_embd % m.n_head == 0, "model.n_embd ({}) must be a multiple of model.n_head ({})",
           m.n_embd, m.n_head);
  if (m.n_head % c.tp != 0) {
    // The sizes that would work: they divide the heads and the width.
    std::string fits;
    for (int k = 1; k <= m.n_head; ++k)
      if (m.n_head % k == 0 && m.n_embd % k == 0)
        fits += (fits.empty() ? "" : ", ") + std::to_string(k);
    MT_FAIL(
        "train.tp = {}: the model's {} attention heads (model.n_head) cannot be split across {} "
        "tensor-parallel ranks; train.tp must divide model.n_head: {} would",
        c.tp, m.n_head, c.tp, fits);
  }
  MT_CHECK(c.seq_len <= m.block_size,
           "train.seq_len ({}) exceeds the model's block size ({}): lower train.seq_len or raise "
           "model.block_size",
           c.seq_len, m.block_size);
  m.validate();
  m.validate_tp(c.tp);
  check_pp_layers(c, m.n_layer);
  return m;
}

// What a Llama-family pipeline stage does not run yet. It keeps the whole sequence at its
// boundaries: sequence parallelism runs a
// Llama-family model whole only (models/llama.cpp refuses the stage too; refused here first, by
// key, before anything is allocated).
void check_llama_pp(const TrainConfig& c, const std::string& arch) {
  MT_CHECK(c.pp == 1 || !c.tp_sequence_parallel,
           "train.pp = {} with tp.sequence_parallel = true: a {} model's pipeline stages do not "
           "run sequence parallelism yet; set tp.sequence_parallel = false or train.pp = 1",
           c.pp, arch);
  // A Llama stage is one contiguous block of layers (models::Decoder): no model chunks.
  MT_CHECK(c.pp_schedule != "interleaved",
           "pp.schedule = \"interleaved\" (pp.virtual_stages = {}): a {} model's pipeline stages "
           "hold one block of layers each; interleaved model chunks are implemented for gpt2 "
           "only: use pp.schedule = \"1f1b\" or \"gpipe\"",
           c.pp_virtual_stages, arch);
}

models::LlamaConfig llama_config(const TrainConfig& c, const std::string& arch) {
  models::LlamaConfig m = models::LlamaConfig::preset(c.model_preset);
  m.arch = arch;
  if (arch == "qwen2") m.qkv_bias = true;
  if (c.n_layer) m.n_layer = c.n_layer;
  if (c.n_head) m.n_head = c.n_head;
  if (c.n_embd) m.n_embd = c.n_embd;
  if (c.block_size) m.block_size = c.block_size;
  if (c.n_kv_head) m.n_kv_head = c.n_kv_head;
  if (c.intermediate_size) m.intermediate_size = c.intermediate_size;
  if (c.rope_theta > 0) m.rope.theta = c.rope_theta;
  if (c.rms_norm_eps > 0) m.rms_norm_eps = static_cast<float>(c.rms_norm_eps);
  if (c.tie_embeddings != "auto") m.tie_word_embeddings = c.tie_embeddings == "true";
  if (c.vocab == "bytes") m.vocab_size = 256;
  if (c.vocab == "gpt2") m.vocab_size = 50257;
  if (m.vocab_size == 256 || m.vocab_size == 50257) m.bos_id = m.eos_id = -1;
  if (c.vocab == "auto" && !c.data_tokenizer.empty()) {
    const Tokenizer tok = Tokenizer::from_file(c.data_tokenizer);
    m.vocab_size = tok.vocab_size();
    m.bos_id = tok.bos_id().value_or(-1);
    m.eos_id = tok.eos_id().value_or(-1);
  }
  m.padded_vocab = models::GPTConfig::pad_vocab(m.vocab_size, 128 * c.tp);
  MT_CHECK(c.n_kv_head == 0 || m.n_head % m.n_kv_head == 0,
           "model.n_kv_head ({}) must divide model.n_head ({})", m.n_kv_head, m.n_head);
  MT_CHECK(m.n_embd % m.n_head == 0, "model.n_embd ({}) must be a multiple of model.n_head ({})",
           m.n_embd, m.n_head);
  MT_CHECK(c.seq_len <= m.block_size,
           "train.seq_len ({}) exceeds the model's block size ({}): lower train.seq_len or raise "
           "model.block_size",
           c.seq_len, m.block_size);
  m.validate();
  m.validate_tp(c.tp);
  check_pp_layers(c, m.n_layer);
  check_llama_pp(c, m.arch);
  return m;
}

}  // namespace

models::ModelConfig model_config(const TrainConfig& c) {
  if (!c.hf_config.empty()) {
    MT_CHECK(c.n_layer == 0 && c.n_head == 0 && c.n_embd == 0 && c.n_kv_head == 0 &&
                 c.intermediate_size == 0 && c.vocab == "auto",
             "model.hf_config = '{}' defines the model: leave model.n_layer, n_head, n_embd, "
             "n_kv_head, intermediate_size at 0 and model.vocab at auto",
             c.hf_config);
    models::LlamaConfig m = read_hf_llama_config(c.hf_config);
    MT_CHECK(c.model_arch == "auto" || c.model_arch == m.arch,
             "model.arch = {} but model.hf_config '{}' is a {} model", c.model_arch, c.hf_config,
             m.arch);
    if (c.block_size) m.block_size = c.block_size;
    if (c.rope_theta > 0) m.rope.theta = c.rope_theta;
    if (c.rms_norm_eps > 0) m.rms_norm_eps = static_cast<float>(c.rms_norm_eps);
    MT_CHECK(c.tie_embeddings == "auto", "model.tie_embeddings is fixed by model.hf_config '{}'",
             c.hf_config);
    m.padded_vocab = models::GPTConfig::pad_vocab(m.vocab_size, 128 * c.tp);
    MT_CHECK(c.seq_len <= m.block_size,
             "train.seq_len ({}) exceeds the model's block size ({}): lower train.seq_len or "
             "raise model.block_size",
             c.seq_len, m.block_size);
    m.validate();
    m.validate_tp(c.tp);
    check_pp_layers(c, m.n_layer);
    check_llama_pp(c, m.arch);
    return m;
  }
  const models::ModelConfig preset = models::ModelConfig::preset(c.model_preset);
  const std::string arch = c.model_arch == "auto" ? preset.arch : c.model_arch;
  MT_CHECK((arch == "gpt2") == preset.is_gpt(),
           "model.arch = {} does not fit model.preset = {} (a {} preset): choose a preset of "
           "that family ({})",
           arch, c.model_preset, preset.is_gpt() ? "GPT-2" : "Llama-family",
           arch == "gpt2" ? "gpt-tiny, gpt-small, gpt2, ..."
                          : "llama-tiny, llama-small, llama3-8b, ...");
  models::ModelConfig m;
  m.arch = arch;
  if (m.is_gpt()) {
    MT_CHECK(c.n_kv_head == 0 && c.intermediate_size == 0 && c.rope_theta == 0 &&
                 c.rms_norm_eps == 0 && c.tie_embeddings == "auto",
             "model.n_kv_head, intermediate_size, rope_theta, rms_norm_eps and tie_embeddings "
             "apply to model.arch = llama or qwen2, not to the GPT-2 preset {}",
             c.model_preset);
    m.gpt = gpt_config(c);
  } else {
    m.llama = llama_config(c, arch);
  }
  return m;
}

std::string checkpoint_root(const TrainConfig& cfg) {
  return cfg.ckpt_dir.empty() ? cfg.run_dir + "/checkpoints" : cfg.ckpt_dir;
}

std::string to_toml(const TrainConfig& cfg) {
  std::string out, section;
  for (const Key& k : keys()) {
    if (k.section != section) {
      out += (section.empty() ? "" : "\n") + ("[" + k.section + "]\n");
      section = k.section;
    }
    out += k.name + " = " + k.get(cfg) + "\n";
  }
  return out;
}

std::vector<ConfigKeyInfo> config_keys() {
  std::vector<ConfigKeyInfo> out;
  const TrainConfig defaults;
  for (const Key& k : keys()) {
    std::string type = kind_name(k.kind);
    if (!k.choices.empty()) {
      type = "";
      for (const auto& c : k.choices) type += (type.empty() ? "" : "|") + c;
    }
    out.push_back({k.full(), type, k.get(defaults), k.help});
  }
  return out;
}

}  // namespace meshtrain::launch
