// The CUDA backend against the CPU engine: every op runs on the GPU in fp32, bf16 and fp16 and
// on the CPU in fp32 from the same dtype-rounded random inputs; outputs must agree within a
// tolerance per output dtype (relative L2 error). Outputs the op writes start as NaN, so an
// element it forgets fails. Where no GPU is visible every test reports skipped.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "runtime/cuda/cuda_backend.hpp"
#include "runtime/cuda/cuda_device.hpp"
#include "runtime/ops.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain {
namespace {

constexpr DType kDTypes[] = {DType::kF32, DType::kBF16, DType::kF16};

// Relative L2 error allowed for an output of dtype t: fp32 differs from the CPU only in the
// order of fp32 sums; 16-bit outputs carry their rounding (2^-9 bf16, 2^-12 fp16) and 16-bit
// intermediates where the GPU keeps them (attention's P and dS).
double tolerance(DType t) {
  switch (t) {
    case DType::kF32:
      return 2e-5;
    case DType::kBF16:
      return 1.5e-2;
    case DType::kF16:
      return 3e-3;
    case DType::kI32:
      break;
  }
  return 0.0;
}

class CudaOps : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (cuda::device_count() > 0) gpu_ = cuda::open_device(0).release();
  }
  static void TearDownTestSuite() {
    delete gpu_;
    gpu_ = nullptr;
  }
  void SetUp() override {
    if (gpu_ == nullptr) GTEST_SKIP() << "no CUDA device visible";
  }

  Device& gpu() { return *gpu_; }

  std::vector<float> randn(std::int64_t n, float scale = 1.0f) {
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> v(static_cast<std::size_t>(n));
    for (float& x : v) x = dist(rng_);
    return v;
  }
  std::vector<std::int32_t> randint(std::int64_t n, int hi) {
    std::uniform_int_distribution<int> dist(0, hi - 1);
    std::vector<std::int32_t> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = dist(rng_);
    return v;
  }

  // The same values on both sides: on the GPU in dtype t, on the CPU as fp32 of the rounded
  // values (what the GPU actually sees).
  struct Pair {
    Tensor gpu, cpu;
  };
  Pair pair(const std::vector<float>& v, const Shape& s, DType t) {
    Tensor g = Tensor::from_floats(v, s, t, gpu());
    Tensor c = Tensor::from_floats(v, s, t).to(DType::kF32);
    return {g, c};
  }
  Pair randn_pair(const Shape& s, DType t, float scale = 1.0f) {
    return pair(randn(s.numel(), scale), s, t);
  }
  Pair ints(const std::vector<std::int32_t>& v, const Shape& s) {
    return {Tensor::from_ints(v, s, gpu()), Tensor::from_ints(v, s)};
  }
  Pair nan_pair(const Shape& s, DType t) {
    std::vector<float> v(static_cast<std::size_t>(s.numel()),
                         std::numeric_limits<float>::quiet_NaN());
    return {Tensor::from_floats(v, s, t, gpu()), Tensor::from_floats(v, s, DType::kF32)};
  }

  static void expect_close(const Tensor& got, const Tensor& want, double tol,
                           const std::string& what) {
    const std::vector<float> g = got.to_floats(), w = want.to_floats();
    ASSERT_EQ(g.size(), w.size()) << what;
    double num = 0.0, den = 0.0;
    for (std::size_t i = 0; i < g.size(); ++i) {
      ASSERT_TRUE(std::isfinite(g[i]))
          << what << ": element " << i << " is " << g[i] << " (reference " << w[i] << ")";
      num += (double{g[i]} - w[i]) * (double{g[i]} - w[i]);
      den += double{w[i]} * w[i];
    }
    const double rel = std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
    EXPECT_LE(rel, tol) << what << ": relative L2 error " << rel;
  }

  static std::string name(const char* op, DType t) {
    return std::string(op) + " " + std::string(dtype_name(t));
  }

  std::mt19937 rng_{20261123};
  static Device* gpu_;
};

Device* CudaOps::gpu_ = nullptr;

TEST_F(CudaOps, DeviceBasics) {
  EXPECT_EQ(gpu().type(), DeviceType::kCUDA);
  EXPECT_EQ(gpu().name(), "cuda:0");
  const std::vector<float> v = randn(1000);
  Tensor t = Tensor::from_floats(v, Shape{1000}, DType::kF32, gpu());
  EXPECT_EQ(t.to_floats(), v);
  Tensor big =
      Tensor::from_floats(randn(3 << 20), Shape{3 << 20}, DType::kF32, gpu());  // > staging
  EXPECT_EQ(big.clone().to_floats(), big.to_floats());
  t.zero_();
  for (float x : t.to_floats()) ASSERT_EQ(x, 0.0f);
}

TEST_F(CudaOps, AllocatorReusesBlocksInSteadyState) {
  auto step = [&] {
    Tensor a = Tensor::empty(Shape{512, 768}, DType::kBF16, gpu());
    Tensor b = Tensor::empty(Shape{768, 768}, DType::kBF16, gpu());
    Tensor c = Tensor::empty(Shape{512, 768}, DType::kF32, gpu());
    ops::matmul(c, a, b);
  };
  step();
  gpu().synchronize();
  const std::size_t before = gpu().memory_stats().system_allocations;
  for (int i = 0; i < 5; ++i) step();
  gpu().synchronize();
  EXPECT_EQ(gpu().memory_stats().system_allocations, before);
}

