// ops::matmul on the CPU against a direct oneDNN matmul primitive, at the GEMM shapes of
// GPT's default small model (C = 384, MLP 4C = 1536, vocab 256 and 50304, B*T = 8*256 = 2048
// rows) and a square 1024^3.
//
// The reference is what a caller gets from oneDNN by hand on the same memory: one primitive
// per shape, created before timing, with the same plain row-major layouts and strides (our
// tensors are plain; blocked "any" layouts would need reorders that a training step cannot
// skip), executed on the very buffers ours uses. Each rep runs ours and the reference back to
// back, alternating which goes first. After warm-up, the median of each is reported, and the
// fastest rep of each: on a machine shared with other work the fastest rep is the least
// disturbed one, so its ratio is the steadier. Small problems get more than --reps reps, so
// that each row is measured for a few seconds. fp16 has no oneDNN kernel on most CPUs: its
// row compares our fp32 fallback with oneDNN fp32 on fp32 copies of the same values.
//
// Usage: bench_matmul [--reps N] [--threads N]
// (defaults: at least 5 reps, omp_get_max_threads() threads).
#include <omp.h>

#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include "bench/bench_util.hpp"
#include "runtime/ops.hpp"
#include "runtime/rng.hpp"
#include "runtime/tensor.hpp"
#include "runtime/threads.hpp"

