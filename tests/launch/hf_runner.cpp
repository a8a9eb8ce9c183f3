// hf_runner: meshtrain's logits for a run directory, for the Hugging Face interchange test
// (test_hf.py), which compares them with transformers' GPT2LMHeadModel on the same weights.
//
//   hf_runner --run DIR --tokens 1,2,3,... --batch B --out FILE
//     Loads DIR/config.toml and DIR/model.safetensors into an fp32 GPT, runs forward on the
//     tokens as [B, T], and writes "logits" [B, T, vocab_size] (fp32, the real vocabulary).
#include <cstdio>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "launch/config.hpp"
#include "launch/weights.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/threads.hpp"

int main(int argc, char** argv) {
  using namespace meshtrain;
  try {
    std::string run, tokens, out;
    int batch = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
      const std::string f = argv[i], v = argv[i + 1];
      if (f == "--run")
        run = v;
      else if (f == "--tokens")
        tokens = v;
      else if (f == "--batch")
        batch = std::stoi(v);
      else if (f == "--out")
        out = v;
      else
        MT_FAIL("hf_runner: unknown flag {}", f);
    }
    set_cpu_threads(1);
    launch::TrainConfig cfg =
        launch::load_config((std::filesystem::path(run) / "config.toml").string(), {});
    models::Decoder model(launch::model_config(cfg), PrecisionPolicy::parse("fp32"));
    model.set_weights(
        launch::load_weights(model, (std::filesystem::path(run) / "model.safetensors").string()));
    std::vector<std::int32_t> ids;
    std::stringstream ss(tokens);
    for (std::string t; std::getline(ss, t, ',');) ids.push_back(std::stoi(t));
    const std::int64_t b = batch, t = static_cast<std::int64_t>(ids.size()) / batch;
    MT_CHECK(b * t == static_cast<std::int64_t>(ids.size()),
             "hf_runner: tokens not divisible by batch");
    model.forward(Tensor::from_ints(ids, Shape{b, t}));
    const Tensor& logits = model.logits();  // [B, T, padded_vocab]
    const std::int64_t pv = logits.shape()[2], v = model.config().vocab_size();
    Tensor full = Tensor::empty(logits.shape(), DType::kF32);
    full.copy_from(logits);
    std::vector<float> real;
    const float* p = full.data_as<float>();
    for (std::int64_t r = 0; r < b * t; ++r) real.insert(real.end(), p + r * pv, p + r * pv + v);
    save_safetensors(out, {{"logits", Tensor::from_floats(real, Shape{b, t, v}, DType::kF32)}});
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hf_runner: %s\n", e.what());
    return 1;
  }
}