TEST_F(CudaOps, Matmul) {
  struct Shape3 {
    std::int64_t m, n, k;
  };
  for (DType t : kDTypes) {
    for (Shape3 s : {Shape3{64, 48, 32}, Shape3{257, 129, 77}, Shape3{8, 2304, 768}}) {
      for (int trans = 0; trans < 4; ++trans) {
        const bool ta = trans & 1, tb = trans & 2;
        Pair a = randn_pair(ta ? Shape{s.k, s.m} : Shape{s.m, s.k}, t);
        Pair b = randn_pair(tb ? Shape{s.n, s.k} : Shape{s.k, s.n}, t);
        Pair bias = randn_pair(Shape{s.n}, t);
        Pair out = nan_pair(Shape{s.m, s.n}, t);
        ops::MatmulOptions og, oc;
        og.trans_a = oc.trans_a = ta;
        og.trans_b = oc.trans_b = tb;
        og.bias = &bias.gpu;
        oc.bias = &bias.cpu;
        ops::matmul(out.gpu, a.gpu, b.gpu, og);
        ops::matmul(out.cpu, a.cpu, b.cpu, oc);
        expect_close(out.gpu, out.cpu, tolerance(t),
                     name("matmul", t) + " " + std::to_string(s.m) + "x" + std::to_string(s.n) +
                         "x" + std::to_string(s.k) + " trans " + std::to_string(trans));
        // fp32 accumulation into an fp32 output (weight gradients), with an fp32 bias elsewhere.
        Pair acc = randn_pair(Shape{s.m, s.n}, DType::kF32);
        og = oc = ops::MatmulOptions{};
        og.trans_a = oc.trans_a = ta;
        og.trans_b = oc.trans_b = tb;
        og.accumulate = oc.accumulate = true;
        ops::matmul(acc.gpu, a.gpu, b.gpu, og);
        ops::matmul(acc.cpu, a.cpu, b.cpu, oc);
        expect_close(acc.gpu, acc.cpu, t == DType::kF32 ? 2e-5 : 1e-5 * std::sqrt(s.k) + 2e-5,
                     name("matmul accumulate fp32 out", t));
      }
      // An fp32 bias beside a 16-bit output.
      Pair a = randn_pair(Shape{s.m, s.k}, t), b = randn_pair(Shape{s.k, s.n}, t);
      Pair bias32 = randn_pair(Shape{s.n}, DType::kF32);
      Pair out = nan_pair(Shape{s.m, s.n}, t);
      ops::MatmulOptions og, oc;
      og.bias = &bias32.gpu;
      oc.bias = &bias32.cpu;
      ops::matmul(out.gpu, a.gpu, b.gpu, og);
      ops::matmul(out.cpu, a.cpu, b.cpu, oc);
      expect_close(out.gpu, out.cpu, tolerance(t), name("matmul fp32 bias", t));
    }
  }
}

TEST_F(CudaOps, MatmulGeluEpilogue) {
  auto& backend = dynamic_cast<cuda::CudaBackend&>(gpu().backend());
  for (DType t : {DType::kBF16, DType::kF16}) {
    const std::int64_t m = 256, n = 3072, k = 768;
    Pair x = randn_pair(Shape{m, k}, t), w = randn_pair(Shape{n, k}, t, 0.05f);
    Pair bias = randn_pair(Shape{n}, t, 0.1f);
    Pair out = nan_pair(Shape{m, n}, t), pre = nan_pair(Shape{m, n}, t);
    backend.matmul_gelu(out.gpu, pre.gpu, x.gpu, w.gpu, bias.gpu, m, n, k, false, true);
    ops::linear_forward(pre.cpu, x.cpu, w.cpu, &bias.cpu);
    ops::gelu_forward(out.cpu, pre.cpu);
    expect_close(pre.gpu, pre.cpu, tolerance(t), name("matmul_gelu pre-activation", t));
    expect_close(out.gpu, out.cpu, tolerance(t), name("matmul_gelu output", t));
  }
}

TEST_F(CudaOps, LinearBackwardAndBiasGrad) {
  for (DType t : kDTypes) {
    const std::int64_t rows = 300, in = 96, outf = 160;
    Pair x = randn_pair(Shape{3, 100, in}, t), w = randn_pair(Shape{outf, in}, t);
    Pair dy = randn_pair(Shape{3, 100, outf}, t);
    Pair dx = nan_pair(Shape{3, 100, in}, t);
    Pair dw = randn_pair(Shape{outf, in}, DType::kF32), db = randn_pair(Shape{outf}, DType::kF32);
    ops::linear_backward(&dx.gpu, dw.gpu, &db.gpu, dy.gpu, x.gpu, w.gpu);
    ops::linear_backward(&dx.cpu, dw.cpu, &db.cpu, dy.cpu, x.cpu, w.cpu);
    expect_close(dx.gpu, dx.cpu, tolerance(t), name("linear_backward dx", t));
    expect_close(dw.gpu, dw.cpu, 1e-5 * std::sqrt(double(rows)) + 2e-5,
                 name("linear_backward dw", t));
    expect_close(db.gpu, db.cpu, 2e-5, name("linear_backward dbias", t));
  }
}

TEST_F(CudaOps, Elementwise) {
  for (DType t : kDTypes) {
    const Shape s{7, 1031};
    Pair a = randn_pair(s, t, 3.0f), b = randn_pair(s, t);
    Pair out = nan_pair(s, t);
    ops::add(out.gpu, a.gpu, b.gpu);
    ops::add(out.cpu, a.cpu, b.cpu);
    expect_close(out.gpu, out.cpu, tolerance(t), name("add", t));
    Pair y = nan_pair(s, t);
    ops::gelu_forward(y.gpu, a.gpu);
    ops::gelu_forward(y.cpu, a.cpu);
    expect_close(y.gpu, y.cpu, tolerance(t), name("gelu_forward", t));
    Pair dx = nan_pair(s, t);
    ops::gelu_backward(dx.gpu, b.gpu, a.gpu);
    ops::gelu_backward(dx.cpu, b.cpu, a.cpu);
    expect_close(dx.gpu, dx.cpu, tolerance(t), name("gelu_backward", t));
    ops::scale_(a.gpu, 0.37f);
    ops::scale_(a.cpu, 0.37f);
    expect_close(a.gpu, a.cpu, tolerance(t), name("scale_", t));
    for (DType to : kDTypes) {
      Pair src = randn_pair(s, t, 5.0f);
      Tensor dst = nan_pair(s, to).gpu;
      ops::convert(dst, src.gpu);
      // The GPU rounds like the host conversion: compare with the host's result exactly.
      const std::vector<float> want = Tensor::from_floats(src.cpu.to_floats(), s, to).to_floats();
      EXPECT_EQ(dst.to_floats(), want) << "convert " << dtype_name(t) << " -> " << dtype_name(to);
    }
  }
}

