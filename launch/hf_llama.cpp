#include "launch/hf_llama.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <set>

#include <nlohmann/json.hpp>

#include "launch/config.hpp"
#include "launch/run_dir.hpp"
#include "runtime/error.hpp"
#include "runtime/file_io.hpp"
#include "runtime/json.hpp"
#include "runtime/safetensors.hpp"

namespace meshtrain::launch {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

Json read_json(const std::string& path, const char* what) {
  std::error_code ec;
  MT_CHECK(fs::is_regular_file(path, ec), "import: '{}' does not exist or is not a file ({})", path,
           what);
  const std::string text = read_file(path, 64u << 20);
  const Json j = parse_json_file_text<Json>(text, fmt::format("import: '{}'", path), 16);
  MT_CHECK(j.is_object(), "import: '{}' is not a JSON object", path);
  return j;
}

std::int64_t get_int(const std::string& path, const Json& j, const char* key, std::int64_t lo,
                     std::int64_t hi, std::optional<std::int64_t> fallback = std::nullopt) {
  if (!j.contains(key) || j[key].is_null()) {
    MT_CHECK(fallback.has_value(), "import: '{}': missing '{}'", path, key);
    return *fallback;
  }
  const Json& v = j[key];
  MT_CHECK(v.is_number_integer(), "import: '{}': '{}' is {}, expected an integer", path, key,
           v.dump());
  MT_CHECK(!(v.is_number_unsigned() && v.get<std::uint64_t>() > static_cast<std::uint64_t>(hi)) &&
               v.get<std::int64_t>() >= lo && v.get<std::int64_t>() <= hi,
           "import: '{}': '{}' = {} is out of range [{}, {}]", path, key, v.dump(), lo, hi);
  return v.get<std::int64_t>();
}

double get_double(const std::string& path, const Json& j, const char* key, double fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  const Json& v = j[key];
  MT_CHECK(v.is_number() && std::isfinite(v.get<double>()),
           "import: '{}': '{}' is {}, expected a number", path, key, v.dump());
  return v.get<double>();
}

bool get_bool(const std::string& path, const Json& j, const char* key, bool fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  MT_CHECK(j[key].is_boolean(), "import: '{}': '{}' is {}, expected true or false", path, key,
           j[key].dump());
  return j[key].get<bool>();
}

// bos/eos ids: an integer, a list (the first is kept: Llama 3.1 instruct lists three), or null.
int token_id(const std::string& path, const Json& j, const char* key) {
  if (!j.contains(key) || j[key].is_null()) return -1;
  const Json& v = j[key].is_array() && !j[key].empty() ? j[key][0] : j[key];
  MT_CHECK(v.is_number_integer() && v.get<std::int64_t>() >= 0 && v.get<std::int64_t>() < (1 << 30),
           "import: '{}': '{}' is {}, expected a token id", path, key, j[key].dump());
  return static_cast<int>(v.get<std::int64_t>());
}

std::string arch_of(const std::string& path, const Json& j) {
  std::string arch, type;
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string())
    arch = j["architectures"][0].get<std::string>();
  if (j.contains("model_type") && j["model_type"].is_string())
    type = j["model_type"].get<std::string>();
  if (arch == "LlamaForCausalLM" || (arch.empty() && type == "llama")) return "llama";
  if (arch == "Qwen2ForCausalLM" || (arch.empty() && type == "qwen2")) return "qwen2";
  if (arch == "GPT2LMHeadModel" || (arch.empty() && type == "gpt2")) return "gpt2";
  MT_FAIL(
      "import: '{}': architectures {} (model_type {}) is not supported: expected "
      "GPT2LMHeadModel, LlamaForCausalLM or Qwen2ForCausalLM",
      path, j.contains("architectures") ? j["architectures"].dump() : std::string("(none)"),
      j.contains("model_type") ? j["model_type"].dump() : std::string("(none)"));
}

