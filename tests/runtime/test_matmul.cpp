// ops::matmul and cpu::gemm against a naive double-precision reference.
//
// Inputs are random and never zero; the reference multiplies the values as rounded to the
// input dtype, so the tolerance only has to cover fp32 accumulation and the rounding of the
// output. Each element's error is bounded relative to the sum of the magnitudes that formed
// it (sum |a||b| + |bias| + |c|), which is the standard GEMM error bound and stays meaningful
// where cancellation makes the result itself small.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "runtime/cpu/gemm.hpp"
#include "runtime/ops.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain {
namespace {

// Values in +-[0.25, 1]: never zero, and no cancellation inside one product.
std::vector<float> random_values(std::int64_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> mag(0.25f, 1.0f);
  std::bernoulli_distribution negative(0.5);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = negative(rng) ? -mag(rng) : mag(rng);
  return v;
}

// Error allowed per unit of the bound, by output dtype: fp32 accumulation over up to a few
// thousand terms, plus the output's own rounding (2^-8 for bf16, 2^-11 for fp16).
double tolerance(DType out) {
  switch (out) {
    case DType::kF32:
      return 1e-5;
    case DType::kBF16:
      return 1e-2;
    case DType::kF16:
      return 2e-3;
    case DType::kI32:
      break;
  }
  return 0.0;
}

// C[i, j] = alpha * (sum_p op(A)[i, p] op(B)[p, j] + bias[j]) + beta * C0[i, j], with A, B and
// C0 stored row-major with the given leading dimensions. Also returns the error bound.
struct Reference {
  std::vector<double> value, bound;
};

Reference reference(const std::vector<float>& a, std::int64_t lda, bool trans_a,
                    const std::vector<float>& b, std::int64_t ldb, bool trans_b,
                    const std::vector<float>* c0, std::int64_t ldc, const std::vector<float>* bias,
                    std::int64_t m, std::int64_t n, std::int64_t k, double alpha) {
  Reference r;
  r.value.assign(static_cast<std::size_t>(m * n), 0.0);
  r.bound.assign(static_cast<std::size_t>(m * n), 0.0);
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < n; ++j) {
      double sum = 0.0, mag = 0.0;
      for (std::int64_t p = 0; p < k; ++p) {
        const double x = trans_a ? a[p * lda + i] : a[i * lda + p];
        const double y = trans_b ? b[j * ldb + p] : b[p * ldb + j];
        sum += x * y;
        mag += std::abs(x * y);
      }
      if (bias != nullptr) {
        sum += (*bias)[j];
        mag += std::abs((*bias)[j]);
      }
      sum *= alpha;
      mag *= std::abs(alpha);
      if (c0 != nullptr) {
        sum += (*c0)[i * ldc + j];
        mag += std::abs((*c0)[i * ldc + j]);
      }
      r.value[i * n + j] = sum;
      r.bound[i * n + j] = mag;
    }
  }
  return r;
}

// got is [m, n] with leading dimension ldc.
void expect_close(const std::vector<float>& got, std::int64_t ldc, const Reference& want,
                  std::int64_t m, std::int64_t n, double tol) {
  int failures = 0;
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < n; ++j) {
      const double g = got[i * ldc + j], w = want.value[i * n + j];
      const double allowed = tol * std::max(want.bound[i * n + j], 1e-30);
      if (!(std::abs(g - w) <= allowed) && ++failures <= 5) {
        ADD_FAILURE() << "C[" << i << ", " << j << "] = " << g << ", expected " << w
                      << " (allowed error " << allowed << ")";
      }
    }
  }
  EXPECT_EQ(failures, 0) << "elements out of tolerance";
}

// ---- ops::matmul ------------------------------------------------------------------------------

struct Case {
  std::int64_t m = 1, n = 1, k = 1;
  bool trans_a = false, trans_b = false;
  DType in = DType::kF32, out = DType::kF32;
  bool accumulate = false;
  std::optional<DType> bias = std::nullopt;
  std::int64_t batch = 0;  // > 0: a is 3-D, [batch, m / batch, k]