namespace {

using meshtrain::bench::median;
using meshtrain::bench::now_ms;

using meshtrain::DType;
using meshtrain::Shape;
using meshtrain::Tensor;

constexpr std::int64_t kRows = 8 * 256;  // B * T
constexpr std::int64_t kWidth = 384;

struct Problem {
  std::string layer, pass;
  std::int64_t m, n, k;
  bool trans_a = false, trans_b = false, accumulate = false;
  DType in = DType::kBF16, out = DType::kBF16;
};

// Forward y = x W^T, dx = dy W, dW += dy^T x for a linear layer of in -> out features.
void add_linear(std::vector<Problem>& ps, const std::string& layer, std::int64_t in,
                std::int64_t out) {
  ps.push_back({layer, "forward", kRows, out, in, false, true, false, DType::kBF16, DType::kBF16});
  ps.push_back({layer, "dx", kRows, in, out, false, false, false, DType::kBF16, DType::kBF16});
  ps.push_back({layer, "dW", out, in, kRows, true, false, true, DType::kBF16, DType::kF32});
}

dnnl::memory::data_type dnnl_type(DType t) {
  switch (t) {
    case DType::kF32:
      return dnnl::memory::data_type::f32;
    case DType::kBF16:
      return dnnl::memory::data_type::bf16;
    case DType::kF16:
      return dnnl::memory::data_type::f16;
    case DType::kI32:
      break;
  }
  return dnnl::memory::data_type::undef;
}

// [rows, cols] view of a dense matrix stored [rows, cols], or [cols, rows] when transposed.
dnnl::memory::desc plain_md(std::int64_t rows, std::int64_t cols, DType t, bool transposed) {
  return dnnl::memory::desc({rows, cols}, dnnl_type(t),
                            transposed ? dnnl::memory::dims{1, rows} : dnnl::memory::dims{cols, 1});
}

struct Result {
  double ours_ms, ref_ms;            // medians
  double ours_best_ms, ref_best_ms;  // fastest reps
  std::string ref_impl;
  int reps;
};

// Time per row spent in measured reps (both sides together), when --reps alone gives less.
constexpr double kTargetMs = 4000.0;

Result run(const Problem& p, int reps, const dnnl::engine& engine, dnnl::stream& stream) {
  const DType ref_in = p.in == DType::kF16 ? DType::kF32 : p.in;
  const DType ref_out = p.out == DType::kF16 ? DType::kF32 : p.out;
  Tensor a = Tensor::empty(p.trans_a ? Shape{p.k, p.m} : Shape{p.m, p.k}, p.in);
  Tensor b = Tensor::empty(p.trans_b ? Shape{p.n, p.k} : Shape{p.k, p.n}, p.in);
  Tensor c = Tensor::empty(Shape{p.m, p.n}, p.out);
  const meshtrain::Philox rng(1234, 0);
  meshtrain::fill_uniform(a, rng, -1.0f, 1.0f, 0);
  meshtrain::fill_uniform(b, rng, -1.0f, 1.0f, static_cast<std::uint64_t>(a.numel()));
  meshtrain::fill_uniform(c, rng, -1.0f, 1.0f, 0);
  // The reference runs on the same buffers, except where oneDNN has no kernel for the dtype.
  Tensor ra = ref_in == p.in ? a : a.to(ref_in);
  Tensor rb = ref_in == p.in ? b : b.to(ref_in);
  Tensor rc = ref_out == p.out ? c : c.to(ref_out);

  dnnl::primitive_attr attr;
  if (p.accumulate) {
    dnnl::post_ops ops;
    ops.append_sum(1.0f);
    attr.set_post_ops(ops);
  }
  const auto a_md = plain_md(p.m, p.k, ref_in, p.trans_a);
  const auto b_md = plain_md(p.k, p.n, ref_in, p.trans_b);
  const auto c_md = plain_md(p.m, p.n, ref_out, false);
  const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), attr, engine);
  const dnnl::matmul reference(pd);
  const std::unordered_map<int, dnnl::memory> args{
      {DNNL_ARG_SRC, dnnl::memory(a_md, engine, ra.data())},
      {DNNL_ARG_WEIGHTS, dnnl::memory(b_md, engine, rb.data())},
      {DNNL_ARG_DST, dnnl::memory(c_md, engine, rc.data())}};

  meshtrain::ops::MatmulOptions opt;
  opt.trans_a = p.trans_a;
  opt.trans_b = p.trans_b;
  opt.accumulate = p.accumulate;
  auto ours = [&] {
    const double t0 = now_ms();
    meshtrain::ops::matmul(c, a, b, opt);
    return now_ms() - t0;
  };
  auto ref = [&] {
    const double t0 = now_ms();
    reference.execute(stream, args);
    stream.wait();
    return now_ms() - t0;
  };
  // Warm-up (first-touch of the buffers, oneDNN's JIT, our primitive cache), which also sizes
  // the run: small problems get more reps, so that every row has about the same time to
  // average out a shared machine's noise.
  double warm = 0.0;
  for (int r = 0; r < 2; ++r) warm = ours() + ref();
  const int n = std::clamp(static_cast<int>(kTargetMs / std::max(warm, 1e-3)), reps, 50 * reps);
  std::vector<double> ours_ms, ref_ms;
  for (int r = 0; r < n; ++r) {
    if (r % 2 == 0) {
      ours_ms.push_back(ours());
      ref_ms.push_back(ref());
    } else {
      ref_ms.push_back(ref());
      ours_ms.push_back(ours());
    }
  }
  return {median(ours_ms),
          median(ref_ms),
          *std::min_element(ours_ms.begin(), ours_ms.end()),
          *std::min_element(ref_ms.begin(), ref_ms.end()),
          pd.impl_info_str(),
          n};
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 5, threads = omp_get_max_threads();
  if (!meshtrain::bench::parse_reps_threads(argc, argv, reps, threads)) return 2;
  meshtrain::set_cpu_threads(threads);

  std::vector<Problem> problems;
  add_linear(problems, "attn.qkv", kWidth, 3 * kWidth);
  add_linear(problems, "attn.proj", kWidth, kWidth);
  add_linear(problems, "mlp.fc", kWidth, 4 * kWidth);
  add_linear(problems, "mlp.proj", 4 * kWidth, kWidth);
  add_linear(problems, "lm_head V=256", kWidth, 256);
  add_linear(problems, "lm_head V=50304", kWidth, 50304);
  problems.push_back(
      {"square", "-", 1024, 1024, 1024, false, false, false, DType::kBF16, DType::kBF16});
  problems.push_back(
      {"square", "-", 1024, 1024, 1024, false, false, false, DType::kF32, DType::kF32});
  problems.push_back(
      {"square", "-", 1024, 1024, 1024, false, false, false, DType::kF16, DType::kF16});

  const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  dnnl::stream stream(engine);
  std::printf(
      "bench_matmul: %d threads, median of at least %d reps after 2 warm-up, ours = "
      "ops::matmul, oneDNN = direct matmul primitive on the same buffers\n\n",
      threads, reps);
  std::printf(
      "| layer | pass | M x N x K | op(A) op(B) | in -> out | ours GFLOP/s | oneDNN GFLOP/s "
      "| ours / oneDNN | best: ours | best: oneDNN | best: ours / oneDNN | reps | oneDNN impl "
      "|\n");
  std::printf(
      "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n");
  double worst = 1e9, worst_best = 1e9;
  for (const Problem& p : problems) {
    const Result r = run(p, reps, engine, stream);
    const double gflop =
        2.0 * static_cast<double>(p.m) * static_cast<double>(p.n) * static_cast<double>(p.k) * 1e-9;
    const double ours = gflop / (r.ours_ms * 1e-3), ref = gflop / (r.ref_ms * 1e-3);
    const double ours_best = gflop / (r.ours_best_ms * 1e-3);
    const double ref_best = gflop / (r.ref_best_ms * 1e-3);
    const bool fallback = p.in == DType::kF16;
    std::printf(
        "| %s | %s | %lld x %lld x %lld | %s %s%s | %s -> %s%s | %.0f | %.0f | %.2f | %.0f | %.0f "
        "| %.2f | %d | %s |\n",
        p.layer.c_str(), p.pass.c_str(), static_cast<long long>(p.m), static_cast<long long>(p.n),
        static_cast<long long>(p.k), p.trans_a ? "A^T" : "A", p.trans_b ? "B^T" : "B",
        p.accumulate ? " (+=)" : "", std::string(meshtrain::dtype_name(p.in)).c_str(),
        std::string(meshtrain::dtype_name(p.out)).c_str(), fallback ? " (oneDNN: fp32)" : "", ours,
        ref, ours / ref, ours_best, ref_best, ours_best / ref_best, r.reps, r.ref_impl.c_str());
    std::fflush(stdout);
    if (p.layer != "square") {
      worst = std::min(worst, ours / ref);
      worst_best = std::min(worst_best, ours_best / ref_best);
    }
  }
  std::printf(
      "\nworst ours / oneDNN over the GPT shapes: %.2f on medians, %.2f on best reps "
      "(target >= 0.90)\n",
      worst, worst_best);
  return 0;
}
