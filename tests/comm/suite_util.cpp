// The conformance suite's inputs and expectations, declared in suite_util.hpp.
#include "tests/comm/suite_util.hpp"

#include <algorithm>
#include <cmath>

namespace meshtrain::comm::commtest {

std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::uint64_t seed_of(DType d, std::int64_t n, int salt) {
  return mix(static_cast<std::uint64_t>(d) * 1000003u + static_cast<std::uint64_t>(n) * 31u +
             static_cast<std::uint64_t>(salt));
}

float round_to(DType d, float x) {
  switch (d) {
    case DType::kBF16:
      return bf16_to_float(float_to_bf16(x));
    case DType::kF16:
      return f16_to_float(float_to_f16(x));
    default:
      return x;
  }
}

// Rank `rank`'s element i for a given seed: uniform in [-1, 1), rounded to the dtype.
float value(DType d, std::uint64_t seed, int rank, std::int64_t i) {
  const std::uint64_t u =
      mix(seed ^ mix(static_cast<std::uint64_t>(rank) << 40 ^ static_cast<std::uint64_t>(i)));
  const float x = static_cast<float>(u >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
  return round_to(d, x);
}

std::vector<float> values(DType d, std::uint64_t seed, int rank, std::int64_t n) {
  std::vector<float> v(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) v[i] = value(d, seed, rank, i);
  return v;
}

Tensor make(DType d, std::uint64_t seed, int rank, std::int64_t n, Device& dev) {
  return Tensor::from_floats(values(d, seed, rank, n), Shape{n}, d, dev);
}

Expected expect(DType d, std::uint64_t seed, int size, std::int64_t offset, std::int64_t n) {
  Expected e;
  e.sum.assign(n, 0.0);
  e.abs.assign(n, 0.0);
  e.max.assign(n, -INFINITY);
  e.min.assign(n, INFINITY);
  for (int r = 0; r < size; ++r) {
    for (std::int64_t i = 0; i < n; ++i) {
      const float x = value(d, seed, r, offset + i);
      e.sum[i] += x;
      e.abs[i] += std::fabs(x);
      e.max[i] = std::max(e.max[i], x);
      e.min[i] = std::min(e.min[i], x);
    }
  }
  return e;
}

double unit_roundoff(DType d) {
  switch (d) {
    case DType::kBF16:
      return std::ldexp(1.0, -8);
    case DType::kF16:
      return std::ldexp(1.0, -11);
    default:
      return std::ldexp(1.0, -24);
  }
}

// Sums may round at every step of a tree or ring (MPI user ops on 16-bit data round each
// pairwise step), so the bound grows with the number of ranks.
void check_reduced(const std::string& what, const std::vector<float>& got, ReduceOp op,
                   const Expected& e, DType d, int size) {
  const double u = unit_roundoff(d);
  std::int64_t bad = 0;
  std::string first;
  for (std::size_t i = 0; i < got.size(); ++i) {
    bool ok = false;
    double want = 0;
    switch (op) {
      case ReduceOp::kMax:
        want = e.max[i];
        ok = got[i] == e.max[i];
        break;
      case ReduceOp::kMin:
        want = e.min[i];
        ok = got[i] == e.min[i];
        break;
      case ReduceOp::kSum:
      case ReduceOp::kAvg: {
        const double div = op == ReduceOp::kAvg ? size : 1;
        want = e.sum[i] / div;
        const double tol = ((size + 1) * u * e.abs[i] + u * std::fabs(e.sum[i])) / div + 1e-30;
        ok = std::fabs(got[i] - want) <= tol;
        break;
      }
    }
    if (!ok && bad++ == 0) first = fmt::format("element {}: got {}, want {}", i, got[i], want);
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size()
                    << " elements wrong; first: " << first;
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

}  // namespace meshtrain::comm::commtest