  std::string str() const {
    return fmt::format("m={} n={} k={} trans_a={} trans_b={} {} -> {}{}{}{}", m, n, k, trans_a,
                       trans_b, dtype_name(in), dtype_name(out), accumulate ? " accumulate" : "",
                       bias ? fmt::format(" bias {}", dtype_name(*bias)) : "",
                       batch > 0 ? fmt::format(" a 3-D with batch {}", batch) : "");
  }
};

void run_case(const Case& c) {
  SCOPED_TRACE(c.str());
  std::mt19937 rng(
      static_cast<unsigned>(c.m * 7919 + c.n * 104729 + c.k * 31 + c.trans_a + 2 * c.trans_b));
  Shape a_shape = c.trans_a ? Shape{c.k, c.m} : Shape{c.m, c.k};
  if (c.batch > 0) a_shape = Shape{c.batch, c.m / c.batch, c.k};
  const Shape b_shape = c.trans_b ? Shape{c.n, c.k} : Shape{c.k, c.n};
  Tensor a = Tensor::from_floats(random_values(c.m * c.k, rng), a_shape, c.in);
  Tensor b = Tensor::from_floats(random_values(c.k * c.n, rng), b_shape, c.in);
  const Shape out_shape = c.batch > 0 ? Shape{c.batch, c.m / c.batch, c.n} : Shape{c.m, c.n};
  // Without accumulate the output is only written: start from NaN to prove it.
  std::vector<float> c0 = c.accumulate
                              ? random_values(c.m * c.n, rng)
                              : std::vector<float>(static_cast<std::size_t>(c.m * c.n),
                                                   std::numeric_limits<float>::quiet_NaN());
  Tensor out = Tensor::from_floats(c0, out_shape, c.out);
  Tensor bias;
  ops::MatmulOptions opt;
  opt.trans_a = c.trans_a;
  opt.trans_b = c.trans_b;
  opt.accumulate = c.accumulate;
  if (c.bias) {
    bias = Tensor::from_floats(random_values(c.n, rng), Shape{c.n}, *c.bias);
    opt.bias = &bias;
  }
  const std::vector<float> c0_rounded = out.to_floats();
  const std::vector<float> bias_rounded = c.bias ? bias.to_floats() : std::vector<float>{};
  ops::matmul(out, a, b, opt);
  const Reference want =
      reference(a.to_floats(), c.trans_a ? c.m : c.k, c.trans_a, b.to_floats(),
                c.trans_b ? c.k : c.n, c.trans_b, c.accumulate ? &c0_rounded : nullptr, c.n,
                c.bias ? &bias_rounded : nullptr, c.m, c.n, c.k, 1.0);
  expect_close(out.to_floats(), c.n, want, c.m, c.n, tolerance(c.out));
}

void run_all_transposes(Case c) {
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      c.trans_a = ta;
      c.trans_b = tb;
      run_case(c);
    }
  }
}

TEST(Matmul, Fp32AllTransposes) {
  run_all_transposes({.m = 37, .n = 29, .k = 41});
  run_all_transposes({.m = 64, .n = 96, .k = 128});
}

TEST(Matmul, Bf16ToFp32AndBf16AllTransposes) {
  for (DType out : {DType::kF32, DType::kBF16}) {
    run_all_transposes({.m = 37, .n = 29, .k = 41, .in = DType::kBF16, .out = out});
    run_all_transposes({.m = 128, .n = 96, .k = 384, .in = DType::kBF16, .out = out});
  }
}

// oneDNN 2.6 has no fp16 matmul short of AVX512-FP16; these go through the fp32 fallback
// wherever that is so, and must give the same answers as a native kernel would.
TEST(Matmul, Fp16AllTransposes) {
  for (DType out : {DType::kF16, DType::kF32}) {
    run_all_transposes({.m = 37, .n = 29, .k = 41, .in = DType::kF16, .out = out});
    run_all_transposes({.m = 64, .n = 48, .k = 256, .in = DType::kF16, .out = out});
  }
}