TEST_F(CudaOps, LayerNorm) {
  for (DType t : kDTypes) {
    for (std::int64_t cols : {768, 100, 33}) {
      const Shape s{4, 65, cols};
      const std::int64_t rows = 4 * 65;
      Pair x = randn_pair(s, t, 2.0f), w = randn_pair(Shape{cols}, t),
           b = randn_pair(Shape{cols}, t);
      Pair y = nan_pair(s, t), mean = nan_pair(Shape{rows}, DType::kF32),
           rstd = nan_pair(Shape{rows}, DType::kF32);
      ops::layernorm_forward(y.gpu, mean.gpu, rstd.gpu, x.gpu, w.gpu, b.gpu);
      ops::layernorm_forward(y.cpu, mean.cpu, rstd.cpu, x.cpu, w.cpu, b.cpu);
      expect_close(y.gpu, y.cpu, tolerance(t), name("layernorm_forward y", t));
      expect_close(mean.gpu, mean.cpu, 1e-5, name("layernorm_forward mean", t));
      expect_close(rstd.gpu, rstd.cpu, 1e-5, name("layernorm_forward rstd", t));
      for (bool accumulate : {false, true}) {
        Pair dy = randn_pair(s, t);
        Pair dx = accumulate ? randn_pair(s, t) : nan_pair(s, t);
        Pair dw = randn_pair(Shape{cols}, DType::kF32), db = randn_pair(Shape{cols}, DType::kF32);
        ops::layernorm_backward(dx.gpu, dw.gpu, db.gpu, dy.gpu, x.gpu, w.gpu, mean.gpu, rstd.gpu,
                                accumulate);
        ops::layernorm_backward(dx.cpu, dw.cpu, db.cpu, dy.cpu, x.cpu, w.cpu, mean.cpu, rstd.cpu,
                                accumulate);
        expect_close(dx.gpu, dx.cpu, tolerance(t), name("layernorm_backward dx", t));
        expect_close(dw.gpu, dw.cpu, 2e-5, name("layernorm_backward dweight", t));
        expect_close(db.gpu, db.cpu, 2e-5, name("layernorm_backward dbias", t));
      }
    }
  }
}

TEST_F(CudaOps, Attention) {
  struct Case {
    int batch, seq, channels, n_head;
  };
  auto& backend = dynamic_cast<cuda::CudaBackend&>(gpu().backend());
  for (DType t : kDTypes) {
    for (Case c :
         {Case{2, 64, 128, 2}, Case{1, 200, 192, 3}, Case{2, 129, 256, 2}, Case{1, 17, 96, 3}}) {
      const std::string what = name("attention", t) + " B" + std::to_string(c.batch) + " T" +
                               std::to_string(c.seq) + " C" + std::to_string(c.channels) + " H" +
                               std::to_string(c.n_head);
      Pair qkv = randn_pair(Shape{c.batch, c.seq, 3 * c.channels}, t);
      Pair out = nan_pair(Shape{c.batch, c.seq, c.channels}, t);
      Pair lse = nan_pair(Shape{c.batch, c.n_head, c.seq}, DType::kF32);
      ops::attention_forward(out.gpu, lse.gpu, qkv.gpu, c.n_head);
      const bool fwd_cudnn = backend.last_attention_used_cudnn();
      ops::attention_forward(out.cpu, lse.cpu, qkv.cpu, c.n_head);
      expect_close(out.gpu, out.cpu, tolerance(t), what + " out");
      expect_close(lse.gpu, lse.cpu, t == DType::kF32 ? 2e-5 : 2e-3, what + " lse");
      Pair dout = randn_pair(out.cpu.shape(), t);
      Pair dqkv = nan_pair(qkv.cpu.shape(), t);
      ops::attention_backward(dqkv.gpu, dout.gpu, qkv.gpu, out.gpu, lse.gpu, c.n_head);
      const bool bwd_cudnn = backend.last_attention_used_cudnn();
      // The CPU reference backward from the CPU's own forward.
      ops::attention_backward(dqkv.cpu, dout.cpu, qkv.cpu, out.cpu, lse.cpu, c.n_head);
      expect_close(dqkv.gpu, dqkv.cpu, t == DType::kF32 ? 1e-4 : 2 * tolerance(t), what + " dqkv");
      // Deterministic: the same inputs give the same bits.
      Tensor again = nan_pair(qkv.cpu.shape(), t).gpu;
      ops::attention_backward(again, dout.gpu, qkv.gpu, out.gpu, lse.gpu, c.n_head);
      EXPECT_EQ(again.to_floats(), dqkv.gpu.to_floats())
          << what << " backward is not deterministic";
      std::printf("%s: forward %s, backward %s\n", what.c_str(), fwd_cudnn ? "cuDNN" : "fallback",
                  bwd_cudnn ? "cuDNN" : "fallback");
      if (t != DType::kF32 && c.channels / c.n_head == 64) {
        EXPECT_TRUE(fwd_cudnn && bwd_cudnn) << what << ": cuDNN should run GPT-2's head size";
      }
    }
  }
}

