// Causal attention on the CPU against a naive double-precision reference that forms the full
// masked softmax, and its backward, from the same (dtype-rounded) inputs.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "runtime/ops.hpp"
#include "runtime/rng.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain {
namespace {

struct Case {
  int batch, seq, channels, n_head;
};

struct Reference {
  std::vector<double> out, lse, dqkv;
};

// Full-matrix attention in double: P = softmax(mask(Q K^T / sqrt(D))), O = P V, and
// dP = dO V^T, dS = P o (dP - rowsum(P o dP)), dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D),
// dV = P^T dO.
Reference reference(const Case& c, const std::vector<float>& qkv, const std::vector<float>& dout) {
  const int t_len = c.seq, hd = c.channels / c.n_head;
  const std::size_t ld = 3 * static_cast<std::size_t>(c.channels);
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  Reference r;
  r.out.assign(static_cast<std::size_t>(c.batch) * t_len * c.channels, 0.0);
  r.lse.assign(static_cast<std::size_t>(c.batch) * c.n_head * t_len, 0.0);
  r.dqkv.assign(qkv.size(), 0.0);
  std::vector<double> p(static_cast<std::size_t>(t_len) * t_len), dp(p.size());
  for (int b = 0; b < c.batch; ++b) {
    for (int h = 0; h < c.n_head; ++h) {
      auto at = [&](int t, int part) {
        return (static_cast<std::size_t>(b) * t_len + t) * ld + part * c.channels + h * hd;
      };
      auto out_at = [&](int t) {
        return (static_cast<std::size_t>(b) * t_len + t) * c.channels + h * hd;
      };
      for (int i = 0; i < t_len; ++i) {
        double mx = -INFINITY;
        for (int j = 0; j <= i; ++j) {
          double s = 0.0;
          for (int e = 0; e < hd; ++e) s += double{qkv[at(i, 0) + e]} * qkv[at(j, 1) + e];
          p[i * t_len + j] = s * scale;
          mx = std::max(mx, s * scale);
        }
        double sum = 0.0;
        for (int j = 0; j <= i; ++j) sum += std::exp(p[i * t_len + j] - mx);
        r.lse[(static_cast<std::size_t>(b) * c.n_head + h) * t_len + i] = mx + std::log(sum);
        for (int j = 0; j <= i; ++j) p[i * t_len + j] = std::exp(p[i * t_len + j] - mx) / sum;
        for (int e = 0; e < hd; ++e) {
          double o = 0.0;
          for (int j = 0; j <= i; ++j) o += p[i * t_len + j] * qkv[at(j, 2) + e];
          r.out[out_at(i) + e] = o;
        }
      }
      for (int i = 0; i < t_len; ++i) {
        double row = 0.0;
        for (int j = 0; j <= i; ++j) {
          double s = 0.0;
          for (int e = 0; e < hd; ++e) s += double{dout[out_at(i) + e]} * qkv[at(j, 2) + e];
          dp[i * t_len + j] = s;
          row += p[i * t_len + j] * s;
        }
        for (int j = 0; j <= i; ++j) {
          const double pij = p[i * t_len + j];
          const double ds = pij * (dp[i * t_len + j] - row) * scale;
          for (int e = 0; e < hd; ++e) {
            r.dqkv[at(i, 0) + e] += ds * qkv[at(j, 1) + e];
            r.dqkv[at(j, 1) + e] += ds * qkv[at(i, 0) + e];
            r.dqkv[at(j, 2) + e] += pij * dout[out_at(i) + e];
          }
        }
      }
    }
  }
  return r;
}

// max |got - want| relative to max |want|, or to 1 (the scale of the inputs) when that is
// smaller: dq and dk are exactly 0 at T = 1, where only rounding is left to compare.
double scaled_error(const std::vector<float>& got, const std::vector<double>& want) {
  double err = 0.0, mag = 1.0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::abs(got[i] - want[i]));
    mag = std::max(mag, std::abs(want[i]));
  }
  return err / mag;
}

struct Buffers {
  Tensor qkv, dout, out, lse, dqkv;
};