TEST(Matmul, Fp16AccumulateAndBias) {
  run_case({.m = 33, .n = 17, .k = 65, .in = DType::kF16, .out = DType::kF16, .accumulate = true});
  run_case({.m = 33,
            .n = 17,
            .k = 65,
            .trans_a = true,
            .in = DType::kF16,
            .out = DType::kF32,
            .accumulate = true});
  run_case({.m = 33,
            .n = 17,
            .k = 65,
            .trans_b = true,
            .in = DType::kF16,
            .out = DType::kF16,
            .bias = DType::kF16});
  run_case({.m = 33,
            .n = 17,
            .k = 65,
            .trans_b = true,
            .in = DType::kF16,
            .out = DType::kF16,
            .bias = DType::kF32});
}

// Dtype pairs oneDNN has no kernel for on most processors: also through fp32.
TEST(Matmul, MixedDtypesThroughFp32) {
  run_case({.m = 19, .n = 23, .k = 31, .in = DType::kBF16, .out = DType::kF16});
  run_case({.m = 19, .n = 23, .k = 31, .in = DType::kF32, .out = DType::kBF16});
  run_case({.m = 19,
            .n = 23,
            .k = 31,
            .trans_a = true,
            .in = DType::kF32,
            .out = DType::kF16,
            .accumulate = true});
}

TEST(Matmul, Accumulate) {
  run_all_transposes({.m = 21, .n = 34, .k = 55, .accumulate = true});
  // Weight gradients: dW[N, K] += dy^T @ x, 16-bit operands into fp32.
  run_all_transposes({.m = 96, .n = 64, .k = 200, .in = DType::kBF16, .accumulate = true});
  run_case(
      {.m = 21, .n = 34, .k = 55, .in = DType::kBF16, .out = DType::kBF16, .accumulate = true});
}

TEST(Matmul, Bias) {
  run_case({.m = 40, .n = 24, .k = 16, .trans_b = true, .bias = DType::kF32});
  run_case({.m = 40,
            .n = 24,
            .k = 16,
            .trans_b = true,
            .in = DType::kBF16,
            .out = DType::kBF16,
            .bias = DType::kBF16});
  run_case({.m = 40,
            .n = 24,
            .k = 16,
            .trans_b = true,
            .in = DType::kBF16,
            .out = DType::kBF16,
            .bias = DType::kF32});
  run_case(
      {.m = 40, .n = 24, .k = 16, .in = DType::kBF16, .out = DType::kF32, .bias = DType::kF32});
}

TEST(Matmul, AwkwardShapes) {
  for (DType in : {DType::kF32, DType::kBF16, DType::kF16}) {
    const std::vector<DType> outs =
        in == DType::kF32 ? std::vector<DType>{in} : std::vector<DType>{DType::kF32, in};
    for (DType out : outs) {
      run_all_transposes({.m = 1, .n = 1, .k = 1, .in = in, .out = out});
      run_all_transposes({.m = 7, .n = 13, .k = 5, .in = in, .out = out});
      run_all_transposes({.m = 1, .n = 384, .k = 96, .in = in, .out = out});  // M = 1
      run_all_transposes({.m = 50, .n = 30, .k = 1, .in = in, .out = out});   // K = 1
      run_all_transposes({.m = 30, .n = 1, .k = 70, .in = in, .out = out});   // N = 1
    }
  }
}

TEST(Matmul, ThreeDimensionalA) {
  // [B, T, K] @ [N, K]^T: how every linear layer is called.
  run_case({.m = 4 * 9, .n = 20, .k = 12, .trans_b = true, .batch = 4});
  run_case({.m = 2 * 17,
            .n = 48,
            .k = 40,
            .trans_b = true,
            .in = DType::kBF16,
            .out = DType::kBF16,
            .bias = DType::kBF16,
            .batch = 2});
  run_case({.m = 3 * 5, .n = 8, .k = 6, .in = DType::kF16, .out = DType::kF16, .batch = 3});
}

