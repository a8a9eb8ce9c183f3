// gpt_runner: runs meshtrain's GPT and Trainer on fixed inputs and writes everything a PyTorch
// reference needs to redo the computation (tests/models/test_gpt_torch.py).
//
//   gpt_runner grads --precision fp32|bf16 --vocab V --padded-vocab P --seed S --out FILE
//     A GPT (2 layers, width 48, 4 heads, block 32) initialised from the seed; one forward and
//     backward on a fixed batch [2, 16] whose targets include ignored (-1) positions and the
//     highest real token id. Writes the compute parameters ("param.<name>", as fp32), the
//     gradients ("grad.<name>"), "tokens", "targets" and "loss".
//
//   gpt_runner train --data TEXT --run DIR --out FILE
//     The Trainer (fp32, byte vocabulary, AdamW, cosine schedule with warm-up, clipping,
//     gradient accumulation 2) for 10 steps on a text file. Writes the initial and final
//     master weights ("init.<name>", "final.<name>"), every micro-batch ("inputs",
//     "targets": [steps x accum, B, T]) and per step "lr", "loss" and "grad_norm"; the
//     training hyper-parameters are in the metadata.
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "launch/trainer.hpp"
#include "runtime/data.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/threads.hpp"

namespace meshtrain {
namespace {

using Named = std::vector<std::pair<std::string, Tensor>>;

struct Flags {
  std::vector<std::string> args;
  std::string get(const std::string& flag, const std::string& fallback = "") const {
    for (std::size_t i = 0; i + 1 < args.size(); ++i)
      if (args[i] == flag) return args[i + 1];
    MT_CHECK(!fallback.empty(), "gpt_runner: missing {}", flag);
    return fallback;
  }
};

Tensor scalar(double v) {
  return Tensor::from_floats({static_cast<float>(v)}, Shape{1}, DType::kF32);
}

int run_grads(const Flags& f) {
  models::GPTConfig cfg;
  cfg.n_layer = 2;
  cfg.n_head = 4;
  cfg.n_embd = 48;
  cfg.block_size = 32;
  cfg.vocab_size = std::stoi(f.get("--vocab"));
  cfg.padded_vocab = std::stoi(f.get("--padded-vocab"));
  const std::string precision = f.get("--precision");
  const std::uint64_t seed = std::stoull(f.get("--seed", "7"));
  models::GPT model(cfg, PrecisionPolicy::parse(precision));
  model.init_weights(seed);

  const int b = 2, t = 16;
  std::mt19937 gen(static_cast<unsigned>(seed));
  std::uniform_int_distribution<int> tok(0, cfg.vocab_size - 1);
  std::vector<std::int32_t> tokens(b * t), targets(b * t);
  for (auto& v : tokens) v = tok(gen);
  for (auto& v : targets) v = tok(gen);
  // Ignored positions, and the highest real id both as an input and as a target.
  targets[3] = -1;
  targets[t + 7] = -1;
  targets[b * t - 1] = -1;
  tokens[5] = cfg.vocab_size - 1;
  targets[9] = cfg.vocab_size - 1;
  const Tensor tokens_t = Tensor::from_ints(tokens, Shape{b, t});
  const Tensor targets_t = Tensor::from_ints(targets, Shape{b, t});

  model.zero_grads();
  const float loss = model.forward(tokens_t, targets_t);
  model.backward(1.0f);

  Named out;
  for (std::size_t i = 0; i < model.params().size(); ++i)
    out.emplace_back("param." + model.params()[i].name, model.param(i).to(DType::kF32));
  for (std::size_t i = 0; i < model.params().size(); ++i)
    out.emplace_back("grad." + model.params()[i].name, model.grad(i));
  out.emplace_back("tokens", tokens_t);
  out.emplace_back("targets", targets_t);
  out.emplace_back("loss", scalar(loss));
  save_safetensors(f.get("--out"), out,
                   {{"n_layer", std::to_string(cfg.n_layer)},
                    {"n_head", std::to_string(cfg.n_head)},
                    {"n_embd", std::to_string(cfg.n_embd)},
                    {"vocab_size", std::to_string(cfg.vocab_size)},
                    {"padded_vocab", std::to_string(cfg.padded_vocab)},
                    {"precision", precision}});
  return 0;
}

int run_train(const Flags& f) {
  launch::TrainConfig cfg;
  cfg.model_preset = "gpt-tiny";
  cfg.n_layer = 2;
  cfg.n_head = 4;
  cfg.n_embd = 48;
  cfg.block_size = 32;
  cfg.vocab = "bytes";
  cfg.train_files = {f.get("--data")};
  cfg.data_format = "text";
  cfg.val_fraction = 0.0;
  cfg.steps = 10;
  cfg.batch_size = 2;
  cfg.seq_len = 16;
  cfg.grad_accum = 2;
  cfg.precision = "fp32";
  cfg.seed = 11;
  cfg.lr = 3e-3;
  cfg.min_lr_ratio = 0.1;
  cfg.warmup_steps = 3;
  cfg.schedule = "cosine";
  cfg.weight_decay = 0.1;
  cfg.beta1 = 0.9;
  cfg.beta2 = 0.95;
  cfg.eps = 1e-8;
  // Below the gradient norm of the first steps, so that clipping is exercised.
  cfg.grad_clip = 0.5;
  cfg.threads = 1;
  cfg.eval_every = 0;
  cfg.sample_tokens = 0;
  cfg.run_dir = f.get("--run");

  launch::Trainer trainer(cfg);
  trainer.set_verbose(false);
  models::GPT& model = *trainer.model().gpt();
  Named out;
  for (const models::ParamInfo& p : model.params())
    out.emplace_back("init." + p.name, parallel::slot_view(trainer.master_weights(), p).clone());
  std::vector<float> lr, loss, norm;
  trainer.on_step([&](const launch::StepMetrics& m) {
    MT_CHECK(!m.skipped, "gpt_runner: step {} was skipped", m.step);
    lr.push_back(static_cast<float>(m.lr));
    loss.push_back(m.loss);
    norm.push_back(static_cast<float>(m.grad_norm));
  });
  trainer.run();
  for (const models::ParamInfo& p : model.params())
    out.emplace_back("final." + p.name, parallel::slot_view(trainer.master_weights(), p));

  // The micro-batches the Trainer drew: its sampler is a function of (files, seq, seed), so a
  // second one over the same data yields the same batches (DESIGN.md, data flow step 1).
  const data::Dataset ds(cfg.train_files, {}, data::Format::kText, cfg.val_fraction, cfg.seq_len,
                         cfg.seed);
  const std::int64_t micro = static_cast<std::int64_t>(cfg.steps) * cfg.grad_accum;
  Tensor inputs = Tensor::empty(Shape{micro, cfg.batch_size, cfg.seq_len}, DType::kI32);
  Tensor targets = Tensor::empty(Shape{micro, cfg.batch_size, cfg.seq_len}, DType::kI32);
  for (std::int64_t i = 0; i < micro; ++i) {
    Tensor in = inputs.slice(i, 1).view(Shape{cfg.batch_size, cfg.seq_len});
    Tensor tg = targets.slice(i, 1).view(Shape{cfg.batch_size, cfg.seq_len});
    ds.train().batch(i, 0, 1, in, tg);
  }
  out.emplace_back("inputs", inputs);
  out.emplace_back("targets", targets);
  const auto steps = static_cast<std::int64_t>(lr.size());
  out.emplace_back("lr", Tensor::from_floats(lr, Shape{steps}, DType::kF32));
  out.emplace_back("loss", Tensor::from_floats(loss, Shape{steps}, DType::kF32));
  out.emplace_back("grad_norm", Tensor::from_floats(norm, Shape{steps}, DType::kF32));
  const models::GPTConfig& mc = model.config();
  save_safetensors(f.get("--out"), out,
                   {{"n_layer", std::to_string(mc.n_layer)},
                    {"n_head", std::to_string(mc.n_head)},
                    {"n_embd", std::to_string(mc.n_embd)},
                    {"vocab_size", std::to_string(mc.vocab_size)},
                    {"padded_vocab", std::to_string(mc.padded_vocab)},
                    {"steps", std::to_string(cfg.steps)},
                    {"grad_accum", std::to_string(cfg.grad_accum)},
                    {"lr", fmt::format("{}", cfg.lr)},
                    {"min_lr_ratio", fmt::format("{}", cfg.min_lr_ratio)},
                    {"warmup_steps", std::to_string(cfg.warmup_steps)},
                    {"weight_decay", fmt::format("{}", cfg.weight_decay)},
                    {"beta1", fmt::format("{}", cfg.beta1)},
                    {"beta2", fmt::format("{}", cfg.beta2)},
                    {"eps", fmt::format("{}", cfg.eps)},
                    {"grad_clip", fmt::format("{}", cfg.grad_clip)}});
  return 0;
}

}  // namespace
}  // namespace meshtrain

int main(int argc, char** argv) {
  try {
    meshtrain::set_cpu_threads(1);  // small shapes; tests run side by side
    meshtrain::Flags f{std::vector<std::string>(argv + 1, argv + argc)};
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "grads") return meshtrain::run_grads(f);
    if (mode == "train") return meshtrain::run_train(f);
    std::fprintf(stderr, "usage: gpt_runner grads|train ... (see the comment at the top)\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpt_runner: %s\n", e.what());
    return 1;
  }
}
