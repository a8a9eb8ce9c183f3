// The cuBLASLt descriptor numbers of runtime/cuda/lt_layout.hpp, checked on the CPU: a
// column-major GEMM that reads memory exactly as cuBLASLt would with those numbers (ops,
// stored shapes, leading dimensions, the bias added along m, the aux matrix's leading
// dimension) must give our row-major product, for every transpose combination and odd shapes.
// Runs everywhere (plain C++): the only check of the CUDA matmul's host logic without a GPU.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "runtime/cuda/lt_layout.hpp"

namespace meshtrain::cuda {
namespace {

// cuBLASLt's D = op(A) op(B) + bias (bias[i] on row i of D), column-major, with the layout's
// numbers; every element of A and B is read through (row, col, ld) of its stored matrix.
std::vector<double> lt_reference(const LtLayout& l, const std::vector<double>& a_mem,
                                 const std::vector<double>& b_mem, const std::vector<double>* bias,
                                 std::vector<double>* aux) {
  std::int64_t outside = 0;  // reads outside a stored matrix or its buffer: reported once
  auto at = [&outside](const LtMatrix& x, const std::vector<double>& mem, std::uint64_t r,
                       std::uint64_t c) {
    // Element (r, c) of op(x): op transposes the stored matrix.
    const std::uint64_t sr = x.transposed ? c : r, sc = x.transposed ? r : c;
    const std::uint64_t idx = sr + sc * static_cast<std::uint64_t>(x.ld);
    if (sr >= x.rows || sc >= x.cols || idx >= mem.size()) {
      ++outside;
      return 0.0;
    }
    return mem[idx];
  };
  std::vector<double> d(static_cast<std::size_t>(l.c.ld * static_cast<std::int64_t>(l.n)), 0.0);
  for (std::uint64_t j = 0; j < l.n; ++j) {
    for (std::uint64_t i = 0; i < l.m; ++i) {
      double s = 0.0;
      for (std::uint64_t p = 0; p < l.k; ++p) s += at(l.a, a_mem, i, p) * at(l.b, b_mem, p, j);
      if (bias != nullptr) s += i < l.bias_length ? (*bias)[i] : (++outside, 0.0);
      d[i + j * static_cast<std::uint64_t>(l.c.ld)] = s;
      if (aux != nullptr) (*aux)[i + j * static_cast<std::uint64_t>(l.aux_ld)] = s;
    }
  }
  EXPECT_EQ(outside, 0) << "reads outside an operand's stored matrix or buffer";
  return d;
}

TEST(LtLayout, ColumnMajorViewComputesTheRowMajorProduct) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  struct Dims {
    std::int64_t m, n, k;
  };
  for (Dims s : {Dims{1, 1, 1}, Dims{3, 5, 7}, Dims{8, 2304, 4}, Dims{17, 3, 1}, Dims{4, 9, 33}}) {
    for (int trans = 0; trans < 4; ++trans) {
      const bool ta = trans & 1, tb = trans & 2;
      SCOPED_TRACE(testing::Message() << "M=" << s.m << " N=" << s.n << " K=" << s.k
                                      << " trans_a=" << ta << " trans_b=" << tb);
      // Ours, row-major: a [M, K] (trans_a: [K, M]), b [K, N] (trans_b: [N, K]), bias [N].
      std::vector<double> a(static_cast<std::size_t>(s.m * s.k)),
          b(static_cast<std::size_t>(s.k * s.n)), bias(static_cast<std::size_t>(s.n));
      for (double& x : a) x = u(rng);
      for (double& x : b) x = u(rng);
      for (double& x : bias) x = u(rng);
      auto a_at = [&](std::int64_t i, std::int64_t p) {
        return ta ? a[p * s.m + i] : a[i * s.k + p];
      };
      auto b_at = [&](std::int64_t p, std::int64_t j) {
        return tb ? b[j * s.k + p] : b[p * s.n + j];
      };

      const LtLayout l = lt_layout(s.m, s.n, s.k, ta, tb);
      EXPECT_EQ(l.a.rows * l.a.cols, static_cast<std::uint64_t>(b.size())) << "A is our b";
      EXPECT_EQ(l.b.rows * l.b.cols, static_cast<std::uint64_t>(a.size())) << "B is our a";
      EXPECT_EQ(l.c.rows * l.c.cols, static_cast<std::uint64_t>(s.m * s.n));
      EXPECT_GE(l.a.ld, static_cast<std::int64_t>(l.a.rows));
      EXPECT_GE(l.b.ld, static_cast<std::int64_t>(l.b.rows));
      EXPECT_EQ(l.bias_length, static_cast<std::uint64_t>(s.n)) << "the bias runs along our rows";

      std::vector<double> aux(static_cast<std::size_t>(s.m * s.n), 0.0);
      const std::vector<double> d = lt_reference(l, b, a, &bias, &aux);
      ASSERT_EQ(d.size(), static_cast<std::size_t>(s.m * s.n));
      for (std::int64_t i = 0; i < s.m; ++i) {
        for (std::int64_t j = 0; j < s.n; ++j) {
          double want = bias[static_cast<std::size_t>(j)];
          for (std::int64_t p = 0; p < s.k; ++p) want += a_at(i, p) * b_at(p, j);
          // D read back as our row-major out[M, N], and the aux (pre-GELU) matrix likewise.
          ASSERT_NEAR(d[static_cast<std::size_t>(i * s.n + j)], want, 1e-12) << i << ", " << j;
          ASSERT_NEAR(aux[static_cast<std::size_t>(i * s.n + j)], want, 1e-12) << i << ", " << j;
        }
      }
    }
  }
}

TEST(LtLayout, EmptyInnerDimensionIsClampedForTheDescriptors) {
  // matmul.cpp handles K = 0 itself (cuBLASLt rejects it); the layout never asks for k = 0.
  const LtLayout l = lt_layout(4, 6, 0, false, false);
  EXPECT_EQ(l.k, 1u);
  EXPECT_EQ(l.m, 6u);
  EXPECT_EQ(l.n, 4u);
}

}  // namespace
}  // namespace meshtrain::cuda