TEST(Matmul, EmptyInnerDimension) {
  // K = 0: the product is empty, out = bias, or out stays as it was when accumulating.
  Tensor a = Tensor::empty(Shape{0, 3}, DType::kBF16);
  Tensor b = Tensor::empty(Shape{0, 4}, DType::kBF16);
  Tensor out = Tensor::from_floats(std::vector<float>(12, 5.0f), Shape{3, 4}, DType::kF32);
  ops::MatmulOptions acc;
  acc.trans_a = true;
  acc.accumulate = true;
  ops::matmul(out, a, b, acc);
  EXPECT_EQ(out.to_floats(), std::vector<float>(12, 5.0f));
  Tensor bias = Tensor::from_floats({1, 2, 3, 4}, Shape{4}, DType::kF32);
  ops::MatmulOptions with_bias;
  with_bias.trans_a = true;
  with_bias.bias = &bias;
  ops::matmul(out, a, b, with_bias);
  EXPECT_EQ(out.to_floats(), (std::vector<float>{1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4}));
  ops::MatmulOptions plain;
  plain.trans_a = true;
  ops::matmul(out, a, b, plain);
  EXPECT_EQ(out.to_floats(), std::vector<float>(12, 0.0f));
  // Untransposed a [3, 0] (and [1, 3, 0]): M comes from a's leading dimensions, not numel / K.
  for (const Shape& shape : {Shape{3, 0}, Shape{1, 3, 0}}) {
    Tensor a2 = Tensor::empty(shape, DType::kBF16);
    ops::MatmulOptions untransposed;
    untransposed.bias = &bias;
    ops::matmul(out, a2, b, untransposed);
    EXPECT_EQ(out.to_floats(), (std::vector<float>{1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4}));
  }
}

// ---- errors through ops::matmul ---------------------------------------------------------------

// Runs f, expects InvalidArgument, and that its message contains every one of the words.
template <typename F>
void expect_invalid(F&& f, std::initializer_list<const char*> words) {
  try {
    f();
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    const std::string msg = e.what();
    for (const char* w : words)
      EXPECT_NE(msg.find(w), std::string::npos) << "'" << w << "' not in: " << msg;
  }
}

TEST(Matmul, ErrorsNameTheArgument) {
  Tensor a = Tensor::from_floats(std::vector<float>(6, 1.0f), Shape{2, 3}, DType::kF32);
  Tensor b_bad_k = Tensor::from_floats(std::vector<float>(8, 1.0f), Shape{4, 2}, DType::kF32);
  Tensor b = Tensor::from_floats(std::vector<float>(6, 1.0f), Shape{3, 2}, DType::kF32);
  Tensor b16 = b.to(DType::kBF16);
  Tensor out = Tensor::zeros(Shape{2, 2}, DType::kF32);
  Tensor out_bad = Tensor::zeros(Shape{2, 3}, DType::kF32);
  Tensor bias = Tensor::zeros(Shape{2}, DType::kF32);
  Tensor bias_bad = Tensor::zeros(Shape{3}, DType::kF32);
  Tensor bias_f16 = Tensor::zeros(Shape{2}, DType::kF16);

  expect_invalid([&] { ops::matmul(out, a, b_bad_k); }, {"inner dimensions", "K=3", "K=4"});
  expect_invalid([&] { ops::matmul(out, a, b16); }, {"differ in dtype", "a is", "b is", "bf16"});
  expect_invalid([&] { ops::matmul(out_bad, a, b); }, {"out is", "[2, 3]", "2 rows of 2 columns"});
  ops::MatmulOptions acc_bias;
  acc_bias.accumulate = true;
  acc_bias.bias = &bias;
  expect_invalid([&] { ops::matmul(out, a, b, acc_bias); }, {"bias", "accumulate"});
  ops::MatmulOptions wrong_bias;
  wrong_bias.bias = &bias_bad;
  expect_invalid([&] { ops::matmul(out, a, b, wrong_bias); }, {"'bias'", "[2]"});
  wrong_bias.bias = &bias_f16;
  expect_invalid([&] { ops::matmul(out, a, b, wrong_bias); }, {"bias is", "fp16"});
  Tensor tokens = Tensor::from_ints({1, 2, 3, 4, 5, 6}, Shape{2, 3});
  expect_invalid([&] { ops::matmul(out, tokens, b); }, {"'a'", "int32"});
}

// ---- cpu::gemm directly: alpha, beta, leading dimensions --------------------------------------

