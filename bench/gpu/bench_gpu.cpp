// bench_gpu: the meshtrain side of the GPU benchmark (bench/gpu/run_bench.sh runs it beside
// PyTorch on the same machine).
//
//   bench_gpu [--model gpt2] [--batch 16] [--seq 1024] [--precision bf16] [--steps 20]
//             [--warmup 3] [--peak-tflops 989] [--json FILE] [--dump DIR]
//
// 1. The cuBLAS(Lt) GEMM rate through ops::matmul (bf16 operands, fp32 accumulation) on an
//    8192^3 product and on the GPT-2 shapes of the step: the "achievable" peak of MFU.
// 2. Full training steps of the model on one GPU (zero grads, forward, backward, clip to 1.0,
//    AdamW over the flat buffers), timed between stream synchronisations after warm-up steps:
//    tokens/s, MFU against --peak-tflops (dense bf16 datasheet rate) and against the GEMM rate
//    of (1), and the allocator's peak GPU memory.
// --dump DIR writes the initial fp32 weights (Hugging Face GPT-2 names, [out, in] linear
// weights), the batch and the first steps' losses, so that bench/gpu/bench_torch.py --check
// can train the same model from the same start in PyTorch and compare.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "models/gpt.hpp"
#include "runtime/cuda/cuda_device.hpp"
#include "runtime/ops.hpp"
#include "runtime/rng.hpp"
#include "runtime/safetensors.hpp"

