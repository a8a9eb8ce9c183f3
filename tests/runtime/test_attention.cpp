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

// Grouped-query attention against multi-head attention on the same query heads with each
// key/value head repeated for its group (transformers' repeat_kv): the forward and dQ run the
// same GEMMs on the same values, so they agree bit for bit; dK and dV of a key/value head are
// the sums of its group's (summed in fp32 before one rounding, where the multi-head results are
// rounded per head first).
struct GqaCase {
  int batch, seq, n_head, n_kv_head, head_size;
};

TEST(Attention, GroupedQueryMatchesRepeatedHeads) {
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (const GqaCase& c : {GqaCase{2, 37, 4, 2, 12}, GqaCase{1, 300, 4, 1, 16},
                             GqaCase{3, 17, 6, 3, 8}, GqaCase{1, 130, 8, 2, 32}}) {
      SCOPED_TRACE(fmt::format("B={} T={} H={} KV={} D={} {}", c.batch, c.seq, c.n_head,
                               c.n_kv_head, c.head_size, dtype_name(dtype)));
      const int d = c.head_size, group = c.n_head / c.n_kv_head;
      const std::int64_t rows = std::int64_t{c.batch} * c.seq, qw = std::int64_t{c.n_head} * d,
                         kvw = std::int64_t{c.n_kv_head} * d;
      Tensor gqa = Tensor::empty(Shape{c.batch, c.seq, qw + 2 * kvw}, dtype);
      fill_normal(gqa, Philox(31, 0), 0.0f, 1.5f);
      Tensor dout = Tensor::empty(Shape{c.batch, c.seq, qw}, dtype);
      fill_normal(dout, Philox(31, 1), 0.0f, 1.0f);
      // The multi-head projection: q as it is, key/value head h / group at head h.
      const std::vector<float> g = gqa.to_floats();
      std::vector<float> m(static_cast<std::size_t>(rows * 3 * qw));
      for (std::int64_t r = 0; r < rows; ++r) {
        const float* src = g.data() + r * (qw + 2 * kvw);
        float* dst = m.data() + r * 3 * qw;
        std::copy(src, src + qw, dst);
        for (int h = 0; h < c.n_head; ++h)
          for (int part = 1; part <= 2; ++part)
            std::copy(src + qw + (part - 1) * kvw + (h / group) * d,
                      src + qw + (part - 1) * kvw + (h / group + 1) * d, dst + part * qw + h * d);
      }
      Tensor mha = Tensor::from_floats(m, Shape{c.batch, c.seq, 3 * qw}, dtype);
      Tensor out_g = Tensor::empty(dout.shape(), dtype), out_m = out_g.clone();
      Tensor lse_g = Tensor::empty(Shape{c.batch, c.n_head, c.seq}, DType::kF32),
             lse_m = lse_g.clone();
      Tensor dgqa = Tensor::empty(gqa.shape(), dtype), dmha = Tensor::empty(mha.shape(), dtype);
      ops::attention_forward(out_g, lse_g, gqa, c.n_head, c.n_kv_head);
      ops::attention_forward(out_m, lse_m, mha, c.n_head);
      EXPECT_EQ(out_g.to_floats(), out_m.to_floats()) << "out";
      EXPECT_EQ(lse_g.to_floats(), lse_m.to_floats()) << "lse";
      ops::attention_backward(dgqa, dout, gqa, out_g, lse_g, c.n_head, c.n_kv_head);
      ops::attention_backward(dmha, dout, mha, out_m, lse_m, c.n_head);
      const std::vector<float> dg = dgqa.to_floats(), dm = dmha.to_floats();
      std::vector<float> dq_g, dq_m, dkv_g;
      std::vector<double> dkv_sum;
      for (std::int64_t r = 0; r < rows; ++r) {
        const float* a = dg.data() + r * (qw + 2 * kvw);
        const float* b = dm.data() + r * 3 * qw;
        dq_g.insert(dq_g.end(), a, a + qw);
        dq_m.insert(dq_m.end(), b, b + qw);
        dkv_g.insert(dkv_g.end(), a + qw, a + qw + 2 * kvw);
        for (int part = 1; part <= 2; ++part)
          for (int kv = 0; kv < c.n_kv_head; ++kv)
            for (int e = 0; e < d; ++e) {
              double sum = 0.0;
              for (int h = kv * group; h < (kv + 1) * group; ++h) sum += b[part * qw + h * d + e];
              dkv_sum.push_back(sum);
            }
      }
      EXPECT_EQ(dq_g, dq_m) << "dq";
      EXPECT_LT(scaled_error(dkv_g, dkv_sum), dtype == DType::kF32 ? 1e-5 : 1e-2) << "dk, dv";
    }
  }
}

// As IdenticalWithOneAndTwoThreads for grouped-query attention: with one key/value head per
// sequence and two threads, backward takes the split path; with one thread, the single sweep.
TEST(Attention, GroupedQueryIdenticalWithOneAndTwoThreads) {
  const int saved = omp_get_max_threads();
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (const GqaCase& c : {GqaCase{1, 300, 4, 1, 16}, GqaCase{2, 130, 6, 3, 12}}) {
      SCOPED_TRACE(fmt::format("B={} T={} H={} KV={} {}", c.batch, c.seq, c.n_head, c.n_kv_head,
                               dtype_name(dtype)));
      const std::int64_t w = std::int64_t{c.n_head + 2 * c.n_kv_head} * c.head_size;
      Tensor qkv = Tensor::empty(Shape{c.batch, c.seq, w}, dtype);
      fill_normal(qkv, Philox(5, 0), 0.0f, 1.0f);
      Tensor dout = Tensor::empty(Shape{c.batch, c.seq, c.n_head * c.head_size}, dtype);
      fill_normal(dout, Philox(5, 1), 0.0f, 1.0f);
      std::vector<float> results[2];
      for (int threads : {1, 2}) {
        omp_set_num_threads(threads);
        Tensor out = Tensor::empty(dout.shape(), dtype);
        Tensor lse = Tensor::empty(Shape{c.batch, c.n_head, c.seq}, DType::kF32);
        Tensor dqkv = Tensor::empty(qkv.shape(), dtype);
        ops::attention_forward(out, lse, qkv, c.n_head, c.n_kv_head);
        ops::attention_backward(dqkv, dout, qkv, out, lse, c.n_head, c.n_kv_head);
        results[threads - 1] = out.to_floats();
        const std::vector<float> d = dqkv.to_floats();
        results[threads - 1].insert(results[threads - 1].end(), d.begin(), d.end());
      }
      EXPECT_EQ(results[0], results[1]);
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
