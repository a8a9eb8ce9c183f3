// The Llama-family ops on the CPU against their GPT equivalents at the same shapes, forward +
// backward, bf16:
//   - grouped-query attention (n_head query heads sharing n_kv_head key/value heads) against
//     multi-head attention with as many heads (the same FLOPs; GQA reads fewer k/v heads and
//     sums their gradients over each group);
//   - RMSNorm against LayerNorm on [B*T, C] (one statistic instead of two, no bias);
//   - SwiGLU on a fused [B*T, 2F] gate | up against GELU on [B*T, F] (one output of F per row
//     each);
//   - rotary embeddings on the q and k heads of the fused projection, alone (GPT has none).
//
// Usage: bench_llama_ops [--reps N] [--threads N] (default: 30 reps, all cores).
// Each rep times every op in turn (per call, over a few calls in a row for the short ones);
// medians over the reps are reported, after warm-up. On a machine
// shared with other work run it with OMP_WAIT_POLICY=passive (see bench_attention.cpp).
#include <omp.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "bench/bench_util.hpp"
#include "runtime/ops.hpp"
#include "runtime/rng.hpp"
#include "runtime/tensor.hpp"
#include "runtime/threads.hpp"

namespace {

using meshtrain::DType;
using meshtrain::Shape;
using meshtrain::Tensor;
using meshtrain::bench::median;
using meshtrain::bench::now_ms;
namespace ops = meshtrain::ops;

constexpr int kBatch = 8, kSeq = 256, kHeadSize = 64, kHeads = 8, kKvHeads = 2;
constexpr int kChannels = kHeads * kHeadSize;  // 512
constexpr int kHidden = 1536;                  // the MLP's F (3 C, as Llama's ~8/3 C rounded)

Tensor randn(const Shape& shape, std::uint64_t stream, float std = 1.0f, float mean = 0.0f) {
  Tensor t = Tensor::empty(shape, DType::kBF16);
  meshtrain::fill_normal(t, meshtrain::Philox(7, stream), mean, std);
  return t;
}

// One op pair's forward + backward, timed over `inner` calls in a row (the norms, SwiGLU and
// RoPE take about a millisecond: one call is within the noise of a loaded machine).
struct Timed {
  std::string name;
  int inner;
  std::function<void()> fn;
};

}  // namespace