TEST_F(CudaOps, AttentionFallbackKernelMatchesCpu) {
  // fp32 always runs the fallback; this checks it on a GPT-2 head size too.
  Pair qkv = randn_pair(Shape{1, 96, 3 * 128}, DType::kF32);
  Pair out = nan_pair(Shape{1, 96, 128}, DType::kF32), lse = nan_pair(Shape{1, 2, 96}, DType::kF32);
  ops::attention_forward(out.gpu, lse.gpu, qkv.gpu, 2);
  ops::attention_forward(out.cpu, lse.cpu, qkv.cpu, 2);
  expect_close(out.gpu, out.cpu, 2e-5, "fallback attention out");
}

TEST_F(CudaOps, AttentionDecode) {
  for (DType t : kDTypes) {
    const int b = 2, c = 128, h = 2, tmax = 40;
    Pair kc = randn_pair(Shape{b, tmax, c}, t), vc = randn_pair(Shape{b, tmax, c}, t);
    for (int pos : {0, 17, 39}) {
      Pair qkv = randn_pair(Shape{b, 3 * c}, t);
      Pair out = nan_pair(Shape{b, c}, t);
      ops::attention_decode(out.gpu, kc.gpu, vc.gpu, qkv.gpu, pos, h);
      ops::attention_decode(out.cpu, kc.cpu, vc.cpu, qkv.cpu, pos, h);
      expect_close(out.gpu, out.cpu, tolerance(t), name("attention_decode", t));
      expect_close(kc.gpu, kc.cpu, 0.0, name("attention_decode k cache", t));
      expect_close(vc.gpu, vc.cpu, 0.0, name("attention_decode v cache", t));
    }
  }
}

// ---- the Llama-family ops -------------------------------------------------------------------

TEST_F(CudaOps, RMSNorm) {
  for (DType t : kDTypes) {
    for (std::int64_t cols : {4096, 100, 33}) {
      const Shape s{4, 65, cols};
      const std::int64_t rows = 4 * 65;
      const std::string what = " cols " + std::to_string(cols);
      Pair x = randn_pair(s, t, 2.0f), w = randn_pair(Shape{cols}, t);
      Pair y = nan_pair(s, t), rstd = nan_pair(Shape{rows}, DType::kF32);
      ops::rmsnorm_forward(y.gpu, rstd.gpu, x.gpu, w.gpu, 1e-6f);
      // The CPU reference rounds x * rstd to the dtype as the GPU does: run it in the dtype and
      // compare in fp32 (an fp32 CPU run would skip that rounding).
      Tensor x_t = x.cpu.to(t), w_t = w.cpu.to(t), y_t = Tensor::empty(s, t);
      ops::rmsnorm_forward(y_t, rstd.cpu, x_t, w_t, 1e-6f);
      expect_close(y.gpu, y_t.to(DType::kF32), tolerance(t), name("rmsnorm_forward y", t) + what);
      expect_close(rstd.gpu, rstd.cpu, 1e-5, name("rmsnorm_forward rstd", t) + what);
      for (bool accumulate : {false, true}) {
        Pair dy = randn_pair(s, t);
        Pair dx = accumulate ? randn_pair(s, t) : nan_pair(s, t);
        Pair dw = randn_pair(Shape{cols}, DType::kF32);
        ops::rmsnorm_backward(dx.gpu, dw.gpu, dy.gpu, x.gpu, w.gpu, rstd.gpu, accumulate);
        ops::rmsnorm_backward(dx.cpu, dw.cpu, dy.cpu, x.cpu, w.cpu, rstd.cpu, accumulate);
        expect_close(dx.gpu, dx.cpu, tolerance(t), name("rmsnorm_backward dx", t) + what);
        expect_close(dw.gpu, dw.cpu, 2e-5, name("rmsnorm_backward dweight", t) + what);
      }
      // Fused residual add, in place into a as a pre-norm block runs it.
      Pair a = randn_pair(s, t, 2.0f), b = randn_pair(s, t);
      Tensor sum_t = Tensor::empty(s, t), ry_t = Tensor::empty(s, t);
      Tensor rr_cpu = Tensor::empty(Shape{rows}, DType::kF32);
      ops::add(sum_t, a.cpu.to(t), b.cpu.to(t));
      ops::rmsnorm_forward(ry_t, rr_cpu, sum_t, w_t, 1e-6f);
      Pair ry = nan_pair(s, t), rr = nan_pair(Shape{rows}, DType::kF32);
      ops::residual_rmsnorm_forward(a.gpu, ry.gpu, rr.gpu, a.gpu, b.gpu, w.gpu, 1e-6f);
      expect_close(a.gpu, sum_t.to(DType::kF32), tolerance(t),
                   name("residual_rmsnorm_forward sum", t) + what);
      expect_close(ry.gpu, ry_t.to(DType::kF32), tolerance(t),
                   name("residual_rmsnorm_forward y", t) + what);
      expect_close(rr.gpu, rr_cpu, 1e-5, name("residual_rmsnorm_forward rstd", t) + what);
    }
  }
}

TEST_F(CudaOps, SwiGLU) {
  for (DType t : kDTypes) {
    const Shape xs{3, 70, 2 * 1000}, ys{3, 70, 1000};
    Pair x = randn_pair(xs, t, 3.0f), dy = randn_pair(ys, t);
    Pair y = nan_pair(ys, t), dx = nan_pair(xs, t);
    ops::swiglu_forward(y.gpu, x.gpu);
    ops::swiglu_forward(y.cpu, x.cpu);
    expect_close(y.gpu, y.cpu, tolerance(t), name("swiglu_forward", t));
    ops::swiglu_backward(dx.gpu, dy.gpu, x.gpu);
    ops::swiglu_backward(dx.cpu, dy.cpu, x.cpu);
    expect_close(dx.gpu, dx.cpu, tolerance(t), name("swiglu_backward", t));
    ops::swiglu_backward(x.gpu, dy.gpu, x.gpu);  // in place
    expect_close(x.gpu, dx.cpu, tolerance(t), name("swiglu_backward in place", t));
  }
}

