// Argument errors of LayerNorm and RMSNorm, and of the fused ops (linear + GELU, residual add +
// LayerNorm / RMSNorm); see test_ops_errors.cpp for what every test here checks.
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

}  // namespace
}  // namespace meshtrain