ops::RopeConfig read_rope(const std::string& path, const Json& j) {
  ops::RopeConfig r;
  r.theta = get_double(path, j, "rope_theta", 10000.0);
  MT_CHECK(r.theta > 0, "import: '{}': rope_theta {} must be positive", path, r.theta);
  if (!j.contains("rope_scaling") || j["rope_scaling"].is_null()) return r;
  const Json& s = j["rope_scaling"];
  MT_CHECK(s.is_object(), "import: '{}': rope_scaling is {}, expected an object or null", path,
           s.dump());
  std::string type;
  for (const char* k : {"rope_type", "type"})
    if (s.contains(k) && s[k].is_string()) type = s[k].get<std::string>();
  const std::string where = path + " rope_scaling";
  if (type == "default") return r;
  MT_CHECK(type == "linear" || type == "llama3",
           "import: '{}': rope_scaling type '{}' is not supported: expected linear or llama3 "
           "(yarn, dynamic and longrope are not implemented)",
           path, type);
  r.factor = get_double(where, s, "factor", 1.0);
  MT_CHECK(r.factor >= 1.0, "import: '{}': rope_scaling.factor {} must be at least 1", path,
           r.factor);
  if (type == "linear") {
    r.scaling = ops::RopeConfig::Scaling::kLinear;
    return r;
  }
  r.scaling = ops::RopeConfig::Scaling::kLlama3;
  r.low_freq_factor = get_double(where, s, "low_freq_factor", 1.0);
  r.high_freq_factor = get_double(where, s, "high_freq_factor", 4.0);
  r.original_max_position = get_int(where, s, "original_max_position_embeddings", 1, 1 << 24, 8192);
  MT_CHECK(r.low_freq_factor > 0 && r.high_freq_factor > r.low_freq_factor,
           "import: '{}': rope_scaling needs 0 < low_freq_factor < high_freq_factor, got {} and {}",
           path, r.low_freq_factor, r.high_freq_factor);
  return r;
}

}  // namespace

bool is_hf_llama_dir(const std::string& dir) {
  const std::string path = (fs::path(dir) / "config.json").string();
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return false;
  const Json j = read_json(path, "config.json");
  std::string arch, type;
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string())
    arch = j["architectures"][0].get<std::string>();
  if (j.contains("model_type") && j["model_type"].is_string())
    type = j["model_type"].get<std::string>();
  if (!arch.empty()) return arch != "GPT2LMHeadModel";  // read_hf_llama_config judges the rest
  return !type.empty() && type != "gpt2";
}