TEST_F(CudaOps, Rope) {
  ops::RopeConfig cfg;
  cfg.theta = 500000.0;
  cfg.scaling = ops::RopeConfig::Scaling::kLlama3;
  cfg.factor = 8.0;
  const int positions = 300, d = 128, nh = 8, nkv = 2;
  Tensor table_gpu = Tensor::empty(Shape{positions, d}, DType::kF32, gpu());
  Tensor table_cpu = Tensor::empty(Shape{positions, d}, DType::kF32);
  ops::rope_table(table_gpu, cfg);
  ops::rope_table(table_cpu, cfg);
  EXPECT_EQ(table_gpu.to_floats(), table_cpu.to_floats()) << "rope_table is built on the host";
  for (DType t : kDTypes) {
    const Shape s{2, 65, (nh + 2 * nkv) * d};
    for (int pos0 : {0, 200}) {
      const std::string what = " pos0 " + std::to_string(pos0);
      Pair x = randn_pair(s, t, 2.0f), y = nan_pair(s, t), dx = nan_pair(s, t);
      ops::rope_forward(y.gpu, x.gpu, table_gpu, nh, nkv, pos0);
      ops::rope_forward(y.cpu, x.cpu, table_cpu, nh, nkv, pos0);
      expect_close(y.gpu, y.cpu, tolerance(t), name("rope_forward", t) + what);
      ops::rope_backward(dx.gpu, y.gpu, table_gpu, nh, nkv, pos0);
      ops::rope_backward(dx.cpu, y.cpu, table_cpu, nh, nkv, pos0);
      expect_close(dx.gpu, dx.cpu, tolerance(t), name("rope_backward", t) + what);
      ops::rope_forward(x.gpu, x.gpu, table_gpu, nh, nkv, pos0);  // in place
      expect_close(x.gpu, y.cpu, tolerance(t), name("rope_forward in place", t) + what);
    }
    // One token per sequence at a decoding position.
    Pair step = randn_pair(Shape{3, (nh + 2 * nkv) * d}, t), out = nan_pair(step.cpu.shape(), t);
    ops::rope_forward(out.gpu, step.gpu, table_gpu, nh, nkv, 299);
    ops::rope_forward(out.cpu, step.cpu, table_cpu, nh, nkv, 299);
    expect_close(out.gpu, out.cpu, tolerance(t), name("rope_forward one token", t));
  }
}

TEST_F(CudaOps, GroupedQueryAttention) {
  struct Case {
    int batch, seq, n_head, n_kv_head, head_size;
  };
  auto& backend = dynamic_cast<cuda::CudaBackend&>(gpu().backend());
  for (DType t : kDTypes) {
    for (Case c : {Case{2, 64, 8, 2, 64}, Case{1, 200, 12, 4, 64}, Case{2, 129, 4, 1, 128},
                   Case{1, 17, 6, 3, 32}}) {
      const std::string what = name("grouped-query attention", t) + " B" + std::to_string(c.batch) +
                               " T" + std::to_string(c.seq) + " H" + std::to_string(c.n_head) +
                               " KV" + std::to_string(c.n_kv_head) + " D" +
                               std::to_string(c.head_size);
      const std::int64_t width = (c.n_head + 2 * c.n_kv_head) * c.head_size;
      Pair qkv = randn_pair(Shape{c.batch, c.seq, width}, t);
      Pair out = nan_pair(Shape{c.batch, c.seq, c.n_head * c.head_size}, t);
      Pair lse = nan_pair(Shape{c.batch, c.n_head, c.seq}, DType::kF32);
      ops::attention_forward(out.gpu, lse.gpu, qkv.gpu, c.n_head, c.n_kv_head);
      const bool fwd_cudnn = backend.last_attention_used_cudnn();
      ops::attention_forward(out.cpu, lse.cpu, qkv.cpu, c.n_head, c.n_kv_head);
      expect_close(out.gpu, out.cpu, tolerance(t), what + " out");
      expect_close(lse.gpu, lse.cpu, t == DType::kF32 ? 2e-5 : 2e-3, what + " lse");
      Pair dout = randn_pair(out.cpu.shape(), t);
      Pair dqkv = nan_pair(qkv.cpu.shape(), t);
      ops::attention_backward(dqkv.gpu, dout.gpu, qkv.gpu, out.gpu, lse.gpu, c.n_head, c.n_kv_head);
      const bool bwd_cudnn = backend.last_attention_used_cudnn();
      ops::attention_backward(dqkv.cpu, dout.cpu, qkv.cpu, out.cpu, lse.cpu, c.n_head, c.n_kv_head);
      expect_close(dqkv.gpu, dqkv.cpu, t == DType::kF32 ? 1e-4 : 2 * tolerance(t), what + " dqkv");
      Tensor again = nan_pair(qkv.cpu.shape(), t).gpu;
      ops::attention_backward(again, dout.gpu, qkv.gpu, out.gpu, lse.gpu, c.n_head, c.n_kv_head);
      EXPECT_EQ(again.to_floats(), dqkv.gpu.to_floats())
          << what << " backward is not deterministic";
      std::printf("%s: forward %s, backward %s\n", what.c_str(), fwd_cudnn ? "cuDNN" : "fallback",
                  bwd_cudnn ? "cuDNN" : "fallback");
      if (t != DType::kF32 && c.head_size == 64) {
        EXPECT_TRUE(fwd_cudnn && bwd_cudnn) << what << ": cuDNN should run Llama's head size";
      }
    }
  }
}

