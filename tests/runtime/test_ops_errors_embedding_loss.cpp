// Argument errors of the embedding and the cross-entropy (and its vocab-parallel pieces); see
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

}  // namespace
}  // namespace meshtrain