models::LlamaConfig read_hf_llama_config(const std::string& path) {
  const Json j = read_json(path, "config.json");
  const std::string arch = arch_of(path, j);
  MT_CHECK(arch != "gpt2", "import: '{}' is a GPT-2 config, not a Llama-family one", path);
  models::LlamaConfig c;
  c.arch = arch;
  c.n_layer = static_cast<int>(get_int(path, j, "num_hidden_layers", 1, 4096));
  c.n_embd = static_cast<int>(get_int(path, j, "hidden_size", 1, 1 << 20));
  c.n_head = static_cast<int>(get_int(path, j, "num_attention_heads", 1, 4096));
  c.n_kv_head = static_cast<int>(get_int(path, j, "num_key_value_heads", 1, 4096, c.n_head));
  c.intermediate_size = static_cast<int>(get_int(path, j, "intermediate_size", 1, 1 << 22));
  c.vocab_size = static_cast<int>(get_int(path, j, "vocab_size", 2, 1 << 24));
  c.block_size = static_cast<int>(get_int(path, j, "max_position_embeddings", 1, 1 << 24, 4096));
  const std::int64_t hd = get_int(path, j, "head_dim", 2, 4096, 0);
  MT_CHECK(c.n_head <= c.n_embd && c.n_head > 0,
           "import: '{}': num_attention_heads {} exceeds hidden_size {}", path, c.n_head, c.n_embd);
  if (hd != 0 && hd != c.n_embd / c.n_head) c.head_dim = static_cast<int>(hd);
  MT_CHECK(c.head_dim != 0 || c.n_embd % c.n_head == 0,
           "import: '{}': hidden_size {} is not a multiple of num_attention_heads {}", path,
           c.n_embd, c.n_head);
  MT_CHECK(c.n_head % c.n_kv_head == 0,
           "import: '{}': num_key_value_heads {} does not divide num_attention_heads {}", path,
           c.n_kv_head, c.n_head);
  c.rms_norm_eps = static_cast<float>(get_double(path, j, "rms_norm_eps", 1e-6));
  MT_CHECK(c.rms_norm_eps > 0, "import: '{}': rms_norm_eps must be positive", path);
  c.rope = read_rope(path, j);
  const std::string act = j.contains("hidden_act") && j["hidden_act"].is_string()
                              ? j["hidden_act"].get<std::string>()
                              : std::string("silu");
  MT_CHECK(act == "silu", "import: '{}': hidden_act '{}' is not supported: expected silu", path,
           act);
  MT_CHECK(!get_bool(path, j, "mlp_bias", false),
           "import: '{}': mlp_bias = true is not supported (Llama's MLP has no biases)", path);
  MT_CHECK(!get_bool(path, j, "use_sliding_window", false),
           "import: '{}': use_sliding_window = true: sliding-window attention is not supported",
           path);
  c.tie_word_embeddings = get_bool(path, j, "tie_word_embeddings", false);
  if (arch == "qwen2") {
    c.qkv_bias = true;  // Qwen2 always has q/k/v biases and no o_proj bias
  } else {
    const bool bias = get_bool(path, j, "attention_bias", false);
    c.qkv_bias = c.o_bias = bias;
  }
  c.bos_id = token_id(path, j, "bos_token_id");
  c.eos_id = token_id(path, j, "eos_token_id");
  c.padded_vocab = models::GPTConfig::pad_vocab(c.vocab_size);
  c.validate();
  return c;
}