Buffers make_run(const Case& c, DType dtype, std::uint64_t seed) {
  Buffers r;
  const Philox rng(seed, 0);
  r.qkv = Tensor::empty(Shape{c.batch, c.seq, 3 * c.channels}, dtype);
  fill_normal(r.qkv, rng, 0.0f, 1.0f);
  r.dout = Tensor::empty(Shape{c.batch, c.seq, c.channels}, dtype);
  fill_normal(r.dout, Philox(seed, 1), 0.0f, 1.0f);
  r.out = Tensor::empty(Shape{c.batch, c.seq, c.channels}, dtype);
  r.lse = Tensor::empty(Shape{c.batch, c.n_head, c.seq}, DType::kF32);
  r.dqkv = Tensor::empty(r.qkv.shape(), dtype);
  return r;
}

void forward_backward(Buffers& r, int n_head) {
  ops::attention_forward(r.out, r.lse, r.qkv, n_head);
  ops::attention_backward(r.dqkv, r.dout, r.qkv, r.out, r.lse, n_head);
}

std::string name(const Case& c, DType dtype) {
  return fmt::format("B={} T={} C={} n_head={} {}", c.batch, c.seq, c.channels, c.n_head,
                     dtype_name(dtype));
}

void check_against_reference(const Case& c, DType dtype, double tol) {
  SCOPED_TRACE(name(c, dtype));
  Buffers r = make_run(c, dtype, 1234 + c.seq);
  forward_backward(r, c.n_head);
  const Reference want = reference(c, r.qkv.to_floats(), r.dout.to_floats());
  EXPECT_LT(scaled_error(r.out.to_floats(), want.out), tol) << "out";
  // lse is fp32 in every policy; its error is that of the scores, whose dot products are exact
  // in fp32 accumulation up to rounding.
  EXPECT_LT(scaled_error(r.lse.to_floats(), want.lse), 1e-5) << "lse";
  const std::vector<float> grad = r.dqkv.to_floats();
  // Each of dq, dk, dv against its own magnitude.
  const std::size_t ld = 3 * static_cast<std::size_t>(c.channels);
  const char* parts[] = {"dq", "dk", "dv"};
  for (int part = 0; part < 3; ++part) {
    std::vector<float> got;
    std::vector<double> ref;
    for (std::size_t row = 0; row < grad.size() / ld; ++row)
      for (int e = 0; e < c.channels; ++e) {
        got.push_back(grad[row * ld + part * c.channels + e]);
        ref.push_back(want.dqkv[row * ld + part * c.channels + e]);
      }
    EXPECT_LT(scaled_error(got, ref), tol) << parts[part];
  }
}

// T = 1; T not a multiple of any block (37, 130); D = 12 (not a multiple of 8 or 16); B = 3;
// one head; T beyond one key chunk (300, 600) so that the online rescaling and the query
// chunks of backward are exercised.
const Case kCases[] = {{1, 1, 8, 1},    {2, 37, 36, 3},  {3, 130, 64, 2}, {1, 64, 16, 1},
                       {2, 300, 32, 2}, {1, 600, 24, 2}, {3, 17, 12, 1}};

TEST(Attention, Fp32MatchesReference) {
  for (const Case& c : kCases) check_against_reference(c, DType::kF32, 1e-5);
}

TEST(Attention, Bf16MatchesReference) {
  for (const Case& c : kCases) check_against_reference(c, DType::kBF16, 1e-2);
}

TEST(Attention, Fp16MatchesReference) {
  for (const Case& c : kCases) check_against_reference(c, DType::kF16, 1e-2);
}

// Large score magnitudes: the softmax must subtract the row maximum before exponentiating.
TEST(Attention, LargeScoresStayFinite) {
  const Case c{1, 70, 16, 1};
  Buffers r = make_run(c, DType::kF32, 7);
  const Philox rng(7, 2);
  fill_normal(r.qkv, rng, 0.0f, 12.0f);
  forward_backward(r, c.n_head);
  const Reference want = reference(c, r.qkv.to_floats(), r.dout.to_floats());
  EXPECT_LT(scaled_error(r.out.to_floats(), want.out), 1e-5);
  EXPECT_LT(scaled_error(r.lse.to_floats(), want.lse), 1e-5);
  EXPECT_LT(scaled_error(r.dqkv.to_floats(), want.dqkv), 1e-4);
}