struct GemmCase {
  std::int64_t m = 1, n = 1, k = 1;
  bool trans_a = false, trans_b = false;
  DType in = DType::kF32, out = DType::kF32;
  std::int64_t pad_a = 0, pad_b = 0, pad_c = 0;  // leading dimension minus stored columns
  float alpha = 1.0f;
  bool beta = false;
  std::optional<DType> bias = std::nullopt;

  std::string str() const {
    return fmt::format(
        "m={} n={} k={} trans_a={} trans_b={} {} -> {} pads {},{},{} alpha={} "
        "beta={}{}",
        m, n, k, trans_a, trans_b, dtype_name(in), dtype_name(out), pad_a, pad_b, pad_c, alpha,
        beta, bias ? fmt::format(" bias {}", dtype_name(*bias)) : "");
  }
};

void run_gemm_case(const GemmCase& c) {
  SCOPED_TRACE(c.str());
  std::mt19937 rng(static_cast<unsigned>(c.m * 31 + c.n * 17 + c.k + c.pad_a * 5));
  const std::int64_t a_rows = c.trans_a ? c.k : c.m, a_cols = c.trans_a ? c.m : c.k;
  const std::int64_t b_rows = c.trans_b ? c.n : c.k, b_cols = c.trans_b ? c.k : c.n;
  const std::int64_t lda = a_cols + c.pad_a, ldb = b_cols + c.pad_b, ldc = c.n + c.pad_c;
  // Padding holds values too: a GEMM that read it would be caught by the reference.
  Tensor a = Tensor::from_floats(random_values(a_rows * lda, rng), Shape{a_rows * lda}, c.in);
  Tensor b = Tensor::from_floats(random_values(b_rows * ldb, rng), Shape{b_rows * ldb}, c.in);
  std::vector<float> c0 = random_values(c.m * ldc, rng);
  if (!c.beta) {
    for (std::int64_t i = 0; i < c.m; ++i) {
      for (std::int64_t j = 0; j < c.n; ++j)
        c0[i * ldc + j] = std::numeric_limits<float>::quiet_NaN();
    }
  }
  Tensor out = Tensor::from_floats(c0, Shape{c.m * ldc}, c.out);
  const std::vector<float> c0_rounded = out.to_floats();
  Tensor bias;
  cpu::GemmArgs g;
  g.trans_a = c.trans_a;
  g.trans_b = c.trans_b;
  g.m = c.m;
  g.n = c.n;
  g.k = c.k;
  g.a = a.data();
  g.a_type = c.in;
  g.lda = lda;
  g.b = b.data();
  g.b_type = c.in;
  g.ldb = ldb;
  g.c = out.data();
  g.c_type = c.out;
  g.ldc = ldc;
  g.alpha = c.alpha;
  g.beta = c.beta ? 1.0f : 0.0f;
  if (c.bias) {
    bias = Tensor::from_floats(random_values(c.n, rng), Shape{c.n}, *c.bias);
    g.bias = bias.data();
    g.bias_type = *c.bias;
  }
  const std::vector<float> bias_rounded = c.bias ? bias.to_floats() : std::vector<float>{};
  cpu::gemm(g);
  const std::vector<float> got = out.to_floats();
  const Reference want = reference(a.to_floats(), lda, c.trans_a, b.to_floats(), ldb, c.trans_b,
                                   c.beta ? &c0_rounded : nullptr, ldc,
                                   c.bias ? &bias_rounded : nullptr, c.m, c.n, c.k, c.alpha);
  expect_close(got, ldc, want, c.m, c.n, tolerance(c.out));
  // C's padding columns are never written.
  for (std::int64_t i = 0; i < c.m; ++i) {
    for (std::int64_t j = c.n; j < ldc; ++j) {
      ASSERT_EQ(got[i * ldc + j], c0_rounded[i * ldc + j]) << "padding C[" << i << ", " << j << "]";
    }
  }
}

