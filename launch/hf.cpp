#include "launch/hf.hpp"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "runtime/error.hpp"
#include "runtime/file_io.hpp"
#include "runtime/json.hpp"
#include "runtime/safetensors.hpp"

namespace meshtrain::launch {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

// Linear weights, whose layouts are transposed between the two formats.
bool is_conv1d(const std::string& name) {
  auto ends = [&](const char* s) {
    const std::string suffix(s);
    return name.size() > suffix.size() &&
           name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  return ends(".attn.c_attn.weight") || ends(".attn.c_proj.weight") || ends(".mlp.c_fc.weight") ||
         ends(".mlp.c_proj.weight");
}

// [r, c] fp32 -> [c, r] fp32.
Tensor transpose(const Tensor& t) {
  const Tensor src = t.dtype() == DType::kF32 ? t : [&] {
    Tensor f = Tensor::empty(t.shape(), DType::kF32);
    f.copy_from(t);
    return f;
  }();
  const std::int64_t r = src.shape()[0], c = src.shape()[1];
  Tensor out = Tensor::empty(Shape{c, r}, DType::kF32);
  const float* s = src.data_as<float>();
  float* d = out.data_as<float>();
  for (std::int64_t i = 0; i < r; ++i)
    for (std::int64_t j = 0; j < c; ++j) d[j * r + i] = s[i * c + j];
  return out;
}

int config_int(const std::string& path, const Json& j, const char* key, int lo, int hi) {
  MT_CHECK(j.contains(key), "import: '{}': missing '{}'", path, key);
  const Json& v = j[key];
  MT_CHECK(v.is_number_integer(), "import: '{}': '{}' is {}, expected an integer", path, key,
           v.dump());
  // A uint64 above int64's range reads as out of range, not as a wrapped negative number.
  MT_CHECK(!(v.is_number_unsigned() && v.get<std::uint64_t>() > static_cast<std::uint64_t>(hi)) &&
               v.get<std::int64_t>() >= lo && v.get<std::int64_t>() <= hi,
           "import: '{}': '{}' = {} is out of range [{}, {}]", path, key, v.dump(), lo, hi);
  return static_cast<int>(v.get<std::int64_t>());
}

// An optional field of config.json of the JSON type that `fallback` has, or `fallback`.
template <typename T>
T config_opt(const std::string& path, const Json& j, const char* key, T fallback) {
  if (!j.contains(key)) return fallback;
  const Json& v = j[key];
  if constexpr (std::is_same_v<T, bool>) {
    MT_CHECK(v.is_boolean(), "import: '{}': '{}' is {}, expected true or false", path, key,
             v.dump());
  } else if constexpr (std::is_same_v<T, double>) {
    MT_CHECK(v.is_number(), "import: '{}': '{}' is {}, expected a number", path, key, v.dump());
  } else {
    MT_CHECK(v.is_string(), "import: '{}': '{}' is {}, expected a string", path, key, v.dump());
  }
  return v.get<T>();
}

// Reads and checks config.json: only what meshtrain's GPT can represent.
models::GPTConfig read_hf_config(const std::string& cfg_path) {
  // config.json is a few KiB; a directory, FIFO or device is refused naming the path.
  const std::string text = read_file(cfg_path, 64u << 20, "import: config.json");
  // config.json nests 2 levels (architectures, task parameters); 16 is plenty.
  const Json j = parse_json_file_text<Json>(text, fmt::format("import: '{}'", cfg_path), 16);
  MT_CHECK(j.is_object(), "import: '{}' is not a JSON object", cfg_path);
  if (j.contains("model_type"))
    MT_CHECK(j["model_type"] == "gpt2", "import: '{}': model_type {} is not gpt2", cfg_path,
             j["model_type"].dump());
  const std::string act = config_opt(cfg_path, j, "activation_function", std::string("gelu_new"));
  MT_CHECK(act == "gelu_new" || act == "gelu_pytorch_tanh",
           "import: '{}': activation_function '{}' is not the tanh GELU meshtrain computes "
           "(gelu_new)",
           cfg_path, act);
  const double eps = config_opt(cfg_path, j, "layer_norm_epsilon", 1e-5);
  MT_CHECK(std::fabs(eps - 1e-5) < 1e-12, "import: '{}': layer_norm_epsilon {} is not 1e-5",
           cfg_path, eps);
  MT_CHECK(!config_opt(cfg_path, j, "scale_attn_by_inverse_layer_idx", false) &&
               !config_opt(cfg_path, j, "reorder_and_upcast_attn", false) &&
               config_opt(cfg_path, j, "scale_attn_weights", true),
           "import: '{}': attention scaling options other than GPT-2's are not supported",
           cfg_path);
  MT_CHECK(config_opt(cfg_path, j, "tie_word_embeddings", true),
           "import: '{}': untied input and output embeddings are not supported", cfg_path);

  models::GPTConfig c;
  c.n_layer = config_int(cfg_path, j, "n_layer", 1, 1024);
  c.n_head = config_int(cfg_path, j, "n_head", 1, 1024);
  c.n_embd = config_int(cfg_path, j, "n_embd", 1, 65536);
  c.block_size = config_int(cfg_path, j, "n_positions", 1, 1 << 20);
  c.vocab_size = config_int(cfg_path, j, "vocab_size", 2, 1 << 24);
  MT_CHECK(c.vocab_size == 256 || c.vocab_size == 50257,
           "import: '{}': vocab_size {} is neither the byte vocabulary (256) nor GPT-2's (50257)",
           cfg_path, c.vocab_size);
  if (j.contains("n_inner") && !j["n_inner"].is_null())
    MT_CHECK(j["n_inner"] == 4 * c.n_embd, "import: '{}': n_inner {} is not 4 x n_embd", cfg_path,
             j["n_inner"].dump());
  MT_CHECK(c.n_embd % c.n_head == 0, "import: '{}': n_embd {} is not a multiple of n_head {}",
           cfg_path, c.n_embd, c.n_head);
  c.padded_vocab = models::GPTConfig::pad_vocab(c.vocab_size);
  c.validate();
  return c;
}

// meshtrain's tensors from the file's: names without "transformer.", Conv1D weights transposed,
// the vocabulary padded with zero rows; every tensor checked against the config's layout before
// anything the size of the model is allocated.
ImportedModel read_hf_tensors(const std::string& st_path, const models::GPTConfig& c) {
  const SafetensorsFile f = load_safetensors(st_path);
  std::map<std::string, const Tensor*> by_name;
  for (const auto& [name, t] : f.tensors) {
    std::string n = name.rfind("transformer.", 0) == 0 ? name.substr(12) : name;
    // Buffers and the tied head: not parameters of meshtrain's GPT.
    if (n == "lm_head.weight" || n.find(".attn.bias") != std::string::npos ||
        n.find(".attn.masked_bias") != std::string::npos)
      continue;
    MT_CHECK(by_name.emplace(n, &t).second, "import: '{}' holds '{}' twice", st_path, n);
  }
  // The model's parameter list gives names and shapes; nothing the size of the model that
  // config.json describes is allocated before the file's tensors are checked against it.
  const std::vector<models::ParamInfo> params = models::GPT::param_layout(c);
  ImportedModel out;
  out.config = c;
  std::set<std::string> used;
  for (const models::ParamInfo& p : params) {
    auto it = by_name.find(p.name);
    MT_CHECK(it != by_name.end(), "import: '{}' has no tensor '{}'", st_path, p.name);
    used.insert(p.name);
    const Tensor& t = *it->second;
    MT_CHECK(is_floating(t.dtype()), "import: '{}': tensor '{}' is {}, expected a float dtype",
             st_path, p.name, dtype_name(t.dtype()));
    Shape want = p.shape;
    if (is_conv1d(p.name)) want = Shape{p.shape[1], p.shape[0]};
    if (p.name == "wte.weight") want = Shape{c.vocab_size, c.n_embd};
    MT_CHECK(t.shape() == want,
             "import: '{}': tensor '{}' has shape {}, expected {} for this "
             "config.json",
             st_path, p.name, t.shape().str(), want.str());
    Tensor ours;
    if (is_conv1d(p.name)) {
      ours = transpose(t);
    } else {
      ours = Tensor::zeros(p.shape, DType::kF32);
      ours.slice(0, t.shape()[0]).copy_from(t);  // wte: zero padding rows after the vocabulary
    }
    out.weights.emplace_back(p.name, std::move(ours));
  }
  for (const auto& [n, t] : by_name)
    MT_CHECK(used.count(n) == 1, "import: '{}' holds '{}', which GPT-2 does not have", st_path, n);
  return out;
}

}  // namespace

void export_hf(const models::GPT& model, const Tensor& weights, const std::string& dir) {
  const models::GPTConfig& c = model.config();
  MT_CHECK(model.tp().size() <= 1, "export --hf needs the whole model (TP = 1)");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw IoError(fmt::format("export: cannot create '{}': {}", dir, ec.message()));
  std::vector<std::pair<std::string, Tensor>> out;
  for (const models::ParamInfo& p : model.params()) {
    const Tensor m = parallel::slot_view(weights, p);
    if (is_conv1d(p.name)) {
      out.emplace_back(p.name, transpose(m));
    } else if (p.name == "wte.weight") {
      // The real vocabulary only: the padding rows are meshtrain's.
      out.emplace_back(p.name, m.slice(0, c.vocab_size));
    } else {
      out.emplace_back(p.name, m);
    }
  }
  save_safetensors((fs::path(dir) / "model.safetensors").string(), out, {{"format", "pt"}});
  const bool gpt2_vocab = c.vocab_size == 50257;
  Json cfg{
      {"architectures", {"GPT2LMHeadModel"}},
      {"model_type", "gpt2"},
      {"vocab_size", c.vocab_size},
      {"n_positions", c.block_size},
      {"n_ctx", c.block_size},
      {"n_embd", c.n_embd},
      {"n_layer", c.n_layer},
      {"n_head", c.n_head},
      {"n_inner", nullptr},
      {"activation_function", "gelu_new"},  // the tanh form, as meshtrain computes it
      {"resid_pdrop", 0.0},
      {"embd_pdrop", 0.0},
      {"attn_pdrop", 0.0},
      {"layer_norm_epsilon", 1e-5},
      {"initializer_range", 0.02},
      {"scale_attn_weights", true},
      {"tie_word_embeddings", true},
      {"torch_dtype", "float32"},
  };
  if (gpt2_vocab) {
    cfg["bos_token_id"] = 50256;
    cfg["eos_token_id"] = 50256;
  }
  write_file_atomic((fs::path(dir) / "config.json").string(), cfg.dump(2) + "\n");
}

ImportedModel import_hf(const std::string& dir) {
  const std::string cfg_path = (fs::path(dir) / "config.json").string();
  const std::string st_path = (fs::path(dir) / "model.safetensors").string();
  std::error_code ec;
  MT_CHECK(fs::exists(cfg_path, ec),
           "import: '{}' has no config.json (a Hugging Face model "
           "directory, as save_pretrained writes it)",
           dir);
  MT_CHECK(fs::exists(st_path, ec), "import: '{}' has no model.safetensors{}", dir,
           fs::exists(fs::path(dir) / "model.safetensors.index.json", ec)
               ? " (sharded checkpoints are not supported: save with a larger max_shard_size)"
           : fs::exists(fs::path(dir) / "pytorch_model.bin", ec)
               ? " (only pytorch_model.bin: save it again with safe_serialization=True)"
               : "");
  return read_hf_tensors(st_path, read_hf_config(cfg_path));
}

}  // namespace meshtrain::launch
