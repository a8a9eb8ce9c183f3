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

std::vector<ParamInfo> ModelConfig::param_layout(int tp) const {
  return is_gpt() ? GPT::param_layout(gpt, tp) : Llama::param_layout(llama, tp);
}

MemoryEstimate estimate_memory(const ModelConfig& cfg, const PrecisionPolicy& policy, int batch,
                               int seq, int tp, int dp, bool zero, bool sequence_parallel) {
  return cfg.is_gpt()
             ? estimate_memory(cfg.gpt, policy, batch, seq, tp, dp, zero, sequence_parallel)
             : estimate_memory(cfg.llama, policy, batch, seq, tp, dp, zero, sequence_parallel);
}

Decoder::Decoder(const ModelConfig& cfg, const PrecisionPolicy& policy, Device& device,
                 parallel::TPGroup tp, parallel::StageRange stage)
    : cfg_(cfg) {
  cfg_.validate();
  if (cfg_.is_gpt()) {
    gpt_ = std::make_unique<GPT>(cfg_.gpt, policy, device, tp, stage);
  } else {
    MT_CHECK(stage.first_layer == 0 && stage.last_layer < 0 && stage.embedding && stage.head,
             "a {} model is built whole here: its pipeline stages are not wired to the "
             "pipeline executor yet (train.pp = 1)",
             cfg_.arch);
    llama_ = std::make_unique<Llama>(cfg_.llama, policy, device, tp);
  }
}

}  // namespace meshtrain::models