TEST(MatmulGemm, StridedLeadingDimensionsAlphaBetaBias) {
  for (DType in : {DType::kF32, DType::kBF16, DType::kF16}) {
    const std::vector<DType> outs =
        in == DType::kF32 ? std::vector<DType>{in} : std::vector<DType>{DType::kF32, in};
    for (DType out : outs) {
      for (bool ta : {false, true}) {
        for (bool tb : {false, true}) {
          run_gemm_case({.m = 23,
                         .n = 19,
                         .k = 27,
                         .trans_a = ta,
                         .trans_b = tb,
                         .in = in,
                         .out = out,
                         .pad_a = 5,
                         .pad_b = 3,
                         .pad_c = 7});
          run_gemm_case({.m = 23,
                         .n = 19,
                         .k = 27,
                         .trans_a = ta,
                         .trans_b = tb,
                         .in = in,
                         .out = out,
                         .pad_a = 1,
                         .pad_b = 9,
                         .pad_c = 2,
                         .alpha = 0.375f,
                         .beta = true});
          run_gemm_case({.m = 23,
                         .n = 19,
                         .k = 27,
                         .trans_a = ta,
                         .trans_b = tb,
                         .in = in,
                         .out = out,
                         .pad_a = 4,
                         .pad_c = 3,
                         .alpha = -1.5f,
                         .bias = out});
        }
      }
    }
  }
}

// One head of GPT's fused [T, 3C] projection, addressed in place: q_h @ k_h^T.
TEST(MatmulGemm, HeadInsideFusedProjection) {
  run_gemm_case({.m = 64,
                 .n = 64,
                 .k = 32,
                 .trans_b = true,
                 .in = DType::kBF16,
                 .out = DType::kF32,
                 .pad_a = 3 * 128 - 32,
                 .pad_b = 3 * 128 - 32,
                 .alpha = 0.17677669f});
}

// The fp32 fallback converts with the same bits as the scalar conversions in dtype.hpp:
// fp16 out of an fp32 GEMM is float_to_f16 of the same GEMM's fp32 output, across overflow
// to Inf and fp16 subnormals; row lengths that are not multiples of 8 cover the tails.
TEST(MatmulGemm, Fp16FallbackRoundsLikeTheScalarConversion) {
  const std::int64_t m = 13, n = 37, k = 3;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> exponent(-14, 8);
  std::uniform_real_distribution<float> fraction(1.0f, 2.0f);
  std::bernoulli_distribution negative(0.5);
  auto draw = [&](std::int64_t count) {
    std::vector<float> v(static_cast<std::size_t>(count));
    for (float& x : v)
      x = (negative(rng) ? -1.0f : 1.0f) * std::ldexp(fraction(rng), exponent(rng));
    return v;
  };
  Tensor a = Tensor::from_floats(draw(m * k), Shape{m, k}, DType::kF32);
  Tensor b = Tensor::from_floats(draw(k * n), Shape{k, n}, DType::kF32);
  Tensor c16 = Tensor::empty(Shape{m, n}, DType::kF16);
  Tensor c32 = Tensor::empty(Shape{m, n}, DType::kF32);
  ops::matmul(c16, a, b);
  ops::matmul(c32, a, b);
  const f16* h = c16.data_as<f16>();
  const float* f = c32.data_as<float>();
  int inf = 0, subnormal = 0;
  for (std::int64_t i = 0; i < m * n; ++i) {
    ASSERT_EQ(h[i].bits, float_to_f16(f[i]).bits) << "element " << i << " = " << f[i];
    inf += (h[i].bits & 0x7fffu) == 0x7c00u;
    subnormal += (h[i].bits & 0x7c00u) == 0 && (h[i].bits & 0x3ffu) != 0;
  }
  EXPECT_GT(inf, 0);
  EXPECT_GT(subnormal, 0);

  // And fp16 in is widened exactly: a times the identity is a, subnormals and 65504 included.
  const std::int64_t rows = 5, cols = 21;
  std::vector<float> values = draw(rows * cols);
  values[0] = 65504.0f;
  values[1] = std::ldexp(1.0f, -24);  // the smallest fp16 subnormal
  values[2] = -std::ldexp(3.0f, -20);
  Tensor x = Tensor::from_floats(values, Shape{rows, cols}, DType::kF16);
  std::vector<float> eye(static_cast<std::size_t>(cols * cols), 0.0f);
  for (std::int64_t i = 0; i < cols; ++i) eye[i * cols + i] = 1.0f;
  Tensor id = Tensor::from_floats(eye, Shape{cols, cols}, DType::kF16);
  Tensor y = Tensor::empty(Shape{rows, cols}, DType::kF32);
  ops::matmul(y, x, id);
  EXPECT_EQ(y.to_floats(), x.to_floats());
}

