// Fuzz target: Hugging Face import: GPT-2 (launch/hf.hpp) and, when config.json names a Llama
// or Qwen2 model, LlamaForCausalLM / Qwen2ForCausalLM (launch/hf_llama.hpp): config.json and
// model.safetensors.
// Input: the config.json text, then a NUL byte and the model.safetensors bytes (JSON text holds
// no NUL byte). Both files are written into a directory that import_hf reads.
#include <cstring>
#include <filesystem>

#include "launch/hf.hpp"
#include "launch/hf_llama.hpp"
#include "runtime/safetensors.hpp"
#include "tests/fuzz/fuzz.hpp"

namespace meshtrain::fuzz {

void write_seeds(const std::string& dir) {
  auto pack = [&](const std::string& name, const std::string& export_dir) {
    std::string bytes = read_file(export_dir + "/config.json");
    bytes.push_back('\0');
    bytes += read_file(export_dir + "/model.safetensors");
    write_file(dir + "/" + name, bytes.data(), bytes.size());
  };
  models::GPTConfig c;
  c.n_layer = 1;
  c.n_head = 2;
  c.n_embd = 8;
  c.block_size = 4;
  c.vocab_size = 256;
  c.padded_vocab = 256;
  models::GPT m(c, PrecisionPolicy::parse("fp32"));
  Tensor flat = m.flat_params();  // fp32: the master weights
  std::vector<float> v(static_cast<std::size_t>(flat.numel()));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = 0.01f * static_cast<float>(i % 100);
  flat.copy_from(Tensor::from_floats(v, flat.shape(), DType::kF32));
  const std::string out = scratch_dir() + "/export";
  launch::export_hf(m, flat, out);
  pack("seed-export", out);
  // transformers' own layout: "transformer." prefixes, the tied lm_head and attention buffers.
  const SafetensorsFile f = load_safetensors(out + "/model.safetensors");
  std::vector<std::pair<std::string, Tensor>> renamed;
  for (const auto& [name, t] : f.tensors) renamed.emplace_back("transformer." + name, t);
  renamed.emplace_back("lm_head.weight", f.at("wte.weight"));
  renamed.emplace_back("transformer.h.0.attn.bias", Tensor::zeros(Shape{1, 1, 4, 4}, DType::kF32));
  save_safetensors(out + "/model.safetensors", renamed, {{"format", "pt"}});
  pack("seed-transformers", out);
  // A Llama-family model as export --hf writes it: GQA, q/k/v biases (Qwen2), tied.
  models::LlamaConfig l = models::LlamaConfig::preset("llama-tiny");
  l.arch = "qwen2";
  l.qkv_bias = true;
  l.tie_word_embeddings = true;
  l.n_layer = 1;
  l.n_embd = 16;
  l.intermediate_size = 24;
  l.block_size = 8;
  l.vocab_size = 200;
  l.padded_vocab = 256;
  std::int64_t n = 0;
  for (const models::ParamInfo& p : models::Llama::param_layout(l)) n += p.numel();
  std::vector<float> w(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = 0.01f * static_cast<float>(i % 100);
  const std::string lout = scratch_dir() + "/export-llama";
  launch::export_hf_llama(l, Tensor::from_floats(w, Shape{n}, DType::kF32), lout);
  pack("seed-qwen2", lout);
}

}  // namespace meshtrain::fuzz

using namespace meshtrain;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::init();
  std::filesystem::create_directories(fuzz::scratch_dir() + "/hf");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string dir = fuzz::scratch_dir() + "/hf";
  const void* nul = std::memchr(data, 0, size);
  const std::size_t json_len =
      nul ? static_cast<std::size_t>(static_cast<const std::uint8_t*>(nul) - data) : size;
  fuzz::write_file(dir + "/config.json", data, json_len);
  const std::size_t st_at = std::min(size, json_len + 1);
  fuzz::write_file(dir + "/model.safetensors", data + st_at, size - st_at);
  fuzz::g_accepted = fuzz::accepts(dir, [&] {
    if (launch::is_hf_llama_dir(dir)) {
      const launch::ImportedLlama m = launch::import_hf_llama(dir);
      std::int64_t n = 0;
      for (const models::ParamInfo& p : models::Llama::param_layout(m.config)) n += p.numel();
      FUZZ_EXPECT(m.weights.numel() == n && m.weights.dtype() == DType::kF32,
                  "weights {} for a layout of {} elements", m.weights.str(), n);
      return;
    }
    const launch::ImportedModel m = launch::import_hf(dir);
    const auto params = models::GPT::param_layout(m.config);
    FUZZ_EXPECT(m.weights.size() == params.size(), "{} weights for {} parameters", m.weights.size(),
                params.size());
    for (std::size_t i = 0; i < params.size(); ++i)
      FUZZ_EXPECT(m.weights[i].first == params[i].name &&
                      m.weights[i].second.shape() == params[i].shape &&
                      m.weights[i].second.dtype() == DType::kF32,
                  "weight {} is {} {}", i, m.weights[i].first, m.weights[i].second.str());
  });
  return 0;
}
