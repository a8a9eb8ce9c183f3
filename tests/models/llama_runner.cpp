// llama_runner: runs meshtrain's Llama on a Hugging Face model directory and writes what
// tests/models/test_llama_transformers.py compares against transformers.
//
//   llama_runner run DIR INPUTS OUT
//     Imports DIR (launch/hf_llama.hpp) in the fp32 policy; INPUTS (safetensors) holds
//     "tokens" and "targets" (int32 [B, T]) and "prompt" (int32 [n]) with metadata
//     "generate" (a count). One forward and backward on the batch, then greedy KV-cached
//     decoding of the prompt. Writes "logits" ([B, T, vocab]), "loss", "grad.<name>" (real
//     vocabulary rows) and "generated" (the prompt's continuation).
//
//   llama_runner export DIR OUT_DIR
//     Imports DIR and exports it again (export --hf's writer) to OUT_DIR.
#include <cstdio>
#include <string>
#include <vector>

#include "launch/hf_llama.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/threads.hpp"

namespace meshtrain {
namespace {

int run(const std::string& dir, const std::string& inputs, const std::string& out_path) {
  const launch::ImportedLlama m = launch::import_hf_llama(dir);
  models::Llama model(m.config, PrecisionPolicy::parse("fp32"));
  model.set_weights(m.weights);
  const SafetensorsFile in = load_safetensors(inputs);
  const Tensor& tokens = in.at("tokens");
  const Tensor& targets = in.at("targets");
  std::vector<std::pair<std::string, Tensor>> out;
  const float loss = model.forward(tokens, targets);
  const std::int64_t b = tokens.dim(0), t = tokens.dim(1), v = m.config.vocab_size;
  const std::int64_t vp = m.config.padded_vocab;
  // The real vocabulary's columns of [B, T, Vp].
  const std::vector<float> all = model.logits().to_floats();
  std::vector<float> real;
  real.reserve(static_cast<std::size_t>(b * t * v));
  for (std::int64_t r = 0; r < b * t; ++r)
    real.insert(real.end(), all.begin() + r * vp, all.begin() + r * vp + v);
  out.emplace_back("logits", Tensor::from_floats(real, Shape{b, t, v}, DType::kF32));
  out.emplace_back("loss", Tensor::from_floats({loss}, Shape{1}, DType::kF32));
  model.zero_grads();
  model.backward(1.0f);
  for (std::size_t i = 0; i < model.params().size(); ++i) {
    const models::ParamInfo& p = model.params()[i];
    Tensor g = model.grad(i);
    if (p.real_rows >= 0) g = g.slice(0, p.real_rows);
    out.emplace_back("grad." + p.name, g.clone());
  }
  const std::vector<std::int32_t> prompt = in.at("prompt").to_ints();
  const int n = std::stoi(in.metadata.at("generate"));
  model.reset_cache();
  std::vector<float> logits;
  for (std::int32_t id : prompt) logits = model.decode(id);
  std::vector<std::int32_t> gen;
  for (int i = 0; i < n; ++i) {
    std::int32_t best = 0;
    for (std::size_t j = 1; j < logits.size(); ++j)
      if (logits[j] > logits[best]) best = static_cast<std::int32_t>(j);
    gen.push_back(best);
    if (i + 1 < n) logits = model.decode(best);
  }
  out.emplace_back("generated",
                   Tensor::from_ints(gen, Shape{static_cast<std::int64_t>(gen.size())}));
  save_safetensors(out_path, out);
  return 0;
}

}  // namespace
}  // namespace meshtrain

int main(int argc, char** argv) {
  using namespace meshtrain;
  try {
    set_cpu_threads(1);  // small shapes; tests run side by side
    const std::vector<std::string> a(argv + 1, argv + argc);
    if (a.size() == 4 && a[0] == "run") return run(a[1], a[2], a[3]);
    if (a.size() == 3 && a[0] == "export") {
      const launch::ImportedLlama m = launch::import_hf_llama(a[1]);
      launch::export_hf_llama(m.config, m.weights, a[2]);
      return 0;
    }
    std::fprintf(stderr, "usage: llama_runner run DIR INPUTS OUT | export DIR OUT_DIR\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llama_runner: %s\n", e.what());
    return 1;
  }
}