TEST(MatmulGemm, RejectsBadArguments) {
  std::vector<float> a(64, 1.0f), b(64, 1.0f), c(64, 0.0f);
  cpu::GemmArgs g;
  g.m = 4;
  g.n = 4;
  g.k = 4;
  g.a = a.data();
  g.lda = 4;
  g.b = b.data();
  g.ldb = 4;
  g.c = c.data();
  g.ldc = 4;
  cpu::gemm(g);
  EXPECT_EQ(c[0], 4.0f);

  cpu::GemmArgs bad = g;
  bad.lda = 3;
  expect_invalid([&] { cpu::gemm(bad); }, {"lda=3", "4 columns of A"});
  bad = g;
  bad.trans_b = true;
  bad.n = 8;
  bad.ldc = 8;
  bad.ldb = 2;
  expect_invalid([&] { cpu::gemm(bad); }, {"ldb=2", "B (transposed"});
  bad = g;
  bad.beta = 0.5f;
  expect_invalid([&] { cpu::gemm(bad); }, {"beta must be 0 or 1"});
  bad = g;
  bad.b_type = DType::kBF16;
  expect_invalid([&] { cpu::gemm(bad); }, {"A is fp32 and B is bf16"});
  bad = g;
  bad.ldc = 2;
  expect_invalid([&] { cpu::gemm(bad); }, {"ldc=2"});
  bad = g;
  bad.bias = c.data();
  bad.bias_type = DType::kBF16;
  expect_invalid([&] { cpu::gemm(bad); }, {"bias is bf16"});
}

// ---- the primitive cache -----------------------------------------------------------------------

TEST(MatmulGemm, RepeatedProblemsDoNotGrowTheCache) {
  // Shapes no other test uses, so that the first call of each adds to the cache.
  Tensor a = Tensor::from_floats(std::vector<float>(11 * 7, 0.5f), Shape{11, 7}, DType::kBF16);
  Tensor b = Tensor::from_floats(std::vector<float>(7 * 5, 0.25f), Shape{7, 5}, DType::kBF16);
  Tensor out = Tensor::empty(Shape{11, 5}, DType::kF32);
  const std::size_t before = cpu::gemm_cache_size();
  ops::matmul(out, a, b);
  const std::size_t after_first = cpu::gemm_cache_size();
  // A new problem adds one entry, or two where oneDNN has no bf16 matmul for this CPU (AVX2
  // without AVX-512 BF16: the bf16 problem's entry points at its fp32 twin, gemm.hpp).
  const std::size_t per_problem = after_first - before;
  EXPECT_TRUE(per_problem == 1 || per_problem == 2) << per_problem;
  for (int i = 0; i < 20; ++i) ops::matmul(out, a, b);
  EXPECT_EQ(cpu::gemm_cache_size(), after_first);
  EXPECT_EQ(out.to_floats()[0], 7 * 0.125f);

  // Another transposition is another problem: as many entries more as the first, once.
  Tensor bt = Tensor::from_floats(std::vector<float>(5 * 7, 0.25f), Shape{5, 7}, DType::kBF16);
  ops::MatmulOptions opt;
  opt.trans_b = true;
  for (int i = 0; i < 5; ++i) ops::matmul(out, a, bt, opt);
  EXPECT_EQ(cpu::gemm_cache_size(), after_first + per_problem);

  // The fp16 path caches its fp32 problem alongside and repeats without growing either.
  Tensor a16 = a.to(DType::kF16), b16 = b.to(DType::kF16);
  Tensor out16 = Tensor::empty(Shape{11, 5}, DType::kF16);
  ops::matmul(out16, a16, b16);
  const std::size_t after_f16 = cpu::gemm_cache_size();
  EXPECT_LE(after_f16, after_first + 3);
  for (int i = 0; i < 5; ++i) ops::matmul(out16, a16, b16);
  EXPECT_EQ(cpu::gemm_cache_size(), after_f16);
  EXPECT_EQ(out16.to_floats()[0], 7 * 0.125f);
}