ImportedLlama import_hf_llama(const std::string& dir) {
  const fs::path d(dir);
  ImportedLlama out;
  out.config = read_hf_llama_config((d / "config.json").string());
  const models::LlamaConfig& c = out.config;
  // Files: one model.safetensors, or the shards the index names.
  std::vector<std::string> files;
  std::map<std::string, std::string> shard_of;  // tensor -> file, from the index
  std::error_code ec;
  const std::string index = (d / "model.safetensors.index.json").string();
  if (fs::exists(d / "model.safetensors", ec)) {
    files.push_back((d / "model.safetensors").string());
  } else if (fs::exists(index, ec)) {
    const Json j = read_json(index, "the shard index");
    MT_CHECK(j.contains("weight_map") && j["weight_map"].is_object(),
             "import: '{}' has no 'weight_map' object", index);
    std::set<std::string> names;
    for (const auto& [tensor, file] : j["weight_map"].items()) {
      MT_CHECK(file.is_string(), "import: '{}': weight_map['{}'] is {}, expected a file name",
               index, tensor, file.dump());
      const std::string f = file.get<std::string>();
      MT_CHECK(!f.empty() && f.find('/') == std::string::npos && f != "." && f != "..",
               "import: '{}': weight_map['{}'] names '{}', expected a file in the directory", index,
               tensor, f);
      shard_of[tensor] = (d / f).string();
      names.insert(f);
    }
    for (const std::string& f : names) {
      MT_CHECK(fs::is_regular_file(d / f, ec),
               "import: '{}' names the shard '{}', which is missing from '{}'", index, f, dir);
      files.push_back((d / f).string());
    }
  } else {
    MT_FAIL("import: '{}' has neither model.safetensors nor model.safetensors.index.json{}", dir,
            fs::exists(d / "pytorch_model.bin", ec)
                ? " (only pytorch_model.bin: save it again with safe_serialization=True)"
                : "");
  }
  // Headers first: names, dtypes and shapes against the layout, before any data is read.
  const std::vector<models::ParamInfo> params = models::Llama::param_layout(c);
  std::map<std::string, const models::ParamInfo*> want;
  for (const models::ParamInfo& p : params) want[p.name] = &p;
  std::map<std::string, std::string> found;  // tensor -> file
  for (const std::string& f : files) {
    const SafetensorsFile st = load_safetensors(f);
    for (const auto& [name, t] : st.tensors) {
      if (c.tie_word_embeddings && name == "lm_head.weight") continue;  // a copy of the tied one
      if (name.find("rotary_emb.inv_freq") != std::string::npos) continue;  // a buffer
      auto it = want.find(name);
      MT_CHECK(it != want.end(),
               "import: '{}' holds '{}', which a {} model of this config.json "
               "does not have",
               f, name, c.arch);
      MT_CHECK(found.emplace(name, f).second, "import: '{}' holds '{}', already read from '{}'", f,
               name, found[name]);
      if (!shard_of.empty())
        MT_CHECK(shard_of.count(name) == 1 && shard_of[name] == f,
                 "import: '{}' holds '{}', which '{}' places elsewhere", f, name, index);
      const models::ParamInfo& p = *it->second;
      MT_CHECK(is_floating(t.dtype()), "import: '{}': tensor '{}' is {}, expected F32, BF16 or F16",
               f, name, dtype_name(t.dtype()));
      Shape expect = p.full_shape;
      if (p.real_rows >= 0) expect = Shape{p.real_rows, p.full_shape[1]};
      MT_CHECK(t.shape() == expect,
               "import: '{}': tensor '{}' has shape {}, expected {} for this config.json", f, name,
               t.shape().str(), expect.str());
    }
  }
  for (const models::ParamInfo& p : params)
    MT_CHECK(found.count(p.name) == 1, "import: '{}' has no tensor '{}'", dir, p.name);
  // Then the data, converted to fp32, into the flat layout (padding rows stay zero).
  std::int64_t n = 0;
  for (const models::ParamInfo& p : params) n += p.numel();
  out.weights = Tensor::zeros(Shape{n}, DType::kF32);
  for (const std::string& f : files) {
    const SafetensorsFile st = load_safetensors(f);
    for (const auto& [name, t] : st.tensors) {
      auto it = want.find(name);
      if (it == want.end() || found[name] != f) continue;
      Tensor dst = parallel::slot_view(out.weights, *it->second);
      if (it->second->real_rows >= 0) dst = dst.slice(0, it->second->real_rows);
      dst.copy_from(t);
    }
  }
  return out;
}