namespace meshtrain {
namespace {

using Clock = std::chrono::steady_clock;

struct Args {
  std::string model = "gpt2";
  int batch = 16, seq = 1024, steps = 20, warmup = 3;
  std::string precision = "bf16";
  double peak_tflops = 989.0;  // H100/H200 SXM dense bf16, NVIDIA datasheet
  std::string json, dump;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto value = [&]() -> std::string {
      MT_CHECK(i + 1 < argc, "{} needs a value", k);
      return argv[++i];
    };
    if (k == "--model")
      a.model = value();
    else if (k == "--batch")
      a.batch = std::stoi(value());
    else if (k == "--seq")
      a.seq = std::stoi(value());
    else if (k == "--steps")
      a.steps = std::stoi(value());
    else if (k == "--warmup")
      a.warmup = std::stoi(value());
    else if (k == "--precision")
      a.precision = value();
    else if (k == "--peak-tflops")
      a.peak_tflops = std::stod(value());
    else if (k == "--json")
      a.json = value();
    else if (k == "--dump")
      a.dump = value();
    else
      MT_FAIL("unknown argument '{}' (see the comment at the top of bench_gpu.cpp)", k);
  }
  MT_CHECK(a.batch > 0 && a.seq > 0 && a.steps > 0 && a.warmup >= 0,
           "--batch, --seq and --steps must be positive, --warmup non-negative");
  return a;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Median time of `reps` products out[M, N] = a[M, K] op b, bf16 operands.
double gemm_tflops(Device& dev, std::int64_t m, std::int64_t n, std::int64_t k, bool trans_b,
                   DType out_type, int reps) {
  Tensor a = Tensor::empty(Shape{m, k}, DType::kBF16, dev);
  Tensor b = Tensor::empty(trans_b ? Shape{n, k} : Shape{k, n}, DType::kBF16, dev);
  fill_uniform(a, Philox(7, 1), -1.0f, 1.0f);  // random data: zeros run faster than real data
  fill_uniform(b, Philox(7, 2), -1.0f, 1.0f);
  Tensor c = Tensor::empty(Shape{m, n}, out_type, dev);
  ops::MatmulOptions opt;
  opt.trans_b = trans_b;
  ops::matmul(c, a, b, opt);
  dev.synchronize();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    for (int i = 0; i < 10; ++i) ops::matmul(c, a, b, opt);
    dev.synchronize();
    t.push_back(seconds_since(t0) / 10);
  }
  std::sort(t.begin(), t.end());
  return 2.0 * static_cast<double>(m) * n * k / t[t.size() / 2] / 1e12;
}

int run(int argc, char** argv) {
  const Args args = parse(argc, argv);
  std::unique_ptr<Device> dev = cuda::open_device(0);  // one process: the first visible GPU
  std::printf("bench_gpu on %s\n", dev->name().c_str());

  // 1. GEMM rates.
  const double gemm_big = gemm_tflops(*dev, 8192, 8192, 8192, false, DType::kBF16, 5);
  models::GPTConfig cfg = models::GPTConfig::preset(args.model);
  cfg.block_size = std::max(cfg.block_size, args.seq);
  const std::int64_t rows = std::int64_t{args.batch} * args.seq, c = cfg.n_embd;
  // The step's GEMMs (forward shapes; backward has the same sizes), weighted by their FLOPs.
  struct G {
    std::int64_t n, k;
    int count;
  };
  const G shapes[] = {{3 * c, c, 1}, {c, c, 1}, {4 * c, c, 1}, {c, 4 * c, 1}};
  double flops = 0, secs = 0;
  for (const G& g : shapes) {
    const double r = gemm_tflops(*dev, rows, g.n, g.k, true, DType::kBF16, 3);
    const double f = 2.0 * rows * g.n * g.k * cfg.n_layer;
    flops += f;
    secs += f / (r * 1e12);
    std::printf("  gemm %lld x %lld x %lld: %.1f TFLOP/s\n", static_cast<long long>(rows),
                static_cast<long long>(g.n), static_cast<long long>(g.k), r);
  }
  const double lm_rate = gemm_tflops(*dev, rows, cfg.padded_vocab, c, true, DType::kBF16, 3);
  std::printf("  gemm %lld x %d x %lld (LM head): %.1f TFLOP/s\n", static_cast<long long>(rows),
              cfg.padded_vocab, static_cast<long long>(c), lm_rate);
  const double gemm_step = flops / secs / 1e12;
  std::printf("gemm 8192^3 bf16: %.1f TFLOP/s; GPT block GEMMs (FLOP-weighted): %.1f TFLOP/s\n",
              gemm_big, gemm_step);
  dev->empty_cache();

  // 2. Training steps.
  const PrecisionPolicy policy = PrecisionPolicy::parse(args.precision);
  models::GPT model(cfg, policy, *dev);
  // The fp32 master weights this benchmark updates itself (the parameters under fp32), with
  // clip_grad_norm and one adamw_update: the dump check compares with torch's AdamW without
  // decay masks, which parallel::DistributedAdamW applies.
  Tensor master = model.initial_weights(1234);
  model.set_weights(master);
  if (!policy.has_master_copy()) master = model.flat_params();
  std::vector<std::int32_t> tok(static_cast<std::size_t>(rows)), tgt(tok.size());
  {
    Philox rng(99, 0);
    for (std::size_t i = 0; i < tok.size(); ++i)
      tok[i] = static_cast<std::int32_t>(rng.uniform(i) * cfg.vocab_size) % cfg.vocab_size;
    for (std::size_t i = 0; i + 1 < tok.size(); ++i) tgt[i] = tok[i + 1];
    tgt.back() = tok.front();
  }
  Tensor tokens = Tensor::from_ints(tok, Shape{args.batch, args.seq}, *dev);
  Tensor targets = Tensor::from_ints(tgt, Shape{args.batch, args.seq}, *dev);
  Tensor m = Tensor::zeros(Shape{model.num_parameters()}, DType::kF32, *dev);
  Tensor v = Tensor::zeros(Shape{model.num_parameters()}, DType::kF32, *dev);
  if (!args.dump.empty()) {
    std::filesystem::create_directories(args.dump);
    std::vector<std::pair<std::string, Tensor>> w;
    for (std::size_t i = 0; i < model.params().size(); ++i)
      w.emplace_back(model.params()[i].name,
                     parallel::slot_view(master, model.params()[i]).to(cpu_device()));
    save_safetensors(args.dump + "/init.safetensors", w, {{"model", args.model}});
    save_safetensors(args.dump + "/batch.safetensors",
                     {{"tokens", tokens.to(cpu_device())}, {"targets", targets.to(cpu_device())}});
  }
  std::vector<float> losses;
  std::vector<Tensor> grads{model.flat_grads()};
  auto step = [&](int n) {
    model.zero_grads();
    const float loss = model.forward(tokens, targets);
    model.backward(1.0f);
    ops::clip_grad_norm(grads, 1.0);
    ops::AdamWParams p;
    p.lr = 1e-4f;
    p.weight_decay = 0.0f;  // the dump check compares with torch's AdamW without decay masks
    p.step = n;
    Tensor param = policy.has_master_copy() ? model.flat_params() : Tensor();
    ops::adamw_update(param, master, model.flat_grads(), m, v, p);
    losses.push_back(loss);
  };
  int n = 0;
  for (int i = 0; i < args.warmup; ++i) step(++n);
  dev->synchronize();
  dev->reset_peak_memory();
  const auto t0 = Clock::now();
  for (int i = 0; i < args.steps; ++i) step(++n);
  dev->synchronize();
  const double elapsed = seconds_since(t0);
  const double tokens_per_s = static_cast<double>(rows) * args.steps / elapsed;
  const double achieved = cfg.training_flops_per_token(args.seq) * tokens_per_s / 1e12;
  const MemoryStats ms = dev->memory_stats();
  std::printf(
      "model %s, batch %d x seq %d, %s: %.0f tokens/s, %.1f ms/step, %.1f TFLOP/s, "
      "MFU %.1f%% of %.0f (datasheet), %.1f%% of %.1f (GEMM measured); peak memory "
      "%.2f GiB; losses first %.4f last %.4f\n",
      args.model.c_str(), args.batch, args.seq, args.precision.c_str(), tokens_per_s,
      1e3 * elapsed / args.steps, achieved, 100 * achieved / args.peak_tflops, args.peak_tflops,
      100 * achieved / gemm_big, gemm_big, ms.peak_in_use_bytes / 1073741824.0, losses.front(),
      losses.back());
  if (!args.dump.empty()) {
    std::ofstream out(args.dump + "/losses.json");
    out << "{\"lr\": 1e-4, \"clip\": 1.0, \"losses\": [";
    for (std::size_t i = 0; i < losses.size(); ++i) out << (i ? ", " : "") << losses[i];
    out << "]}\n";
  }
  if (!args.json.empty()) {
    std::ofstream out(args.json);
    out << fmt::format(
        "{{\"impl\": \"meshtrain\", \"device\": \"{}\", \"model\": \"{}\", \"batch\": {}, \"seq\": "
        "{}, "
        "\"precision\": \"{}\", \"tokens_per_s\": {:.1f}, \"ms_per_step\": {:.3f}, "
        "\"model_tflops\": {:.2f}, \"gemm_8192_tflops\": {:.2f}, \"gemm_step_tflops\": {:.2f}, "
        "\"mfu_datasheet\": {:.4f}, \"mfu_gemm\": {:.4f}, \"peak_memory_bytes\": {}}}\n",
        dev->name(), args.model, args.batch, args.seq, args.precision, tokens_per_s,
        1e3 * elapsed / args.steps, achieved, gemm_big, gemm_step, achieved / args.peak_tflops,
        achieved / gemm_big, ms.peak_in_use_bytes);
  }
  return 0;
}

}  // namespace
}  // namespace meshtrain

int main(int argc, char** argv) {
  try {
    return meshtrain::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gpu: %s\n", e.what());
    return 1;
  }
}