TEST_F(CudaOps, GroupedQueryAttentionFallbackKernelMatchesCpu) {
  // fp32 always runs the fallback kernels: forward and the group-summed dK, dV.
  const int h = 6, kv = 2, d = 64;
  Pair qkv = randn_pair(Shape{2, 80, (h + 2 * kv) * d}, DType::kF32);
  Pair out = nan_pair(Shape{2, 80, h * d}, DType::kF32),
       lse = nan_pair(Shape{2, h, 80}, DType::kF32);
  ops::attention_forward(out.gpu, lse.gpu, qkv.gpu, h, kv);
  ops::attention_forward(out.cpu, lse.cpu, qkv.cpu, h, kv);
  expect_close(out.gpu, out.cpu, 2e-5, "fallback grouped-query attention out");
  Pair dout = randn_pair(out.cpu.shape(), DType::kF32),
       dqkv = nan_pair(qkv.cpu.shape(), DType::kF32);
  ops::attention_backward(dqkv.gpu, dout.gpu, qkv.gpu, out.gpu, lse.gpu, h, kv);
  ops::attention_backward(dqkv.cpu, dout.cpu, qkv.cpu, out.cpu, lse.cpu, h, kv);
  expect_close(dqkv.gpu, dqkv.cpu, 1e-4, "fallback grouped-query attention dqkv");
}

TEST_F(CudaOps, GroupedQueryAttentionDecode) {
  for (DType t : kDTypes) {
    const int b = 2, h = 8, kv = 2, d = 64, tmax = 40;
    Pair kc = randn_pair(Shape{b, tmax, kv * d}, t), vc = randn_pair(Shape{b, tmax, kv * d}, t);
    for (int pos : {0, 17, 39}) {
      Pair qkv = randn_pair(Shape{b, (h + 2 * kv) * d}, t);
      Pair out = nan_pair(Shape{b, h * d}, t);
      ops::attention_decode(out.gpu, kc.gpu, vc.gpu, qkv.gpu, pos, h, kv);
      ops::attention_decode(out.cpu, kc.cpu, vc.cpu, qkv.cpu, pos, h, kv);
      expect_close(out.gpu, out.cpu, tolerance(t), name("grouped-query attention_decode", t));
      expect_close(kc.gpu, kc.cpu, 0.0, name("grouped-query attention_decode k cache", t));
      expect_close(vc.gpu, vc.cpu, 0.0, name("grouped-query attention_decode v cache", t));
    }
  }
}

TEST_F(CudaOps, Embedding) {
  for (DType t : kDTypes) {
    const int b = 4, s = 64, c = 96, v = 50;  // few ids: many repeats in backward
    Pair tokens = ints(randint(b * s, v), Shape{b, s});
    Pair wte = randn_pair(Shape{v, c}, t), wpe = randn_pair(Shape{80, c}, t);
    for (bool with_pos : {true, false}) {
      Pair out = nan_pair(Shape{b, s, c}, t);
      ops::embedding_forward(out.gpu, tokens.gpu, wte.gpu, with_pos ? wpe.gpu : Tensor());
      ops::embedding_forward(out.cpu, tokens.cpu, wte.cpu, with_pos ? wpe.cpu : Tensor());
      expect_close(out.gpu, out.cpu, tolerance(t), name("embedding_forward", t));
      Pair dout = randn_pair(Shape{b, s, c}, t);
      Pair dwte = randn_pair(Shape{v, c}, DType::kF32),
           dwpe = randn_pair(Shape{80, c}, DType::kF32);
      Tensor pos_gpu = with_pos ? dwpe.gpu : Tensor(), pos_cpu = with_pos ? dwpe.cpu : Tensor();
      ops::embedding_backward(dwte.gpu, pos_gpu, dout.gpu, tokens.gpu);
      ops::embedding_backward(dwte.cpu, pos_cpu, dout.cpu, tokens.cpu);
      expect_close(dwte.gpu, dwte.cpu, 1e-5, name("embedding_backward dwte", t));
      if (with_pos) expect_close(dwpe.gpu, dwpe.cpu, 1e-5, name("embedding_backward dwpe", t));
    }
    // A token outside the vocabulary is reported with its position, from device memory.
    std::vector<std::int32_t> bad = randint(b * s, v);
    bad[70] = v + 5;
    Tensor bad_tokens = Tensor::from_ints(bad, Shape{b, s}, gpu());
    Tensor out = Tensor::empty(Shape{b, s, c}, t, gpu());
    try {
      ops::embedding_forward(out, bad_tokens, wte.gpu, wpe.gpu);
      ADD_FAILURE() << "out-of-range token accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("batch 1, time 6"), std::string::npos) << e.what();
    }
  }
}

TEST_F(CudaOps, EmbeddingBackwardIsDeterministic) {
  const int b = 8, s = 256, c = 128, v = 30;
  Pair tokens = ints(randint(b * s, v), Shape{b, s});
  Pair dout = randn_pair(Shape{b, s, c}, DType::kBF16);
  std::vector<float> first;
  for (int run = 0; run < 3; ++run) {
    Tensor dwte = Tensor::zeros(Shape{v, c}, DType::kF32, gpu());
    Tensor dwpe = Tensor::zeros(Shape{s, c}, DType::kF32, gpu());
    ops::embedding_backward(dwte, dwpe, dout.gpu, tokens.gpu);
    if (run == 0) {
      first = dwte.to_floats();
    } else {
      EXPECT_EQ(dwte.to_floats(), first) << "run " << run;
    }
  }
}