int main(int argc, char** argv) {
  int reps = 30, threads = omp_get_num_procs();
  if (!meshtrain::bench::parse_reps_threads(argc, argv, reps, threads)) return 2;
  meshtrain::set_cpu_threads(threads);
  const std::int64_t rows = std::int64_t{kBatch} * kSeq;

  // Attention: the same query heads, with n_kv_head and with n_head key/value heads.
  Tensor gqa = randn(Shape{kBatch, kSeq, (kHeads + 2 * kKvHeads) * kHeadSize}, 1);
  Tensor mha = randn(Shape{kBatch, kSeq, 3 * kChannels}, 2);
  Tensor out = Tensor::empty(Shape{kBatch, kSeq, kChannels}, DType::kBF16);
  Tensor lse = Tensor::empty(Shape{kBatch, kHeads, kSeq}, DType::kF32);
  Tensor dout = randn(out.shape(), 3);
  Tensor dgqa = Tensor::empty(gqa.shape(), DType::kBF16);
  Tensor dmha = Tensor::empty(mha.shape(), DType::kBF16);

  // Norms on [B*T, C].
  Tensor x = randn(Shape{rows, kChannels}, 4, 2.0f), dy = randn(x.shape(), 5);
  Tensor y = Tensor::empty(x.shape(), DType::kBF16), dx = Tensor::empty(x.shape(), DType::kBF16);
  Tensor w = randn(Shape{kChannels}, 6, 0.1f, 1.0f), b = randn(Shape{kChannels}, 7, 0.1f);
  Tensor mean = Tensor::empty(Shape{rows}, DType::kF32), rstd = mean.clone();
  Tensor dw = Tensor::zeros(Shape{kChannels}, DType::kF32), db = dw.clone();

  // MLP activations: SwiGLU's fused gate | up against GELU's pre-activation.
  Tensor gate_up = randn(Shape{rows, 2 * kHidden}, 8, 2.0f), pre = randn(Shape{rows, kHidden}, 9);
  Tensor act = Tensor::empty(Shape{rows, kHidden}, DType::kBF16), dact = randn(act.shape(), 10);
  Tensor dgate_up = Tensor::empty(gate_up.shape(), DType::kBF16);
  Tensor dpre = Tensor::empty(pre.shape(), DType::kBF16);

  // Rotary table of Llama 3.1.
  ops::RopeConfig cfg;
  cfg.theta = 500000.0;
  cfg.scaling = ops::RopeConfig::Scaling::kLlama3;
  cfg.factor = 8.0;
  Tensor table = Tensor::empty(Shape{kSeq, kHeadSize}, DType::kF32);
  ops::rope_table(table, cfg);

  std::vector<Timed> runs{
      {"GQA attention fwd+bwd (H=8, KV=2)", 1,
       [&] {
         ops::attention_forward(out, lse, gqa, kHeads, kKvHeads);
         ops::attention_backward(dgqa, dout, gqa, out, lse, kHeads, kKvHeads);
       }},
      {"MHA attention fwd+bwd (H=8)", 1,
       [&] {
         ops::attention_forward(out, lse, mha, kHeads);
         ops::attention_backward(dmha, dout, mha, out, lse, kHeads);
       }},
      {"RMSNorm fwd+bwd", 10,
       [&] {
         ops::rmsnorm_forward(y, rstd, x, w);
         ops::rmsnorm_backward(dx, dw, dy, x, w, rstd, false);
       }},
      {"LayerNorm fwd+bwd", 10,
       [&] {
         ops::layernorm_forward(y, mean, rstd, x, w, b);
         ops::layernorm_backward(dx, dw, db, dy, x, w, mean, rstd, false);
       }},
      {"SwiGLU fwd+bwd", 4,
       [&] {
         ops::swiglu_forward(act, gate_up);
         ops::swiglu_backward(dgate_up, dact, gate_up);
       }},
      {"GELU fwd+bwd", 4,
       [&] {
         ops::gelu_forward(act, pre);
         ops::gelu_backward(dpre, dact, pre);
       }},
      {"RoPE fwd+bwd (q and k heads, in place)", 10,
       [&] {
         ops::rope_forward(gqa, gqa, table, kHeads, kKvHeads);
         ops::rope_backward(dgqa, dgqa, table, kHeads, kKvHeads);
       }},
  };
  for (int i = 0; i < 3; ++i)
    for (Timed& r : runs) r.fn();
  // Each rep runs every op in turn, starting from a different one each time, so that no op
  // always follows the same neighbour (the first op after attention meets sleeping threads).
  std::vector<std::vector<double>> ms(runs.size());
  for (int i = 0; i < reps; ++i) {
    for (std::size_t j = 0; j < runs.size(); ++j) {
      const std::size_t k = (i + j) % runs.size();
      const double t0 = now_ms();
      for (int n = 0; n < runs[k].inner; ++n) runs[k].fn();
      ms[k].push_back((now_ms() - t0) / runs[k].inner);
    }
  }
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  std::printf(
      "Llama ops vs GPT ops, bf16, B=%d T=%d D=%d (C=%d), F=%d, %d threads, "
      "OMP_WAIT_POLICY=%s, median of %d reps\n",
      kBatch, kSeq, kHeadSize, kChannels, kHidden, threads, policy != nullptr ? policy : "(unset)",
      reps);
  for (std::size_t k = 0; k < runs.size(); ++k)
    std::printf("  %-40s %8.3f ms\n", runs[k].name.c_str(), median(ms[k]));
  std::printf("  ratio GQA / MHA                          %8.2f\n", median(ms[0]) / median(ms[1]));
  std::printf("  ratio RMSNorm / LayerNorm                %8.2f\n", median(ms[2]) / median(ms[3]));
  std::printf("  ratio SwiGLU / GELU                      %8.2f\n", median(ms[4]) / median(ms[5]));
  return 0;
}
