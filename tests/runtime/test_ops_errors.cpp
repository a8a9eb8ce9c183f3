// Every op in runtime/ops.hpp refuses bad arguments (wrong shapes, dtypes, undefined tensors,
// token ids out of range, bad scalars) with InvalidArgument whose message names the op and the
// argument, before any work. Each test first runs the op with valid arguments, so that every
// error below comes from the one argument changed.
//
// This file: the elementwise ops and activations, SwiGLU, AdamW and the gradient norms. The
// other families: test_ops_errors_{linear,norm,attention,embedding_loss}.cpp.
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