void export_hf_llama(const models::LlamaConfig& c, const Tensor& weights, const std::string& dir) {
  const std::vector<models::ParamInfo> params = models::Llama::param_layout(c);
  std::int64_t n = 0;
  for (const models::ParamInfo& p : params) n += p.numel();
  MT_CHECK(weights.defined() && weights.numel() == n && weights.dtype() == DType::kF32,
           "export --hf: expected the whole model's fp32 weights ({} elements), got {}", n,
           weights.defined() ? weights.str() : std::string("(none)"));
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw IoError(fmt::format("export: cannot create '{}': {}", dir, ec.message()));
  std::vector<std::pair<std::string, Tensor>> out;
  for (const models::ParamInfo& p : params) {
    Tensor m = parallel::slot_view(weights, p);
    if (p.real_rows >= 0) m = m.slice(0, p.real_rows);  // the padding rows are meshtrain's
    out.emplace_back(p.name, m);
  }
  save_safetensors((fs::path(dir) / "model.safetensors").string(), out, {{"format", "pt"}});
  const bool qwen = c.arch == "qwen2";
  Json cfg{
      {"architectures", {qwen ? "Qwen2ForCausalLM" : "LlamaForCausalLM"}},
      {"model_type", qwen ? "qwen2" : "llama"},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.n_embd},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.n_layer},
      {"num_attention_heads", c.n_head},
      {"num_key_value_heads", c.n_kv_head},
      {"hidden_act", "silu"},
      {"max_position_embeddings", c.block_size},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope.theta},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"initializer_range", 0.02},
      {"attention_dropout", 0.0},
      {"use_cache", true},
      {"torch_dtype", "float32"},
  };
  if (c.head_dim > 0) cfg["head_dim"] = c.head_dim;
  if (!qwen) {
    cfg["attention_bias"] = c.qkv_bias;
    cfg["mlp_bias"] = false;
  } else {
    cfg["use_sliding_window"] = false;
  }
  using S = ops::RopeConfig::Scaling;
  if (c.rope.scaling == S::kNone) {
    cfg["rope_scaling"] = nullptr;
  } else if (c.rope.scaling == S::kLinear) {
    // transformers before 4.43 accepts exactly {"type", "factor"} here.
    cfg["rope_scaling"] = Json{{"type", "linear"}, {"factor", c.rope.factor}};
  } else {
    cfg["rope_scaling"] = Json{{"rope_type", "llama3"},
                               {"factor", c.rope.factor},
                               {"low_freq_factor", c.rope.low_freq_factor},
                               {"high_freq_factor", c.rope.high_freq_factor},
                               {"original_max_position_embeddings", c.rope.original_max_position}};
  }
  if (c.bos_id >= 0) cfg["bos_token_id"] = c.bos_id;
  if (c.eos_id >= 0) cfg["eos_token_id"] = c.eos_id;
  write_file_atomic((fs::path(dir) / "config.json").string(), cfg.dump(2) + "\n");
}

int copy_tokenizer_files(const std::string& from, const std::string& to) {
  int n = 0;
  std::error_code ec;
  for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
    const fs::path src = fs::path(from) / name;
    if (!fs::is_regular_file(src, ec)) continue;
    write_file_atomic((fs::path(to) / name).string(), read_file(src.string(), 1ull << 30));
    ++n;
  }
  return n;
}

int import_hf_llama_run(const std::string& dir, const std::string& out, bool force) {
  const ImportedLlama m = import_hf_llama(dir);  // every check before anything is written
  const std::string hf_config = read_file((fs::path(dir) / "config.json").string(), 64u << 20);
  for (const std::string& line :
       prepare_output_dir(out, force, "import",
                          {"model.safetensors", "hf_config.json", "config.toml", "tokenizer.json",
                           "tokenizer_config.json"}))
    std::printf("%s\n", line.c_str());
  const std::string weights = fs::absolute(fs::path(out) / "model.safetensors").string();
  const std::string cfg_copy = fs::absolute(fs::path(out) / "hf_config.json").string();
  write_file_atomic(cfg_copy, hf_config);
  std::vector<std::pair<std::string, Tensor>> named;
  for (const models::ParamInfo& p : models::Llama::param_layout(m.config))
    named.emplace_back(p.name, parallel::slot_view(m.weights, p));
  save_safetensors(weights, named,
                   {{"format", "meshtrain"}, {"source", fs::absolute(dir).string()}});
  const int tok = copy_tokenizer_files(dir, out);
  const std::vector<std::string> sets = {
      "model.preset=llama-small",  // a Llama-family base; model.hf_config defines the shapes
      "model.hf_config=" + cfg_copy, "model.init=" + weights,
      "train.seq_len=" + std::to_string(std::min(m.config.block_size, TrainConfig{}.seq_len)),
      "run.dir=" + out};
  const TrainConfig cfg = load_config("", sets);
  model_config(cfg);  // checks the combination
  write_file_atomic((fs::path(out) / "config.toml").string(),
                    "# imported from " + fs::absolute(dir).string() + " (meshtrain import --hf)\n" +
                        to_toml(cfg));
  std::printf("imported %s: %s\nwrote %s, %s, %s/config.toml%s\n", dir.c_str(),
              m.config.str().c_str(), weights.c_str(), cfg_copy.c_str(), out.c_str(),
              tok > 0 ? " and the tokenizer" : "");
  return 0;
}

}  // namespace meshtrain::launch