TEST_F(CudaOps, CrossEntropy) {
  for (DType t : kDTypes) {
    const int rows = 37, vocab = 1000, padded = 1024;
    std::vector<std::int32_t> tg = randint(rows, vocab);
    tg[3] = -1;  // ignored position
    Pair targets = ints(tg, Shape{rows});
    Pair logits = randn_pair(Shape{rows, padded}, t, 3.0f);
    Pair losses = nan_pair(Shape{rows}, DType::kF32), lse = nan_pair(Shape{rows}, DType::kF32);
    ops::cross_entropy_forward(losses.gpu, lse.gpu, logits.gpu, targets.gpu, vocab);
    ops::cross_entropy_forward(losses.cpu, lse.cpu, logits.cpu, targets.cpu, vocab);
    expect_close(losses.gpu, losses.cpu, 2e-5, name("cross_entropy_forward losses", t));
    expect_close(lse.gpu, lse.cpu, 2e-5, name("cross_entropy_forward lse", t));
    Pair dlogits = nan_pair(Shape{rows, padded}, t);
    ops::cross_entropy_backward(dlogits.gpu, logits.gpu, lse.gpu, targets.gpu, vocab, 1.0f / rows);
    ops::cross_entropy_backward(dlogits.cpu, logits.cpu, lse.cpu, targets.cpu, vocab, 1.0f / rows);
    expect_close(dlogits.gpu, dlogits.cpu, tolerance(t), name("cross_entropy_backward", t));
    // In place, as the trainer does it.
    ops::cross_entropy_backward(logits.gpu, logits.gpu, lse.gpu, targets.gpu, vocab, 1.0f / rows);
    expect_close(logits.gpu, dlogits.cpu, tolerance(t), name("cross_entropy_backward in place", t));
  }
}

// The fused ops against the CPU's unfused composition (ops.hpp): linear + GELU through the
// cuBLASLt epilogue (16-bit with a bias of the same dtype) or matmul + GELU (fp32, fp32 bias,
// no bias); residual add + LayerNorm in one pass, in place as GPT runs it.
TEST_F(CudaOps, LinearGeluForward) {
  for (DType t : kDTypes) {
    for (int bias_kind : {0, 1, 2}) {  // same dtype, fp32, none
      const std::int64_t rows = 2 * 96, in = 256, outf = 1024;
      Pair x = randn_pair(Shape{2, 96, in}, t), w = randn_pair(Shape{outf, in}, t, 0.05f);
      Pair bias = randn_pair(Shape{outf}, bias_kind == 1 ? DType::kF32 : t, 0.1f);
      Pair pre = nan_pair(Shape{2, 96, outf}, t), y = nan_pair(Shape{2, 96, outf}, t);
      const Tensor* bg = bias_kind == 2 ? nullptr : &bias.gpu;
      const Tensor* bc = bias_kind == 2 ? nullptr : &bias.cpu;
      ops::linear_gelu_forward(pre.gpu, y.gpu, x.gpu, w.gpu, bg);
      ops::linear_forward(pre.cpu, x.cpu, w.cpu, bc);
      ops::gelu_forward(y.cpu, pre.cpu);
      const std::string what =
          " bias " + std::to_string(bias_kind) + " rows " + std::to_string(rows);
      expect_close(pre.gpu, pre.cpu, tolerance(t), name("linear_gelu_forward pre", t) + what);
      expect_close(y.gpu, y.cpu, tolerance(t), name("linear_gelu_forward y", t) + what);
    }
  }
}

TEST_F(CudaOps, ResidualLayerNormForward) {
  for (DType t : kDTypes) {
    for (std::int64_t cols : {768, 100, 33}) {
      const Shape s{4, 65, cols};
      const std::int64_t rows = 4 * 65;
      Pair a = randn_pair(s, t, 2.0f), b = randn_pair(s, t), w = randn_pair(Shape{cols}, t),
           bias = randn_pair(Shape{cols}, t);
      Pair y = nan_pair(s, t), mean = nan_pair(Shape{rows}, DType::kF32),
           rstd = nan_pair(Shape{rows}, DType::kF32);
      // Reference: the fp32 sum of the rounded inputs, rounded to t as the fused op stores it
      // (the statistics are taken from the stored sum), then LayerNorm in fp32.
      Tensor sum_fp32 = Tensor::empty(s, DType::kF32);
      ops::add(sum_fp32, a.cpu, b.cpu);
      const Tensor sum_cpu = sum_fp32.to(t).to(DType::kF32);
      ops::layernorm_forward(y.cpu, mean.cpu, rstd.cpu, sum_cpu, w.cpu, bias.cpu);
      // In place into a, as GPT does (residual2 = residual2 + residual).
      ops::residual_layernorm_forward(a.gpu, y.gpu, mean.gpu, rstd.gpu, a.gpu, b.gpu, w.gpu,
                                      bias.gpu);
      const std::string what = " cols " + std::to_string(cols);
      expect_close(a.gpu, sum_cpu, tolerance(t), name("residual_layernorm_forward sum", t) + what);
      expect_close(y.gpu, y.cpu, tolerance(t), name("residual_layernorm_forward y", t) + what);
      expect_close(mean.gpu, mean.cpu, 1e-5, name("residual_layernorm_forward mean", t) + what);
      expect_close(rstd.gpu, rstd.cpu, 1e-5, name("residual_layernorm_forward rstd", t) + what);
    }
  }
}