// The result may not depend on the thread count, including with fewer heads than threads
// (backward then splits the work differently) and in every dtype.
TEST(Attention, IdenticalWithOneAndTwoThreads) {
  const int saved = omp_get_max_threads();
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (const Case& c : {Case{1, 300, 32, 1}, Case{2, 130, 36, 3}}) {
      SCOPED_TRACE(name(c, dtype));
      Buffers one = make_run(c, dtype, 99);
      Buffers two = make_run(c, dtype, 99);
      omp_set_num_threads(1);
      forward_backward(one, c.n_head);
      omp_set_num_threads(2);
      forward_backward(two, c.n_head);
      EXPECT_EQ(one.out.to_floats(), two.out.to_floats());
      EXPECT_EQ(one.lse.to_floats(), two.lse.to_floats());
      EXPECT_EQ(one.dqkv.to_floats(), two.dqkv.to_floats());
    }
  }
  omp_set_num_threads(saved);
}

// Runs f and returns the InvalidArgument message it throws ("" if it does not).
template <typename F>
std::string invalid_argument_of(F&& f) {
  try {
    f();
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "";
}

TEST(Attention, RejectsBadArguments) {
  const Case c{2, 5, 36, 3};
  Buffers r = make_run(c, DType::kF32, 5);
  // 36 channels cannot be split into 5 heads.
  std::string msg = invalid_argument_of([&] { ops::attention_forward(r.out, r.lse, r.qkv, 5); });
  EXPECT_NE(msg.find("n_head"), std::string::npos) << msg;
  msg = invalid_argument_of([&] { ops::attention_forward(r.out, r.lse, r.qkv, 0); });
  EXPECT_NE(msg.find("n_head"), std::string::npos) << msg;

  Tensor bad_lse = Tensor::empty(Shape{2, 5, 3}, DType::kF32);  // [B, T, H] instead of [B, H, T]
  msg = invalid_argument_of([&] { ops::attention_forward(r.out, bad_lse, r.qkv, 3); });
  EXPECT_NE(msg.find("'lse'"), std::string::npos) << msg;
  Tensor bf16_lse = Tensor::empty(Shape{2, 3, 5}, DType::kBF16);
  msg = invalid_argument_of([&] { ops::attention_forward(r.out, bf16_lse, r.qkv, 3); });
  EXPECT_NE(msg.find("'lse'"), std::string::npos) << msg;

  Tensor bad_out = Tensor::empty(Shape{2, 5, 36}, DType::kBF16);
  msg = invalid_argument_of([&] { ops::attention_forward(bad_out, r.lse, r.qkv, 3); });
  EXPECT_NE(msg.find("'out'"), std::string::npos) << msg;

  ops::attention_forward(r.out, r.lse, r.qkv, 3);
  Tensor bad_dout = Tensor::empty(Shape{2, 4, 36}, DType::kF32);
  msg = invalid_argument_of(
      [&] { ops::attention_backward(r.dqkv, bad_dout, r.qkv, r.out, r.lse, 3); });
  EXPECT_NE(msg.find("'dout'"), std::string::npos) << msg;
  Tensor bad_dqkv = Tensor::empty(Shape{2, 5, 36}, DType::kF32);
  msg = invalid_argument_of(
      [&] { ops::attention_backward(bad_dqkv, r.dout, r.qkv, r.out, r.lse, 3); });
  EXPECT_NE(msg.find("'dqkv'"), std::string::npos) << msg;
  msg = invalid_argument_of(
      [&] { ops::attention_backward(r.dqkv, r.dout, r.qkv, r.out, bad_lse, 3); });
  EXPECT_NE(msg.find("'lse'"), std::string::npos) << msg;
}

}  // namespace
}  // namespace meshtrain
