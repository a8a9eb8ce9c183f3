// Argument errors of attention (training, grouped-query, KV-cache decode) and rotary
// embeddings; see test_ops_errors.cpp for what every test here checks.
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

}  // namespace
}  // namespace meshtrain
