// Every op in runtime/ops.hpp refuses bad arguments (wrong shapes, dtypes, undefined tensors,
// token ids out of range, bad scalars) with InvalidArgument whose message names the op and the
// argument, before any work. Each test first runs the op with valid arguments, so that every
// error below comes from the one argument changed.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "runtime/ops.hpp"

namespace meshtrain {
namespace {

constexpr DType kF32 = DType::kF32, kBF16 = DType::kBF16, kF16 = DType::kF16, kI32 = DType::kI32;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Random values (never zeros), so that a valid call computes something real.
Tensor rnd(const Shape& shape, DType dtype = kF32) {
  static std::mt19937 gen(7);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  if (dtype == kI32) {
    std::vector<std::int32_t> v(static_cast<std::size_t>(shape.numel()));
    for (auto& x : v) x = static_cast<std::int32_t>(gen() % 5);
    return Tensor::from_ints(v, shape);
  }
  std::vector<float> v(static_cast<std::size_t>(shape.numel()));
  for (float& x : v) x = dist(gen);
  return Tensor::from_floats(v, shape, dtype);
}

Tensor ints(const std::vector<std::int32_t>& v, const Shape& shape) {
  return Tensor::from_ints(v, shape);
}

struct ErrorCase {
  std::string label;
  std::function<void()> call;
  std::vector<std::string> fragments;  // all must appear in the message
};

void expect_errors(const std::vector<ErrorCase>& cases) {
  for (const ErrorCase& c : cases) {
    try {
      c.call();
      ADD_FAILURE() << c.label << ": accepted";
    } catch (const InvalidArgument& e) {
      const std::string msg = e.what();
      for (const std::string& f : c.fragments)
        EXPECT_NE(msg.find(f), std::string::npos)
            << c.label << ": expected '" << f << "' in: " << msg;
    } catch (const std::exception& e) {
      ADD_FAILURE() << c.label << ": expected InvalidArgument, got " << e.what();
    }
  }
}

// The valid call must succeed, or fail only because its kernel is not written yet.
void expect_valid(const std::function<void()>& call, const char* op) {
  try {
    call();
  } catch (const InvalidArgument& e) {
    const std::string msg = e.what();
    if (msg.find("not implemented yet") == std::string::npos)
      ADD_FAILURE() << op << ": the valid call was refused: " << msg;
  }
}

TEST(OpsErrors, Matmul) {
  Tensor out = rnd({5, 7}), a = rnd({5, 3}), b = rnd({3, 7}), bias = rnd({7});
  ops::MatmulOptions with_bias;
  with_bias.bias = &bias;
  expect_valid([&] { ops::matmul(out, a, b, with_bias); }, "matmul");
  ops::MatmulOptions trans_a, accumulate_bias = with_bias;
  trans_a.trans_a = true;
  accumulate_bias.accumulate = true;
  Tensor bad_bias = rnd({6}), int_bias = rnd({7}, kI32), undefined;
  ops::MatmulOptions opt_bad_bias, opt_int_bias, opt_undefined_bias;
  opt_bad_bias.bias = &bad_bias;
  opt_int_bias.bias = &int_bias;
  opt_undefined_bias.bias = &undefined;
  expect_errors({
      {"out undefined", [&] { ops::matmul(undefined, a, b); }, {"matmul", "'out'", "undefined"}},
      {"a undefined", [&] { ops::matmul(out, undefined, b); }, {"matmul", "'a'", "undefined"}},
      {"b undefined", [&] { ops::matmul(out, a, undefined); }, {"matmul", "'b'", "undefined"}},
      {"a int",
       [&] {
         ops::matmul(out, rnd({5, 3}, kI32), b);
       },
       {"matmul", "'a'", "float"}},
      {"out int",
       [&] {
         Tensor o = rnd({5, 7}, kI32);
         ops::matmul(o, a, b);
       },
       {"matmul", "'out'", "float"}},
      {"out 0-d",
       [&] {
         Tensor o = rnd({});
         ops::matmul(o, a, b);
       },
       {"matmul", "out"}},
      {"dtypes differ",
       [&] {
         ops::matmul(out, a, rnd({3, 7}, kBF16));
       },
       {"matmul", "a is fp32", "b is bf16"}},
      {"b 3-D",
       [&] {
         ops::matmul(out, a, rnd({1, 3, 7}));
       },
       {"matmul", "b must be 2-D"}},
      {"a 1-D", [&] { ops::matmul(out, rnd({3}), b); }, {"matmul", "a must be at least 2-D"}},
      {"a 3-D transposed",
       [&] {
         ops::matmul(out, rnd({1, 3, 5}), b, trans_a);
       },
       {"matmul", "a transposed must be 2-D"}},
      {"inner dims",
       [&] {
         ops::matmul(out, rnd({5, 4}), b);
       },
       {"matmul", "inner dimensions differ", "K=4", "K=3"}},
      {"out shape",
       [&] {
         Tensor o = rnd({5, 6});
         ops::matmul(o, a, b);
       },
       {"matmul", "out is fp32[5, 6]", "5 rows of 7 columns"}},
      {"bias shape", [&] { ops::matmul(out, a, b, opt_bad_bias); }, {"matmul", "'bias'", "[7]"}},
      {"bias int", [&] { ops::matmul(out, a, b, opt_int_bias); }, {"matmul", "bias is int32"}},
      {"bias undefined",
       [&] { ops::matmul(out, a, b, opt_undefined_bias); },
       {"matmul", "'bias'", "undefined"}},
      {"bias with accumulate",
       [&] { ops::matmul(out, a, b, accumulate_bias); },
       {"matmul", "bias cannot be combined with accumulate"}},
  });
}

TEST(OpsErrors, Linear) {
  Tensor x = rnd({2, 3, 4}), w = rnd({5, 4}), bias = rnd({5}), y = rnd({2, 3, 5});
  Tensor dy = rnd({2, 3, 5}), dx = rnd({2, 3, 4}), dw = rnd({5, 4}), dbias = rnd({5});
  Tensor undefined;
  expect_valid([&] { ops::linear_forward(y, x, w, &bias); }, "linear_forward");
  expect_valid([&] { ops::linear_backward(&dx, dw, &dbias, dy, x, w); }, "linear_backward");
  Tensor bad_bias = rnd({4}), int_bias = rnd({5}, kI32);
  expect_errors({
      {"fwd x undefined",
       [&] { ops::linear_forward(y, undefined, w, nullptr); },
       {"linear_forward", "'x'", "undefined"}},
      {"fwd w undefined",
       [&] { ops::linear_forward(y, x, undefined, nullptr); },
       {"linear_forward", "'w'", "undefined"}},
      {"fwd y undefined",
       [&] { ops::linear_forward(undefined, x, w, nullptr); },
       {"linear_forward", "'y'", "undefined"}},
      {"fwd x int",
       [&] {
         ops::linear_forward(y, rnd({2, 3, 4}, kI32), w, nullptr);
       },
       {"linear_forward", "'x'", "float"}},
      {"fwd w dtype",
       [&] {
         ops::linear_forward(y, x, rnd({5, 4}, kBF16), nullptr);
       },
       {"linear_forward", "'w'", "bf16", "fp32"}},
      {"fwd w 1-D",
       [&] { ops::linear_forward(y, x, rnd({4}), nullptr); },
       {"linear_forward", "'w'", "[out_features, 4]"}},
      {"fwd in_features",
       [&] {
         ops::linear_forward(y, x, rnd({5, 3}), nullptr);
       },
       {"linear_forward", "'w'", "[out_features, 4]"}},
      {"fwd y shape",
       [&] {
         Tensor o = rnd({2, 3, 4});
         ops::linear_forward(o, x, w, nullptr);
       },
       {"linear_forward", "'y'", "6 rows of 5 columns"}},
      {"fwd y int",
       [&] {
         Tensor o = rnd({2, 3, 5}, kI32);
         ops::linear_forward(o, x, w, nullptr);
       },
       {"linear_forward", "'y'", "float"}},
      {"fwd bias shape",
       [&] { ops::linear_forward(y, x, w, &bad_bias); },
       {"linear_forward", "'bias'", "[5]"}},
      {"fwd bias int",
       [&] { ops::linear_forward(y, x, w, &int_bias); },
       {"linear_forward", "'bias'", "int32"}},
      {"bwd dy undefined",
       [&] { ops::linear_backward(&dx, dw, &dbias, undefined, x, w); },
       {"linear_backward", "'dy'", "undefined"}},
      {"bwd x undefined",
       [&] { ops::linear_backward(&dx, dw, &dbias, dy, undefined, w); },
       {"linear_backward", "'x'", "undefined"}},
      {"bwd w undefined",
       [&] { ops::linear_backward(&dx, dw, &dbias, dy, x, undefined); },
       {"linear_backward", "'w'", "undefined"}},
      {"bwd dw undefined",
       [&] { ops::linear_backward(&dx, undefined, &dbias, dy, x, w); },
       {"linear_backward", "'dw'", "undefined"}},
      {"bwd dw bf16",
       [&] {
         Tensor g = rnd({5, 4}, kBF16);
         ops::linear_backward(&dx, g, &dbias, dy, x, w);
       },
       {"linear_backward", "'dw'", "fp32"}},
      {"bwd dw shape",
       [&] {
         Tensor g = rnd({4, 5});
         ops::linear_backward(&dx, g, &dbias, dy, x, w);
       },
       {"linear_backward", "'dw'", "[5, 4]"}},
      {"bwd dy width",
       [&] {
         ops::linear_backward(&dx, dw, &dbias, rnd({2, 3, 6}), x, w);
       },
       {"linear_backward", "'dy'", "6 rows of 5 columns"}},
      {"bwd dy rows",
       [&] {
         ops::linear_backward(&dx, dw, &dbias, rnd({2, 2, 5}), x, w);
       },
       {"linear_backward", "'dy'", "6 rows of 5 columns"}},
      {"bwd dy dtype",
       [&] {
         ops::linear_backward(&dx, dw, &dbias, rnd({2, 3, 5}, kF16), x, w);
       },
       {"linear_backward", "'dy'", "fp16", "fp32"}},
      {"bwd dx shape",
       [&] {
         Tensor d = rnd({2, 3, 5});
         ops::linear_backward(&d, dw, &dbias, dy, x, w);
       },
       {"linear_backward", "'dx'", "6 rows of 4 columns"}},
      {"bwd dx undefined",
       [&] { ops::linear_backward(&undefined, dw, &dbias, dy, x, w); },
       {"linear_backward", "'dx'", "undefined"}},
      {"bwd dbias shape",
       [&] {
         Tensor d = rnd({4});
         ops::linear_backward(&dx, dw, &d, dy, x, w);
       },
       {"linear_backward", "'dbias'", "[5]"}},
      {"bwd dbias bf16",
       [&] {
         Tensor d = rnd({5}, kBF16);
         ops::linear_backward(&dx, dw, &d, dy, x, w);
       },
       {"linear_backward", "'dbias'", "fp32"}},
  });
}

TEST(OpsErrors, BiasBackward) {
  Tensor dbias = rnd({5}), dy = rnd({3, 5}), undefined;
  expect_valid([&] { ops::bias_backward(dbias, dy); }, "bias_backward");
  expect_errors({
      {"dy undefined",
       [&] { ops::bias_backward(dbias, undefined); },
       {"bias_backward", "'dy'", "undefined"}},
      {"dbias undefined",
       [&] { ops::bias_backward(undefined, dy); },
       {"bias_backward", "'dbias'", "undefined"}},
      {"dbias bf16",
       [&] {
         Tensor d = rnd({5}, kBF16);
         ops::bias_backward(d, dy);
       },
       {"bias_backward", "'dbias'", "fp32"}},
      {"dbias shape",
       [&] {
         Tensor d = rnd({4});
         ops::bias_backward(d, dy);
       },
       {"bias_backward", "'dbias'", "[5]"}},
      {"dy int",
       [&] {
         ops::bias_backward(dbias, rnd({3, 5}, kI32));
       },
       {"bias_backward", "'dy'", "float"}},
      {"dy 0-d", [&] { ops::bias_backward(dbias, rnd({})); }, {"bias_backward", "'dy'"}},
  });
}

TEST(OpsErrors, Elementwise) {
  Tensor a = rnd({3, 4}), b = rnd({3, 4}), out = rnd({3, 4}), undefined;
  expect_valid([&] { ops::add(out, a, b); }, "add");
  expect_valid([&] { ops::gelu_forward(out, a); }, "gelu_forward");
  expect_valid([&] { ops::gelu_backward(out, a, b); }, "gelu_backward");
  expect_valid(
      [&] {
        Tensor d = rnd({12}, kBF16);
        ops::convert(d, a);
      },
      "convert");
  expect_valid([&] { ops::scale_(out, 0.5f); }, "scale_");
  expect_errors({
      {"add out undefined", [&] { ops::add(undefined, a, b); }, {"add", "'out'", "undefined"}},
      {"add a undefined", [&] { ops::add(out, undefined, b); }, {"add", "'a'", "undefined"}},
      {"add b shape",
       [&] {
         ops::add(out, a, rnd({4, 3}));
       },
       {"add", "'b'", "[3, 4]"}},
      {"add a dtype",
       [&] {
         ops::add(out, rnd({3, 4}, kBF16), b);
       },
       {"add", "'a'", "fp32"}},
      {"add int",
       [&] {
         Tensor o = rnd({3, 4}, kI32);
         ops::add(o, o, o);
       },
       {"add", "'out'", "float"}},
      {"gelu y shape",
       [&] {
         Tensor y = rnd({12});
         ops::gelu_forward(y, a);
       },
       {"gelu_forward", "'y'", "[3, 4]"}},
      {"gelu y dtype",
       [&] {
         Tensor y = rnd({3, 4}, kF16);
         ops::gelu_forward(y, a);
       },
       {"gelu_forward", "'y'", "fp32"}},
      {"gelu x undefined",
       [&] { ops::gelu_forward(out, undefined); },
       {"gelu_forward", "'x'", "undefined"}},
      {"gelu x int",
       [&] {
         Tensor x = rnd({3, 4}, kI32);
         ops::gelu_forward(x, x);
       },
       {"gelu_forward", "'x'", "float"}},
      {"gelu_backward dx shape",
       [&] {
         Tensor d = rnd({4, 3});
         ops::gelu_backward(d, a, b);
       },
       {"gelu_backward", "'dx'", "[3, 4]"}},
      {"gelu_backward dy dtype",
       [&] {
         ops::gelu_backward(out, rnd({3, 4}, kBF16), b);
       },
       {"gelu_backward", "'dy'", "fp32"}},
      {"gelu_backward x undefined",
       [&] { ops::gelu_backward(out, a, undefined); },
       {"gelu_backward", "'x'", "undefined"}},
      {"convert numel",
       [&] {
         Tensor d = rnd({11});
         ops::convert(d, a);
       },
       {"convert", "'src'", "11 elements"}},
      {"convert dst int",
       [&] {
         Tensor d = rnd({3, 4}, kI32);
         ops::convert(d, a);
       },
       {"convert", "'dst'", "float"}},
      {"convert src int",
       [&] {
         ops::convert(out, rnd({3, 4}, kI32));
       },
       {"convert", "'src'", "float"}},
      {"convert src undefined",
       [&] { ops::convert(out, undefined); },
       {"convert", "'src'", "undefined"}},
      {"scale undefined", [&] { ops::scale_(undefined, 2.0f); }, {"scale_", "'x'", "undefined"}},
      {"scale int",
       [&] {
         Tensor x = rnd({3}, kI32);
         ops::scale_(x, 2.0f);
       },
       {"scale_", "'x'", "float"}},
      {"scale NaN", [&] { ops::scale_(out, kNaN); }, {"scale_", "alpha", "finite"}},
      {"scale Inf", [&] { ops::scale_(out, kInf); }, {"scale_", "alpha", "finite"}},
  });
}

TEST(OpsErrors, LayerNorm) {
  const Shape xs{2, 3, 5};
  Tensor x = rnd(xs), y = rnd(xs), w = rnd({5}), b = rnd({5}), mean = rnd({2, 3}),
         rstd = rnd({2, 3}), undefined;
  Tensor dx = rnd(xs), dy = rnd(xs), dw = rnd({5}), db = rnd({5});
  expect_valid([&] { ops::layernorm_forward(y, mean, rstd, x, w, b); }, "layernorm_forward");
  expect_valid([&] { ops::layernorm_backward(dx, dw, db, dy, x, w, mean, rstd, false); },
               "layernorm_backward");
  auto fwd = [&](Tensor& y_, Tensor& mean_, Tensor& rstd_, const Tensor& x_, const Tensor& w_,
                 const Tensor& b_,
                 float eps = 1e-5f) { ops::layernorm_forward(y_, mean_, rstd_, x_, w_, b_, eps); };
  expect_errors({
      {"x undefined",
       [&] { fwd(y, mean, rstd, undefined, w, b); },
       {"layernorm_forward", "'x'", "undefined"}},
      {"y undefined",
       [&] { fwd(undefined, mean, rstd, x, w, b); },
       {"layernorm_forward", "'y'", "undefined"}},
      {"x int",
       [&] {
         Tensor xi = rnd(xs, kI32);
         fwd(y, mean, rstd, xi, w, b);
       },
       {"layernorm_forward", "'x'", "float"}},
      {"x 0-d", [&] { fwd(y, mean, rstd, rnd({}), w, b); }, {"layernorm_forward", "x"}},
      {"y shape",
       [&] {
         Tensor o = rnd({2, 15});
         fwd(o, mean, rstd, x, w, b);
       },
       {"layernorm_forward", "'y'", "[2, 3, 5]"}},
      {"y dtype",
       [&] {
         Tensor o = rnd(xs, kBF16);
         fwd(o, mean, rstd, x, w, b);
       },
       {"layernorm_forward", "'y'", "fp32"}},
      {"weight shape",
       [&] { fwd(y, mean, rstd, x, rnd({6}), b); },
       {"layernorm_forward", "'weight'", "[5]"}},
      {"weight dtype",
       [&] { fwd(y, mean, rstd, x, rnd({5}, kBF16), b); },
       {"layernorm_forward", "'weight'", "fp32"}},
      {"bias dtype",
       [&] { fwd(y, mean, rstd, x, w, rnd({5}, kF16)); },
       {"layernorm_forward", "'bias'", "fp32"}},
      {"bias undefined",
       [&] { fwd(y, mean, rstd, x, w, undefined); },
       {"layernorm_forward", "'bias'", "undefined"}},
      {"mean numel",
       [&] {
         Tensor m = rnd({5});
         fwd(y, m, rstd, x, w, b);
       },
       {"layernorm_forward", "'mean'", "6 elements"}},
      {"rstd bf16",
       [&] {
         Tensor r = rnd({2, 3}, kBF16);
         fwd(y, mean, r, x, w, b);
       },
       {"layernorm_forward", "'rstd'", "fp32"}},
      {"eps 0", [&] { fwd(y, mean, rstd, x, w, b, 0.0f); }, {"layernorm_forward", "eps"}},
      {"eps negative", [&] { fwd(y, mean, rstd, x, w, b, -1e-5f); }, {"layernorm_forward", "eps"}},
      {"eps NaN", [&] { fwd(y, mean, rstd, x, w, b, kNaN); }, {"layernorm_forward", "eps"}},
      {"eps Inf", [&] { fwd(y, mean, rstd, x, w, b, kInf); }, {"layernorm_forward", "eps"}},
      {"bwd dx shape",
       [&] {
         Tensor d = rnd({2, 15});
         ops::layernorm_backward(d, dw, db, dy, x, w, mean, rstd, false);
       },
       {"layernorm_backward", "'dx'", "[2, 3, 5]"}},
      {"bwd dy dtype",
       [&] { ops::layernorm_backward(dx, dw, db, rnd(xs, kBF16), x, w, mean, rstd, false); },
       {"layernorm_backward", "'dy'", "fp32"}},
      {"bwd dweight bf16",
       [&] {
         Tensor d = rnd({5}, kBF16);
         ops::layernorm_backward(dx, d, db, dy, x, w, mean, rstd, false);
       },
       {"layernorm_backward", "'dweight'", "fp32"}},
      {"bwd dbias shape",
       [&] {
         Tensor d = rnd({6});
         ops::layernorm_backward(dx, dw, d, dy, x, w, mean, rstd, false);
       },
       {"layernorm_backward", "'dbias'", "[5]"}},
      {"bwd weight shape",
       [&] { ops::layernorm_backward(dx, dw, db, dy, x, rnd({4}), mean, rstd, false); },
       {"layernorm_backward", "'weight'", "[5]"}},
      {"bwd rstd numel",
       [&] { ops::layernorm_backward(dx, dw, db, dy, x, w, mean, rnd({7}), false); },
       {"layernorm_backward", "'rstd'", "6 elements"}},
      {"bwd mean undefined",
       [&] { ops::layernorm_backward(dx, dw, db, dy, x, w, undefined, rstd, false); },
       {"layernorm_backward", "'mean'", "undefined"}},
      {"bwd x undefined",
       [&] { ops::layernorm_backward(dx, dw, db, dy, undefined, w, mean, rstd, false); },
       {"layernorm_backward", "'x'", "undefined"}},
      {"bwd x int",
       [&] {
         Tensor xi = rnd(xs, kI32);
         ops::layernorm_backward(dx, dw, db, dy, xi, w, mean, rstd, false);
       },
       {"layernorm_backward", "'x'", "float"}},
      {"bwd x 0-d",
       [&] { ops::layernorm_backward(dx, dw, db, dy, rnd({}), w, mean, rstd, false); },
       {"layernorm_backward", "x"}},
  });
}

TEST(OpsErrors, Attention) {
  // B=2, T=3, C=6 with 2 heads of 3.
  Tensor qkv = rnd({2, 3, 18}), out = rnd({2, 3, 6}), lse = rnd({2, 2, 3}), undefined;
  Tensor dqkv = rnd({2, 3, 18}), dout = rnd({2, 3, 6});
  expect_valid([&] { ops::attention_forward(out, lse, qkv, 2); }, "attention_forward");
  expect_valid([&] { ops::attention_backward(dqkv, dout, qkv, out, lse, 2); },
               "attention_backward");
  Tensor step_qkv = rnd({2, 18}), step_out = rnd({2, 6}), k_cache = rnd({2, 4, 6}),
         v_cache = rnd({2, 4, 6});
  expect_valid([&] { ops::attention_decode(step_out, k_cache, v_cache, step_qkv, 3, 2); },
               "attention_decode");
  auto fwd = [&](Tensor& o, Tensor& l, const Tensor& q, int h) {
    ops::attention_forward(o, l, q, h);
  };
  auto decode = [&](Tensor& o, Tensor& k, Tensor& v, const Tensor& q, int pos, int h) {
    ops::attention_decode(o, k, v, q, pos, h);
  };
  expect_errors({
      {"qkv undefined",
       [&] { fwd(out, lse, undefined, 2); },
       {"attention_forward", "'qkv'", "undefined"}},
      {"qkv 2-D",
       [&] {
         fwd(out, lse, rnd({6, 18}), 2);
       },
       {"attention_forward", "qkv must be"}},
      {"qkv int",
       [&] {
         fwd(out, lse, rnd({2, 3, 18}, kI32), 2);
       },
       {"attention_forward", "'qkv'", "float"}},
      {"n_head 0", [&] { fwd(out, lse, qkv, 0); }, {"attention_forward", "n_head"}},
      {"n_head -1", [&] { fwd(out, lse, qkv, -1); }, {"attention_forward", "n_head"}},
      {"n_head does not divide",
       [&] { fwd(out, lse, qkv, 4); },
       {"attention_forward", "n_head (4)"}},
      {"width not 3C",
       [&] {
         fwd(out, lse, rnd({2, 3, 16}), 1);
       },
       {"attention_forward", "qkv's last dimension 16"}},
      {"out shape",
       [&] {
         Tensor o = rnd({2, 3, 18});
         fwd(o, lse, qkv, 2);
       },
       {"attention_forward", "'out'", "[2, 3, 6]"}},
      {"out dtype",
       [&] {
         Tensor o = rnd({2, 3, 6}, kBF16);
         fwd(o, lse, qkv, 2);
       },
       {"attention_forward", "'out'", "fp32"}},
      {"lse shape",
       [&] {
         Tensor l = rnd({2, 3, 2});
         fwd(out, l, qkv, 2);
       },
       {"attention_forward", "'lse'", "[2, 2, 3]"}},
      {"lse dtype",
       [&] {
         Tensor l = rnd({2, 2, 3}, kBF16);
         fwd(out, l, qkv, 2);
       },
       {"attention_forward", "'lse'", "fp32"}},
      {"lse undefined",
       [&] { fwd(out, undefined, qkv, 2); },
       {"attention_forward", "'lse'", "undefined"}},
      {"bwd dqkv shape",
       [&] {
         Tensor d = rnd({2, 3, 6});
         ops::attention_backward(d, dout, qkv, out, lse, 2);
       },
       {"attention_backward", "'dqkv'", "[2, 3, 18]"}},
      {"bwd dqkv dtype",
       [&] {
         Tensor d = rnd({2, 3, 18}, kF16);
         ops::attention_backward(d, dout, qkv, out, lse, 2);
       },
       {"attention_backward", "'dqkv'", "fp32"}},
      {"bwd dout shape",
       [&] {
         ops::attention_backward(dqkv, rnd({2, 3, 7}), qkv, out, lse, 2);
       },
       {"attention_backward", "'dout'", "[2, 3, 6]"}},
      {"bwd dout undefined",
       [&] { ops::attention_backward(dqkv, undefined, qkv, out, lse, 2); },
       {"attention_backward", "'dout'", "undefined"}},
      {"bwd lse dtype",
       [&] {
         ops::attention_backward(dqkv, dout, qkv, out, rnd({2, 2, 3}, kBF16), 2);
       },
       {"attention_backward", "'lse'", "fp32"}},
      {"bwd n_head",
       [&] { ops::attention_backward(dqkv, dout, qkv, out, lse, 0); },
       {"attention_backward", "n_head"}},
      {"decode qkv 3-D",
       [&] { decode(step_out, k_cache, v_cache, qkv, 1, 2); },
       {"attention_decode", "qkv must be [B, 3C]"}},
      {"decode qkv undefined",
       [&] { decode(step_out, k_cache, v_cache, undefined, 1, 2); },
       {"attention_decode", "'qkv'", "undefined"}},
      {"decode n_head",
       [&] { decode(step_out, k_cache, v_cache, step_qkv, 1, 0); },
       {"attention_decode", "n_head"}},
      {"decode n_head does not divide",
       [&] { decode(step_out, k_cache, v_cache, step_qkv, 1, 4); },
       {"attention_decode", "n_head (4)"}},
      {"decode out shape",
       [&] {
         Tensor o = rnd({2, 18});
         decode(o, k_cache, v_cache, step_qkv, 1, 2);
       },
       {"attention_decode", "'out'", "[2, 6]"}},
      {"decode k_cache shape",
       [&] {
         Tensor k = rnd({2, 4, 7});
         decode(step_out, k, v_cache, step_qkv, 1, 2);
       },
       {"attention_decode", "k_cache must be [2, T_max, 6]"}},
      {"decode v_cache shape",
       [&] {
         Tensor v = rnd({2, 5, 6});
         decode(step_out, k_cache, v, step_qkv, 1, 2);
       },
       {"attention_decode", "'v_cache'", "[2, 4, 6]"}},
      {"decode v_cache dtype",
       [&] {
         Tensor v = rnd({2, 4, 6}, kBF16);
         decode(step_out, k_cache, v, step_qkv, 1, 2);
       },
       {"attention_decode", "'v_cache'", "fp32"}},
      {"decode pos negative",
       [&] { decode(step_out, k_cache, v_cache, step_qkv, -1, 2); },
       {"attention_decode", "position -1", "cache of 4"}},
      {"decode pos past the cache",
       [&] { decode(step_out, k_cache, v_cache, step_qkv, 4, 2); },
       {"attention_decode", "position 4", "cache of 4"}},
  });
}

TEST(OpsErrors, RMSNorm) {
  const Shape xs{2, 3, 5};
  Tensor x = rnd(xs), y = rnd(xs), w = rnd({5}), rstd = rnd({2, 3}), undefined;
  Tensor dx = rnd(xs), dy = rnd(xs), dw = rnd({5});
  Tensor a = rnd(xs), b = rnd(xs), s = rnd(xs);
  expect_valid([&] { ops::rmsnorm_forward(y, rstd, x, w); }, "rmsnorm_forward");
  expect_valid([&] { ops::residual_rmsnorm_forward(s, y, rstd, a, b, w); },
               "residual_rmsnorm_forward");
  expect_valid([&] { ops::residual_rmsnorm_forward(a, y, rstd, a, b, w); },
               "residual_rmsnorm_forward in place");
  expect_valid([&] { ops::rmsnorm_backward(dx, dw, dy, x, w, rstd, true); }, "rmsnorm_backward");
  expect_errors({
      {"x undefined",
       [&] { ops::rmsnorm_forward(y, rstd, undefined, w); },
       {"rmsnorm_forward", "'x'", "undefined"}},
      {"x int",
       [&] { ops::rmsnorm_forward(y, rstd, rnd(xs, kI32), w); },
       {"rmsnorm_forward", "'x'", "float"}},
      {"x 0-d", [&] { ops::rmsnorm_forward(y, rstd, rnd({}), w); }, {"rmsnorm_forward", "x"}},
      {"y shape",
       [&] {
         Tensor o = rnd({2, 15});
         ops::rmsnorm_forward(o, rstd, x, w);
       },
       {"rmsnorm_forward", "'y'", "[2, 3, 5]"}},
      {"y dtype",
       [&] {
         Tensor o = rnd(xs, kBF16);
         ops::rmsnorm_forward(o, rstd, x, w);
       },
       {"rmsnorm_forward", "'y'", "fp32"}},
      {"weight shape",
       [&] { ops::rmsnorm_forward(y, rstd, x, rnd({6})); },
       {"rmsnorm_forward", "'weight'", "[5]"}},
      {"weight dtype",
       [&] { ops::rmsnorm_forward(y, rstd, x, rnd({5}, kBF16)); },
       {"rmsnorm_forward", "'weight'", "fp32"}},
      {"rstd numel",
       [&] {
         Tensor r = rnd({5});
         ops::rmsnorm_forward(y, r, x, w);
       },
       {"rmsnorm_forward", "'rstd'", "6 elements"}},
      {"rstd bf16",
       [&] {
         Tensor r = rnd({2, 3}, kBF16);
         ops::rmsnorm_forward(y, r, x, w);
       },
       {"rmsnorm_forward", "'rstd'", "fp32"}},
      {"rstd undefined",
       [&] { ops::rmsnorm_forward(y, undefined, x, w); },
       {"rmsnorm_forward", "'rstd'", "undefined"}},
      {"eps 0", [&] { ops::rmsnorm_forward(y, rstd, x, w, 0.0f); }, {"rmsnorm_forward", "eps"}},
      {"eps NaN", [&] { ops::rmsnorm_forward(y, rstd, x, w, kNaN); }, {"rmsnorm_forward", "eps"}},
      {"residual b shape",
       [&] {
         ops::residual_rmsnorm_forward(s, y, rstd, a, rnd({2, 3, 4}), w);
       },
       {"residual_rmsnorm_forward", "'b'"}},
      {"residual sum dtype",
       [&] {
         Tensor sb = rnd(xs, kBF16);
         ops::residual_rmsnorm_forward(sb, y, rstd, a, b, w);
       },
       {"residual_rmsnorm_forward", "'sum'", "fp32"}},
      {"residual y aliases sum",
       [&] { ops::residual_rmsnorm_forward(s, s, rstd, a, b, w); },
       {"residual_rmsnorm_forward", "y must not alias"}},
      {"residual y aliases a",
       [&] { ops::residual_rmsnorm_forward(s, a, rstd, a, b, w); },
       {"residual_rmsnorm_forward", "y must not alias"}},
      {"residual eps Inf",
       [&] { ops::residual_rmsnorm_forward(s, y, rstd, a, b, w, kInf); },
       {"residual_rmsnorm_forward", "eps"}},
      {"residual weight dtype",
       [&] { ops::residual_rmsnorm_forward(s, y, rstd, a, b, rnd({5}, kF16)); },
       {"residual_rmsnorm_forward", "'weight'"}},
      {"bwd dx shape",
       [&] {
         Tensor d = rnd({2, 15});
         ops::rmsnorm_backward(d, dw, dy, x, w, rstd, false);
       },
       {"rmsnorm_backward", "'dx'", "[2, 3, 5]"}},
      {"bwd dy dtype",
       [&] { ops::rmsnorm_backward(dx, dw, rnd(xs, kBF16), x, w, rstd, false); },
       {"rmsnorm_backward", "'dy'", "fp32"}},
      {"bwd dweight bf16",
       [&] {
         Tensor d = rnd({5}, kBF16);
         ops::rmsnorm_backward(dx, d, dy, x, w, rstd, false);
       },
       {"rmsnorm_backward", "'dweight'", "fp32"}},
      {"bwd dweight shape",
       [&] {
         Tensor d = rnd({6});
         ops::rmsnorm_backward(dx, d, dy, x, w, rstd, false);
       },
       {"rmsnorm_backward", "'dweight'", "[5]"}},
      {"bwd rstd numel",
       [&] { ops::rmsnorm_backward(dx, dw, dy, x, w, rnd({7}), false); },
       {"rmsnorm_backward", "'rstd'", "6 elements"}},
      {"bwd weight undefined",
       [&] { ops::rmsnorm_backward(dx, dw, dy, x, undefined, rstd, false); },
       {"rmsnorm_backward", "'weight'", "undefined"}},
  });
}

TEST(OpsErrors, SwiGLU) {
  Tensor x = rnd({2, 3, 8}), y = rnd({2, 3, 4}), dy = rnd({2, 3, 4}), dx = rnd({2, 3, 8}),
         undefined;
  expect_valid([&] { ops::swiglu_forward(y, x); }, "swiglu_forward");
  expect_valid([&] { ops::swiglu_backward(dx, dy, x); }, "swiglu_backward");
  expect_valid([&] { ops::swiglu_backward(x, dy, x); }, "swiglu_backward in place");
  expect_errors({
      {"x undefined",
       [&] { ops::swiglu_forward(y, undefined); },
       {"swiglu_forward", "'x'", "undefined"}},
      {"x int",
       [&] {
         ops::swiglu_forward(y, rnd({2, 3, 8}, kI32));
       },
       {"swiglu_forward", "float"}},
      {"x odd width",
       [&] {
         ops::swiglu_forward(y, rnd({2, 3, 7}));
       },
       {"swiglu_forward", "'x'", "[2, 3, 7]", "even"}},
      {"x 0-d", [&] { ops::swiglu_forward(y, rnd({})); }, {"swiglu_forward", "'x'"}},
      {"y shape",
       [&] {
         Tensor o = rnd({2, 3, 8});
         ops::swiglu_forward(o, x);
       },
       {"swiglu_forward", "'y'", "[2, 3, 4]"}},
      {"y dtype",
       [&] {
         Tensor o = rnd({2, 3, 4}, kBF16);
         ops::swiglu_forward(o, x);
       },
       {"swiglu_forward", "'y'", "fp32"}},
      {"y undefined",
       [&] { ops::swiglu_forward(undefined, x); },
       {"swiglu_forward", "'y'", "undefined"}},
      {"bwd dy shape",
       [&] {
         ops::swiglu_backward(dx, rnd({2, 3, 8}), x);
       },
       {"swiglu_backward", "'dy'", "[2, 3, 4]"}},
      {"bwd dx shape",
       [&] {
         Tensor d = rnd({2, 3, 4});
         ops::swiglu_backward(d, dy, x);
       },
       {"swiglu_backward", "'dx'", "[2, 3, 8]"}},
      {"bwd dx dtype",
       [&] {
         Tensor d = rnd({2, 3, 8}, kF16);
         ops::swiglu_backward(d, dy, x);
       },
       {"swiglu_backward", "'dx'", "fp32"}},
  });
}

TEST(OpsErrors, Rope) {
  // B=2, T=3, n_head 4, n_kv_head 2, D 4: rows of (4 + 2 * 2) * 4 = 32.
  Tensor x = rnd({2, 3, 32}), y = rnd({2, 3, 32}), table = rnd({6, 4}), undefined;
  Tensor step = rnd({2, 32}), step_y = rnd({2, 32});
  expect_valid([&] { ops::rope_forward(y, x, table, 4, 2, 3); }, "rope_forward");
  expect_valid([&] { ops::rope_forward(x, x, table, 4, 2); }, "rope_forward in place");
  expect_valid([&] { ops::rope_forward(step_y, step, table, 4, 2, 5); }, "rope_forward one token");
  expect_valid([&] { ops::rope_backward(y, x, table, 4, 2, 1); }, "rope_backward");
  ops::RopeConfig llama3;
  llama3.theta = 500000.0;
  llama3.scaling = ops::RopeConfig::Scaling::kLlama3;
  llama3.factor = 8.0;
  expect_valid([&] { ops::rope_table(table, llama3); }, "rope_table");
  auto with = [&](auto change) {
    ops::RopeConfig c = llama3;
    change(c);
    return c;
  };
  expect_errors({
      {"x undefined",
       [&] { ops::rope_forward(y, undefined, table, 4, 2); },
       {"rope_forward", "'x'", "undefined"}},
      {"x int",
       [&] {
         ops::rope_forward(y, rnd({2, 3, 32}, kI32), table, 4, 2);
       },
       {"rope_forward", "'x'", "float"}},
      {"x 4-D",
       [&] {
         Tensor x4 = rnd({2, 3, 1, 32}), y4 = rnd({2, 3, 1, 32});
         ops::rope_forward(y4, x4, table, 4, 2);
       },
       {"rope_forward", "'x'", "[B, T, (n_head + 2 n_kv_head) D]"}},
      {"x width",
       [&] {
         Tensor x2 = rnd({2, 3, 24}), y2 = rnd({2, 3, 24});
         ops::rope_forward(y2, x2, table, 4, 2);
       },
       {"rope_forward", "(n_head (4) + 2 x n_kv_head (2)) x head_dim (4) = 32"}},
      {"n_kv_head does not divide",
       [&] { ops::rope_forward(y, x, table, 4, 3); },
       {"rope_forward", "n_kv_head (3)", "n_head (4)"}},
      {"n_kv_head 0", [&] { ops::rope_forward(y, x, table, 4, 0); }, {"rope_forward", "n_kv_head"}},
      {"y shape",
       [&] {
         Tensor o = rnd({2, 3, 16});
         ops::rope_forward(o, x, table, 4, 2);
       },
       {"rope_forward", "'y'", "[2, 3, 32]"}},
      {"y dtype",
       [&] {
         Tensor o = rnd({2, 3, 32}, kBF16);
         ops::rope_forward(o, x, table, 4, 2);
       },
       {"rope_forward", "'y'", "fp32"}},
      {"table bf16",
       [&] {
         ops::rope_forward(y, x, rnd({6, 4}, kBF16), 4, 2);
       },
       {"rope_forward", "'table'", "fp32"}},
      {"table odd head_dim",
       [&] {
         ops::rope_forward(y, x, rnd({6, 3}), 4, 2);
       },
       {"rope_forward", "table must be [max_position, head_dim]"}},
      {"table undefined",
       [&] { ops::rope_forward(y, x, undefined, 4, 2); },
       {"rope_forward", "'table'", "undefined"}},
      {"positions past the table",
       [&] { ops::rope_forward(y, x, table, 4, 2, 4); },
       {"rope_forward", "positions 4 to 6", "table's 6 positions"}},
      {"negative pos0",
       [&] { ops::rope_forward(y, x, table, 4, 2, -1); },
       {"rope_forward", "positions -1"}},
      {"bwd dy width",
       [&] {
         Tensor d = rnd({2, 3, 28}), o = rnd({2, 3, 28});
         ops::rope_backward(o, d, table, 4, 2);
       },
       {"rope_backward", "'dy'", "= 32"}},
      {"bwd dx shape",
       [&] {
         Tensor o = rnd({2, 32});
         ops::rope_backward(o, x, table, 4, 2);
       },
       {"rope_backward", "'dx'", "[2, 3, 32]"}},
      {"table_for bf16 table",
       [&] {
         Tensor t = rnd({6, 4}, kBF16);
         ops::rope_table(t, llama3);
       },
       {"rope_table", "'table'", "fp32"}},
      {"table_for odd head_dim",
       [&] {
         Tensor t = rnd({6, 5});
         ops::rope_table(t, llama3);
       },
       {"rope_table", "even head_dim"}},
      {"inv_freq odd head_dim",
       [&] { ops::rope_inv_freq(7, llama3); },
       {"rope_inv_freq", "head_dim", "7"}},
      {"theta 1",
       [&] { ops::rope_inv_freq(8, with([](ops::RopeConfig& c) { c.theta = 1.0; })); },
       {"rope_inv_freq", "rope_theta"}},
      {"theta NaN",
       [&] { ops::rope_inv_freq(8, with([](ops::RopeConfig& c) { c.theta = kNaN; })); },
       {"rope_inv_freq", "rope_theta"}},
      {"factor below 1",
       [&] { ops::rope_inv_freq(8, with([](ops::RopeConfig& c) { c.factor = 0.5; })); },
       {"rope_inv_freq", "factor", "0.5"}},
      {"low >= high",
       [&] { ops::rope_inv_freq(8, with([](ops::RopeConfig& c) { c.high_freq_factor = 1.0; })); },
       {"rope_inv_freq", "low_freq_factor < high_freq_factor"}},
      {"original_max_position 0",
       [&] {
         ops::rope_inv_freq(8, with([](ops::RopeConfig& c) { c.original_max_position = 0; }));
       },
       {"rope_inv_freq", "original_max_position_embeddings"}},
  });
}

TEST(OpsErrors, GroupedQueryAttention) {
  // B=2, T=3, n_head 4, n_kv_head 2, D 3: qkv rows of (4 + 2 * 2) * 3 = 24, out rows of 12.
  Tensor qkv = rnd({2, 3, 24}), out = rnd({2, 3, 12}), lse = rnd({2, 4, 3}), undefined;
  Tensor dqkv = rnd({2, 3, 24}), dout = rnd({2, 3, 12});
  expect_valid([&] { ops::attention_forward(out, lse, qkv, 4, 2); }, "attention_forward (GQA)");
  expect_valid([&] { ops::attention_backward(dqkv, dout, qkv, out, lse, 4, 2); },
               "attention_backward (GQA)");
  Tensor step_qkv = rnd({2, 24}), step_out = rnd({2, 12}), k_cache = rnd({2, 4, 6}),
         v_cache = rnd({2, 4, 6});
  expect_valid([&] { ops::attention_decode(step_out, k_cache, v_cache, step_qkv, 3, 4, 2); },
               "attention_decode (GQA)");
  expect_errors({
      {"n_kv_head 0",
       [&] { ops::attention_forward(out, lse, qkv, 4, 0); },
       {"attention_forward", "n_kv_head (0)"}},
      {"n_kv_head does not divide",
       [&] { ops::attention_forward(out, lse, qkv, 4, 3); },
       {"attention_forward", "n_kv_head (3)", "divide n_head (4)"}},
      {"n_kv_head above n_head",
       [&] { ops::attention_forward(out, lse, qkv, 2, 4); },
       {"attention_forward", "n_kv_head (4)"}},
      {"width",
       [&] {
         Tensor q = rnd({2, 3, 26});
         ops::attention_forward(out, lse, q, 4, 2);
       },
       {"attention_forward", "qkv's last dimension 26", "n_kv_head (2)"}},
      {"qkv 2-D",
       [&] {
         ops::attention_forward(out, lse, rnd({6, 24}), 4, 2);
       },
       {"attention_forward", "[B, T, (n_head + 2 n_kv_head) D]"}},
      {"out shape (n_kv_head heads)",
       [&] {
         Tensor o = rnd({2, 3, 6});
         ops::attention_forward(o, lse, qkv, 4, 2);
       },
       {"attention_forward", "'out'", "[2, 3, 12]"}},
      {"lse shape",
       [&] {
         Tensor l = rnd({2, 2, 3});
         ops::attention_forward(out, l, qkv, 4, 2);
       },
       {"attention_forward", "'lse'", "[2, 4, 3]"}},
      {"bwd dqkv shape",
       [&] {
         Tensor d = rnd({2, 3, 36});
         ops::attention_backward(d, dout, qkv, out, lse, 4, 2);
       },
       {"attention_backward", "'dqkv'", "[2, 3, 24]"}},
      {"bwd n_kv_head",
       [&] { ops::attention_backward(dqkv, dout, qkv, out, lse, 4, 3); },
       {"attention_backward", "n_kv_head (3)"}},
      {"decode cache of every head",
       [&] {
         Tensor k = rnd({2, 4, 12}), v = rnd({2, 4, 12});
         ops::attention_decode(step_out, k, v, step_qkv, 1, 4, 2);
       },
       {"attention_decode", "k_cache must be [2, T_max, 6]"}},
      {"decode qkv 3-D",
       [&] { ops::attention_decode(step_out, k_cache, v_cache, qkv, 1, 4, 2); },
       {"attention_decode", "[B, (n_head + 2 n_kv_head) D]"}},
      {"decode n_kv_head",
       [&] { ops::attention_decode(step_out, k_cache, v_cache, step_qkv, 1, 4, 3); },
       {"attention_decode", "n_kv_head (3)"}},
      {"decode out shape",
       [&] {
         Tensor o = rnd({2, 6});
         ops::attention_decode(o, k_cache, v_cache, step_qkv, 1, 4, 2);
       },
       {"attention_decode", "'out'", "[2, 12]"}},
  });
}

TEST(OpsErrors, Embedding) {
  // V=7, C=4, B=2, T=3, T_max=5.
  Tensor tokens = ints({0, 6, 3, 3, 1, 2}, {2, 3}), wte = rnd({7, 4}), wpe = rnd({5, 4});
  Tensor out = rnd({2, 3, 4}), dwte = rnd({7, 4}), dwpe = rnd({5, 4}), dout = rnd({2, 3, 4});
  Tensor undefined;
  expect_valid([&] { ops::embedding_forward(out, tokens, wte, wpe); }, "embedding_forward");
  expect_valid([&] { ops::embedding_forward(out, tokens, wte, undefined); }, "embedding_forward");
  expect_valid([&] { ops::embedding_backward(dwte, dwpe, dout, tokens); }, "embedding_backward");
  Tensor too_big = ints({0, 6, 3, 3, 7, 2}, {2, 3}), negative = ints({0, 6, -2, 3, 1, 2}, {2, 3});
  expect_errors({
      {"token >= V",
       [&] { ops::embedding_forward(out, too_big, wte, wpe); },
       {"embedding_forward", "token id 7", "batch 1, time 1", "vocabulary of 7"}},
      {"token negative",
       [&] { ops::embedding_forward(out, negative, wte, wpe); },
       {"embedding_forward", "token id -2", "batch 0, time 2", "negative"}},
      {"tokens float",
       [&] {
         ops::embedding_forward(out, rnd({2, 3}), wte, wpe);
       },
       {"embedding_forward", "'tokens'", "int32"}},
      {"tokens 1-D",
       [&] {
         ops::embedding_forward(out, ints({1, 2}, {2}), wte, wpe);
       },
       {"embedding_forward", "tokens must be [B, T]"}},
      {"tokens undefined",
       [&] { ops::embedding_forward(out, undefined, wte, wpe); },
       {"embedding_forward", "'tokens'", "undefined"}},
      {"wte undefined",
       [&] { ops::embedding_forward(out, tokens, undefined, wpe); },
       {"embedding_forward", "'wte'", "undefined"}},
      {"wte 1-D",
       [&] { ops::embedding_forward(out, tokens, rnd({7}), wpe); },
       {"embedding_forward", "wte must be [V, C]"}},
      {"wte int",
       [&] {
         ops::embedding_forward(out, tokens, rnd({7, 4}, kI32), wpe);
       },
       {"embedding_forward", "'wte'", "float"}},
      {"out shape",
       [&] {
         Tensor o = rnd({2, 3, 5});
         ops::embedding_forward(o, tokens, wte, wpe);
       },
       {"embedding_forward", "'out'", "[2, 3, 4]"}},
      {"out dtype",
       [&] {
         Tensor o = rnd({2, 3, 4}, kBF16);
         ops::embedding_forward(o, tokens, wte, wpe);
       },
       {"embedding_forward", "'out'", "fp32"}},
      {"wpe width",
       [&] {
         ops::embedding_forward(out, tokens, wte, rnd({5, 3}));
       },
       {"embedding_forward", "wpe must be [T_max, 4]"}},
      {"wpe dtype",
       [&] {
         ops::embedding_forward(out, tokens, wte, rnd({5, 4}, kBF16));
       },
       {"embedding_forward", "'wpe'", "fp32"}},
      {"T > T_max",
       [&] {
         ops::embedding_forward(out, tokens, wte, rnd({2, 4}));
       },
       {"embedding_forward", "sequence length 3", "2 positions of wpe"}},
      {"bwd token >= V",
       [&] { ops::embedding_backward(dwte, dwpe, dout, too_big); },
       {"embedding_backward", "token id 7", "batch 1, time 1"}},
      {"bwd token negative",
       [&] { ops::embedding_backward(dwte, dwpe, dout, negative); },
       {"embedding_backward", "token id -2", "negative"}},
      {"bwd dwte bf16",
       [&] {
         Tensor d = rnd({7, 4}, kBF16);
         ops::embedding_backward(d, dwpe, dout, tokens);
       },
       {"embedding_backward", "'dwte'", "fp32"}},
      {"bwd dwte undefined",
       [&] { ops::embedding_backward(undefined, dwpe, dout, tokens); },
       {"embedding_backward", "'dwte'", "undefined"}},
      {"bwd dout shape",
       [&] {
         ops::embedding_backward(dwte, dwpe, rnd({2, 3, 5}), tokens);
       },
       {"embedding_backward", "'dout'", "[2, 3, 4]"}},
      {"bwd dout int",
       [&] {
         ops::embedding_backward(dwte, dwpe, rnd({2, 3, 4}, kI32), tokens);
       },
       {"embedding_backward", "'dout'", "float"}},
      {"bwd dwpe short",
       [&] {
         Tensor d = rnd({2, 4});
         ops::embedding_backward(dwte, d, dout, tokens);
       },
       {"embedding_backward", "dwpe must be [T_max >= 3, 4]"}},
      {"bwd dwpe bf16",
       [&] {
         Tensor d = rnd({5, 4}, kBF16);
         ops::embedding_backward(dwte, d, dout, tokens);
       },
       {"embedding_backward", "'dwpe'", "fp32"}},
  });
}

TEST(OpsErrors, FusedOps) {
  Tensor x = rnd({2, 3, 8}), w = rnd({16, 8}), bias = rnd({16}), pre = rnd({2, 3, 16}),
         y = rnd({2, 3, 16}), undefined;
  expect_valid([&] { ops::linear_gelu_forward(pre, y, x, w, &bias); }, "linear_gelu_forward");
  Tensor a = rnd({4, 8}), b = rnd({4, 8}), s = rnd({4, 8}), ln = rnd({4, 8}), g = rnd({8}),
         beta = rnd({8}), mean = rnd({4}), rstd = rnd({4});
  expect_valid([&] { ops::residual_layernorm_forward(s, ln, mean, rstd, a, b, g, beta); },
               "residual_layernorm_forward");
  expect_valid([&] { ops::residual_layernorm_forward(a, ln, mean, rstd, a, b, g, beta); },
               "residual_layernorm_forward in place");
  expect_errors({
      {"pre shape",
       [&] {
         Tensor p = rnd({2, 3, 8});
         ops::linear_gelu_forward(p, y, x, w, &bias);
       },
       {"linear_gelu_forward", "'pre'"}},
      {"y dtype",
       [&] {
         Tensor yy = rnd({2, 3, 16}, kBF16);
         ops::linear_gelu_forward(pre, yy, x, w, &bias);
       },
       {"linear_gelu_forward", "'y'"}},
      {"pre is y",
       [&] { ops::linear_gelu_forward(y, y, x, w, &bias); },
       {"linear_gelu_forward", "different buffers"}},
      {"bias shape",
       [&] {
         Tensor bb = rnd({8});
         ops::linear_gelu_forward(pre, y, x, w, &bb);
       },
       {"linear_gelu_forward", "'bias'"}},
      {"w in features",
       [&] {
         Tensor ww = rnd({16, 9});
         ops::linear_gelu_forward(pre, y, x, ww, &bias);
       },
       {"linear_gelu_forward", "'w'"}},
      {"residual b shape",
       [&] {
         Tensor bb = rnd({4, 7});
         ops::residual_layernorm_forward(s, ln, mean, rstd, a, bb, g, beta);
       },
       {"residual_layernorm_forward", "'b'"}},
      {"residual y aliases sum",
       [&] { ops::residual_layernorm_forward(s, s, mean, rstd, a, b, g, beta); },
       {"residual_layernorm_forward", "y must not alias"}},
      {"residual mean numel",
       [&] {
         Tensor m = rnd({3});
         ops::residual_layernorm_forward(s, ln, m, rstd, a, b, g, beta);
       },
       {"residual_layernorm_forward", "'mean'"}},
      {"residual a undefined",
       [&] { ops::residual_layernorm_forward(s, ln, mean, rstd, undefined, b, g, beta); },
       {"residual_layernorm_forward", "'a'", "undefined"}},
  });
}

TEST(OpsErrors, VocabParallelLoss) {
  Tensor parts = rnd({2, 2, 3}), owner = ints({0, 1, -1}, {3}), losses = rnd({3}), lse = rnd({3});
  expect_valid([&] { ops::cross_entropy_combine(losses, lse, parts, owner); },
               "cross_entropy_combine");
  Tensor logits = rnd({3, 8}), dlogits = rnd({3, 8}), targets = ints({4, -1, -2}, {3});
  expect_valid([&] { ops::cross_entropy_backward_split(dlogits, logits, lse, targets, 5, 0.5f); },
               "cross_entropy_backward_split");
  expect_errors({
      {"parts 2-D",
       [&] {
         ops::cross_entropy_combine(losses, lse, rnd({2, 3}), owner);
       },
       {"cross_entropy_combine", "[K, 2, N]"}},
      {"owner beyond the ranks",
       [&] {
         ops::cross_entropy_combine(losses, lse, parts, ints({0, 2, -1}, {3}));
       },
       {"cross_entropy_combine", "owner 2 at row 1", "2 ranks"}},
      {"owner float",
       [&] { ops::cross_entropy_combine(losses, lse, parts, rnd({3})); },
       {"cross_entropy_combine", "'owner'", "int32"}},
      {"losses numel",
       [&] {
         Tensor l = rnd({4});
         ops::cross_entropy_combine(l, lse, parts, owner);
       },
       {"cross_entropy_combine", "'losses'", "3 elements"}},
      {"split target >= valid",
       [&] {
         ops::cross_entropy_backward_split(dlogits, logits, lse, ints({5, -1, 0}, {3}), 5, 1.0f);
       },
       {"cross_entropy_backward_split", "row 0 holds 5"}},
      {"split target below -2",
       [&] {
         ops::cross_entropy_backward_split(dlogits, logits, lse, ints({1, -3, 0}, {3}), 5, 1.0f);
       },
       {"cross_entropy_backward_split", "row 1 holds -3"}},
      {"split valid above the width",
       [&] { ops::cross_entropy_backward_split(dlogits, logits, lse, targets, 9, 1.0f); },
       {"cross_entropy_backward_split", "valid 9", "[0, 8]"}},
      {"split dloss",
       [&] {
         ops::cross_entropy_backward_split(dlogits, logits, lse, targets, 5,
                                           std::numeric_limits<float>::infinity());
       },
       {"cross_entropy_backward_split", "finite"}},
  });
}

TEST(OpsErrors, CrossEntropy) {
  // N=3 rows, vocab 5 padded to 8.
  Tensor logits = rnd({3, 8}), targets = ints({4, -1, 0}, {3}), losses = rnd({3}), lse = rnd({3});
  Tensor dlogits = rnd({3, 8}), undefined;
  expect_valid([&] { ops::cross_entropy_forward(losses, lse, logits, targets, 5); },
               "cross_entropy_forward");
  expect_valid([&] { ops::cross_entropy_backward(dlogits, logits, lse, targets, 5, 0.5f); },
               "cross_entropy_backward");
  auto fwd = [&](Tensor& l, Tensor& s, const Tensor& z, const Tensor& t, int vocab) {
    ops::cross_entropy_forward(l, s, z, t, vocab);
  };
  auto bwd = [&](Tensor& d, const Tensor& z, const Tensor& s, const Tensor& t, int vocab,
                 float dloss) { ops::cross_entropy_backward(d, z, s, t, vocab, dloss); };
  expect_errors({
      {"target >= vocab",
       [&] {
         fwd(losses, lse, logits, ints({4, 5, 0}, {3}), 5);
       },
       {"cross_entropy_forward", "target 5 at row 1", "vocabulary of 5"}},
      {"target in the padding",
       [&] {
         fwd(losses, lse, logits, ints({7, 1, 0}, {3}), 5);
       },
       {"cross_entropy_forward", "target 7 at row 0"}},
      {"vocab 0",
       [&] { fwd(losses, lse, logits, targets, 0); },
       {"cross_entropy_forward", "vocab 0", "[1, 8]"}},
      {"vocab > padded",
       [&] { fwd(losses, lse, logits, targets, 9); },
       {"cross_entropy_forward", "vocab 9", "[1, 8]"}},
      {"logits 1-D",
       [&] { fwd(losses, lse, rnd({8}), targets, 5); },
       {"cross_entropy_forward", "logits must be [N, V_padded]"}},
      {"logits int",
       [&] {
         fwd(losses, lse, rnd({3, 8}, kI32), targets, 5);
       },
       {"cross_entropy_forward", "'logits'", "float"}},
      {"logits undefined",
       [&] { fwd(losses, lse, undefined, targets, 5); },
       {"cross_entropy_forward", "'logits'", "undefined"}},
      {"targets float",
       [&] { fwd(losses, lse, logits, rnd({3}), 5); },
       {"cross_entropy_forward", "'targets'", "int32"}},
      {"targets numel",
       [&] {
         fwd(losses, lse, logits, ints({1, 2}, {2}), 5);
       },
       {"cross_entropy_forward", "'targets'", "3 elements"}},
      {"losses dtype",
       [&] {
         Tensor l = rnd({3}, kBF16);
         fwd(l, lse, logits, targets, 5);
       },
       {"cross_entropy_forward", "'losses'", "fp32"}},
      {"losses numel",
       [&] {
         Tensor l = rnd({4});
         fwd(l, lse, logits, targets, 5);
       },
       {"cross_entropy_forward", "'losses'", "3 elements"}},
      {"lse numel",
       [&] {
         Tensor s = rnd({2});
         fwd(losses, s, logits, targets, 5);
       },
       {"cross_entropy_forward", "'lse'", "3 elements"}},
      {"lse undefined",
       [&] { fwd(losses, undefined, logits, targets, 5); },
       {"cross_entropy_forward", "'lse'", "undefined"}},
      {"bwd dlogits shape",
       [&] {
         Tensor d = rnd({3, 5});
         bwd(d, logits, lse, targets, 5, 0.5f);
       },
       {"cross_entropy_backward", "'dlogits'", "[3, 8]"}},
      {"bwd dlogits dtype",
       [&] {
         Tensor d = rnd({3, 8}, kBF16);
         bwd(d, logits, lse, targets, 5, 0.5f);
       },
       {"cross_entropy_backward", "'dlogits'", "fp32"}},
      {"bwd target >= vocab",
       [&] {
         bwd(dlogits, logits, lse, ints({0, 9, 1}, {3}), 5, 0.5f);
       },
       {"cross_entropy_backward", "target 9 at row 1"}},
      {"bwd vocab",
       [&] { bwd(dlogits, logits, lse, targets, -3, 0.5f); },
       {"cross_entropy_backward", "vocab -3"}},
      {"bwd lse dtype",
       [&] { bwd(dlogits, logits, rnd({3}, kF16), targets, 5, 0.5f); },
       {"cross_entropy_backward", "'lse'", "fp32"}},
      {"bwd dloss NaN",
       [&] { bwd(dlogits, logits, lse, targets, 5, kNaN); },
       {"cross_entropy_backward", "dloss", "finite"}},
      {"bwd dloss Inf",
       [&] { bwd(dlogits, logits, lse, targets, 5, kInf); },
       {"cross_entropy_backward", "dloss", "finite"}},
  });
}

TEST(OpsErrors, AdamW) {
  Tensor param = rnd({4, 3}, kBF16), master = rnd({4, 3}), grad = rnd({12}), m = rnd({4, 3}),
         v = rnd({4, 3}), undefined;
  ops::AdamWParams p;
  expect_valid([&] { ops::adamw_update(param, master, grad, m, v, p); }, "adamw_update");
  expect_valid([&] { ops::adamw_update(undefined, master, grad, m, v, p); }, "adamw_update");
  auto with = [&](auto change) {
    ops::AdamWParams q;
    change(q);
    return [&, q] { ops::adamw_update(param, master, grad, m, v, q); };
  };
  expect_errors({
      {"master undefined",
       [&] { ops::adamw_update(param, undefined, grad, m, v, p); },
       {"adamw_update", "'master'", "undefined"}},
      {"master bf16",
       [&] {
         Tensor w = rnd({4, 3}, kBF16);
         ops::adamw_update(param, w, grad, m, v, p);
       },
       {"adamw_update", "'master'", "fp32"}},
      {"grad undefined",
       [&] { ops::adamw_update(param, master, undefined, m, v, p); },
       {"adamw_update", "'grad'", "undefined"}},
      {"grad bf16",
       [&] { ops::adamw_update(param, master, rnd({12}, kBF16), m, v, p); },
       {"adamw_update", "'grad'", "fp32"}},
      {"grad numel",
       [&] { ops::adamw_update(param, master, rnd({11}), m, v, p); },
       {"adamw_update", "'grad'", "12 elements"}},
      {"m numel",
       [&] {
         Tensor mm = rnd({13});
         ops::adamw_update(param, master, grad, mm, v, p);
       },
       {"adamw_update", "'m'", "12 elements"}},
      {"v dtype",
       [&] {
         Tensor vv = rnd({4, 3}, kF16);
         ops::adamw_update(param, master, grad, m, vv, p);
       },
       {"adamw_update", "'v'", "fp32"}},
      {"param int",
       [&] {
         Tensor pi = rnd({4, 3}, kI32);
         ops::adamw_update(pi, master, grad, m, v, p);
       },
       {"adamw_update", "'param'", "float"}},
      {"param numel",
       [&] {
         Tensor pp = rnd({5, 3}, kBF16);
         ops::adamw_update(pp, master, grad, m, v, p);
       },
       {"adamw_update", "'param'", "12 elements"}},
      {"step 0", with([](ops::AdamWParams& q) { q.step = 0; }), {"adamw_update", "step"}},
      {"beta1 1", with([](ops::AdamWParams& q) { q.beta1 = 1.0f; }), {"adamw_update", "betas"}},
      {"beta2 NaN", with([](ops::AdamWParams& q) { q.beta2 = kNaN; }), {"adamw_update", "betas"}},
      {"beta1 negative",
       with([](ops::AdamWParams& q) { q.beta1 = -0.1f; }),
       {"adamw_update", "betas"}},
      {"eps 0", with([](ops::AdamWParams& q) { q.eps = 0.0f; }), {"adamw_update", "eps 0"}},
      {"lr negative", with([](ops::AdamWParams& q) { q.lr = -1e-3f; }), {"adamw_update", "lr"}},
      {"lr NaN", with([](ops::AdamWParams& q) { q.lr = kNaN; }), {"adamw_update", "lr"}},
      {"lr Inf", with([](ops::AdamWParams& q) { q.lr = kInf; }), {"adamw_update", "lr"}},
      {"weight_decay negative",
       with([](ops::AdamWParams& q) { q.weight_decay = -0.1f; }),
       {"adamw_update", "wd"}},
      {"grad_scale NaN",
       with([](ops::AdamWParams& q) { q.grad_scale = kNaN; }),
       {"adamw_update", "grad_scale"}},
      {"grad_scale Inf",
       with([](ops::AdamWParams& q) { q.grad_scale = kInf; }),
       {"adamw_update", "grad_scale"}},
  });
}

TEST(OpsErrors, Norms) {
  std::vector<Tensor> grads{rnd({3, 4}), rnd({5})};
  expect_valid([&] { ops::sum_of_squares(grads[0]); }, "sum_of_squares");
  expect_valid([&] { ops::global_norm(grads); }, "global_norm");
  expect_valid([&] { ops::clip_grad_norm(grads, 1.0); }, "clip_grad_norm");
  std::vector<Tensor> with_undefined{rnd({3}), Tensor()}, with_int{rnd({3}), rnd({2}, kI32)};
  expect_errors({
      {"sum_of_squares undefined",
       [&] { ops::sum_of_squares(Tensor()); },
       {"sum_of_squares", "'x'", "undefined"}},
      {"sum_of_squares int",
       [&] { ops::sum_of_squares(rnd({3}, kI32)); },
       {"sum_of_squares", "'x'", "float"}},
      {"global_norm undefined",
       [&] { ops::global_norm(with_undefined); },
       {"global_norm", "tensor 1", "undefined"}},
      {"global_norm int",
       [&] { ops::global_norm(with_int); },
       {"global_norm", "tensor 1", "float"}},
      {"clip undefined",
       [&] { ops::clip_grad_norm(with_undefined, 1.0); },
       {"clip_grad_norm", "tensor 1", "undefined"}},
      {"clip int",
       [&] { ops::clip_grad_norm(with_int, 1.0); },
       {"clip_grad_norm", "tensor 1", "float"}},
      {"clip max_norm 0", [&] { ops::clip_grad_norm(grads, 0.0); }, {"clip_grad_norm", "max_norm"}},
      {"clip max_norm NaN",
       [&] { ops::clip_grad_norm(grads, std::nan("")); },
       {"clip_grad_norm", "max_norm"}},
  });
}

}  // namespace
}  // namespace meshtrain