// The vocab-parallel pieces: three ranks' columns of one logits matrix, each rank's partial
// forward on the GPU, the parts stacked as the all-gather would, combined; against the CPU's
// plain cross-entropy over all columns.
TEST_F(CudaOps, CrossEntropyCombineAndSplitBackward) {
  for (DType t : kDTypes) {
    const int rows = 37, k = 3, cols = 384, vocab = 3 * 384 - 200;  // rank 2 partly padding
    std::vector<std::int32_t> tg = randint(rows, vocab);
    tg[3] = -1;
    Pair logits = randn_pair(Shape{rows, k * cols}, t, 3.0f);
    Pair targets = ints(tg, Shape{rows});
    Pair losses = nan_pair(Shape{rows}, DType::kF32), lse = nan_pair(Shape{rows}, DType::kF32);
    ops::cross_entropy_forward(losses.cpu, lse.cpu, logits.cpu, targets.cpu, vocab);
    Pair dfull = nan_pair(Shape{rows, k * cols}, t);
    ops::cross_entropy_backward(dfull.cpu, logits.cpu, lse.cpu, targets.cpu, vocab, 0.5f);
    std::vector<float> full = logits.gpu.to_floats();  // the rounded values
    std::vector<float> parts;
    std::vector<std::int32_t> owner(rows);
    std::vector<std::vector<std::int32_t>> locals(k, std::vector<std::int32_t>(rows));
    std::vector<Tensor> shards;
    for (int r = 0; r < k; ++r) {
      std::vector<float> sh(static_cast<std::size_t>(rows) * cols);
      for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) sh[i * cols + j] = full[i * k * cols + r * cols + j];
      for (int i = 0; i < rows; ++i) {
        const int o = tg[i] < 0 ? -1 : tg[i] / cols;
        owner[i] = o;
        locals[r][i] = tg[i] < 0 ? -2 : (o == r ? tg[i] - r * cols : -1);
      }
      Tensor s = Tensor::from_floats(sh, Shape{rows, cols}, t, gpu());
      Tensor lt = Tensor::from_ints(locals[r], Shape{rows}, gpu());
      Tensor pl = Tensor::empty(Shape{rows}, DType::kF32, gpu()),
             pls = Tensor::empty(Shape{rows}, DType::kF32, gpu());
      const int valid = std::min(cols, vocab - r * cols);
      ops::cross_entropy_forward(pl, pls, s, lt, valid);
      for (float v : pls.to_floats()) parts.push_back(v);
      for (float v : pl.to_floats()) parts.push_back(v);
      shards.push_back(s);
    }
    Tensor parts_t = Tensor::from_floats(parts, Shape{k, 2, rows}, DType::kF32, gpu());
    Tensor owner_t = Tensor::from_ints(owner, Shape{rows}, gpu());
    ops::cross_entropy_combine(losses.gpu, lse.gpu, parts_t, owner_t);
    expect_close(losses.gpu, losses.cpu, 2e-5, name("cross_entropy_combine losses", t));
    expect_close(lse.gpu, lse.cpu, 2e-5, name("cross_entropy_combine lse", t));
    const std::vector<float> want = dfull.cpu.to_floats();
    for (int r = 0; r < k; ++r) {
      const int valid = std::min(cols, vocab - r * cols);
      Tensor lt = Tensor::from_ints(locals[r], Shape{rows}, gpu());
      // In place, as the trainer does it.
      ops::cross_entropy_backward_split(shards[r], shards[r], lse.gpu, lt, valid, 0.5f);
      std::vector<float> w(static_cast<std::size_t>(rows) * cols);
      for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) w[i * cols + j] = want[i * k * cols + r * cols + j];
      expect_close(shards[r], Tensor::from_floats(w, Shape{rows, cols}, DType::kF32), tolerance(t),
                   name("cross_entropy_backward_split", t) + " rank " + std::to_string(r));
    }
  }
}

TEST_F(CudaOps, AdamW) {
  for (DType t : kDTypes) {
    for (bool with_param : {true, false}) {
      const Shape s{10007};
      Pair master = randn_pair(s, DType::kF32), grad = randn_pair(s, DType::kF32, 0.1f);
      Pair m = randn_pair(s, DType::kF32, 0.01f);
      Pair v = pair(
          [&] {
            auto x = randn(s.numel(), 0.01f);
            for (auto& e : x) e = e * e;
            return x;
          }(),
          s, DType::kF32);
      Pair param = nan_pair(s, t);
      ops::AdamWParams p;
      p.lr = 1e-3f;
      p.weight_decay = 0.1f;
      p.step = 7;
      p.grad_scale = 0.5f;
      Tensor pg = with_param ? param.gpu : Tensor(), pc = with_param ? param.cpu : Tensor();
      ops::adamw_update(pg, master.gpu, grad.gpu, m.gpu, v.gpu, p);
      ops::adamw_update(pc, master.cpu, grad.cpu, m.cpu, v.cpu, p);
      expect_close(master.gpu, master.cpu, 1e-6, name("adamw master", t));
      expect_close(m.gpu, m.cpu, 1e-6, name("adamw m", t));
      expect_close(v.gpu, v.cpu, 1e-6, name("adamw v", t));
      if (with_param) expect_close(param.gpu, param.cpu, tolerance(t), name("adamw param", t));
    }
  }
}

TEST_F(CudaOps, NormsAndClipping) {
  for (DType t : kDTypes) {
    Pair a = randn_pair(Shape{123457}, t), b = randn_pair(Shape{77}, t, 10.0f);
    const double ga = ops::sum_of_squares(a.gpu), ca = ops::sum_of_squares(a.cpu);
    EXPECT_NEAR(ga, ca, 1e-6 * ca) << dtype_name(t);
    std::vector<Tensor> g{a.gpu, b.gpu}, c{a.cpu, b.cpu};
    const double ng = ops::clip_grad_norm(g, 1.0), nc = ops::clip_grad_norm(c, 1.0);
    EXPECT_NEAR(ng, nc, 1e-6 * nc);
    expect_close(a.gpu, a.cpu, tolerance(t), name("clip_grad_norm", t));
    EXPECT_NEAR(ops::global_norm(g), 1.0, 5 * tolerance(t));
  }
  std::vector<float> inf(100, 1.0f);
  inf[42] = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(
      std::isinf(ops::sum_of_squares(Tensor::from_floats(inf, Shape{100}, DType::kF32, gpu()))));
}

}  // namespace
}  // namespace meshtrain
