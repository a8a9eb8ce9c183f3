// Argument errors of matmul, linear (forward and backward) and the bias gradient; see
// test_ops_errors.cpp for what every test here checks.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "runtime/ops.hpp"
#include "tests/runtime/ops_errors_util.hpp"

namespace meshtrain {
namespace {

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

}  // namespace
}  // namespace meshtrain