// Execution is not serialised: threads share primitives but not streams or scratch buffers.
TEST(MatmulGemm, ConcurrentCallersGetTheirOwnResults) {
  constexpr int kThreads = 4;
  std::vector<std::thread> threads;
  std::vector<int> ok(kThreads, 0);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([t, &ok] {
      const DType in = t % 2 == 0 ? DType::kBF16 : DType::kF16;  // native and fallback
      const float x = 0.25f * static_cast<float>(t + 1);
      Tensor a = Tensor::from_floats(std::vector<float>(48 * 64, x), Shape{48, 64}, in);
      Tensor b = Tensor::from_floats(std::vector<float>(64 * 40, 0.5f), Shape{64, 40}, in);
      Tensor out = Tensor::empty(Shape{48, 40}, DType::kF32);
      bool good = true;
      for (int rep = 0; rep < 10; ++rep) {
        ops::matmul(out, a, b);
        for (float v : out.to_floats()) good = good && v == 64 * 0.5f * x;
      }
      ok[t] = good ? 1 : 0;
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(ok[t], 1) << "thread " << t;
}

// The fused ops on the CPU are compositions of the unfused ones: the same bits (the GPU run
// checks the CUDA fusions against these; tests/runtime/test_cuda_ops.cpp).
TEST(FusedOps, CpuMatchesTheUnfusedOpsBitForBit) {
  std::mt19937 rng(7);
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
    const Tensor x = Tensor::from_floats(random_values(2 * 5 * 24, rng), Shape{2, 5, 24}, t);
    const Tensor w = Tensor::from_floats(random_values(40 * 24, rng), Shape{40, 24}, t);
    const Tensor bias = Tensor::from_floats(random_values(40, rng), Shape{40}, t);
    Tensor pre = Tensor::empty(Shape{2, 5, 40}, t), y = Tensor::empty(Shape{2, 5, 40}, t);
    Tensor pre2 = Tensor::empty(Shape{2, 5, 40}, t), y2 = Tensor::empty(Shape{2, 5, 40}, t);
    ops::linear_gelu_forward(pre, y, x, w, &bias);
    ops::linear_forward(pre2, x, w, &bias);
    ops::gelu_forward(y2, pre2);
    EXPECT_EQ(pre.to_floats(), pre2.to_floats()) << dtype_name(t);
    EXPECT_EQ(y.to_floats(), y2.to_floats()) << dtype_name(t);

    const Tensor a = Tensor::from_floats(random_values(6 * 24, rng), Shape{6, 24}, t);
    const Tensor b = Tensor::from_floats(random_values(6 * 24, rng), Shape{6, 24}, t);
    const Tensor g = Tensor::from_floats(random_values(24, rng), Shape{24}, t);
    const Tensor beta = Tensor::from_floats(random_values(24, rng), Shape{24}, t);
    Tensor sum = a.clone(), ln = Tensor::empty(Shape{6, 24}, t);
    Tensor mean = Tensor::empty(Shape{6}, DType::kF32), rstd = Tensor::empty(Shape{6}, DType::kF32);
    ops::residual_layernorm_forward(sum, ln, mean, rstd, sum, b, g, beta);  // in place
    Tensor sum2 = Tensor::empty(Shape{6, 24}, t), ln2 = Tensor::empty(Shape{6, 24}, t);
    Tensor mean2 = Tensor::empty(Shape{6}, DType::kF32),
           rstd2 = Tensor::empty(Shape{6}, DType::kF32);
    ops::add(sum2, a, b);
    ops::layernorm_forward(ln2, mean2, rstd2, sum2, g, beta);
    EXPECT_EQ(sum.to_floats(), sum2.to_floats()) << dtype_name(t);
    EXPECT_EQ(ln.to_floats(), ln2.to_floats()) << dtype_name(t);
    EXPECT_EQ(mean.to_floats(), mean2.to_floats()) << dtype_name(t);
    EXPECT_EQ(rstd.to_floats(), rstd2.to_floats()) << dtype_name(t);
  }
}

}  // namespace
}  // namespace meshtrain
