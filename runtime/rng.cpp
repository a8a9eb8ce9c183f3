#include "runtime/rng.hpp"

#include <cmath>
#include <vector>

namespace meshtrain {
namespace {
constexpr std::uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
constexpr std::uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;

inline void mulhilo(std::uint32_t a, std::uint32_t b, std::uint32_t& hi, std::uint32_t& lo) {
  const std::uint64_t p = static_cast<std::uint64_t>(a) * b;
  hi = static_cast<std::uint32_t>(p >> 32);
  lo = static_cast<std::uint32_t>(p);
}
}  // namespace

std::array<std::uint32_t, 4> Philox::block(std::uint64_t block) const {
  // Counter = (block, stream); key = seed.
  std::uint32_t c0 = static_cast<std::uint32_t>(block),
                c1 = static_cast<std::uint32_t>(block >> 32);
  std::uint32_t c2 = static_cast<std::uint32_t>(stream_),
                c3 = static_cast<std::uint32_t>(stream_ >> 32);
  std::uint32_t k0 = static_cast<std::uint32_t>(seed_),
                k1 = static_cast<std::uint32_t>(seed_ >> 32);
  for (int round = 0; round < 10; ++round) {
    std::uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kMul0, c0, hi0, lo0);
    mulhilo(kMul1, c2, hi1, lo1);
    const std::uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return {c0, c1, c2, c3};
}

float Philox::normal(std::uint64_t i) const {
  // Two words of one block give one normal; u1 in (0, 1] so that log never sees 0.
  const auto b = block(i / 2);
  const std::uint32_t w0 = b[(i % 2) * 2], w1 = b[(i % 2) * 2 + 1];
  const double u1 = (static_cast<double>(w0) + 1.0) * 0x1p-32;
  const double u2 = static_cast<double>(w1) * 0x1p-32;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
}

void fill_normal(Tensor& t, const Philox& rng, float mean, float std, std::uint64_t offset) {
  MT_CHECK(is_floating(t.dtype()), "fill_normal: {} is not a float tensor", t.str());
  std::vector<float> host(static_cast<std::size_t>(t.numel()));
  for (std::size_t i = 0; i < host.size(); ++i) host[i] = mean + std * rng.normal(offset + i);
  t.copy_from(Tensor::wrap(host.data(), t.shape(), DType::kF32));
}

void fill_uniform(Tensor& t, const Philox& rng, float lo, float hi, std::uint64_t offset) {
  MT_CHECK(is_floating(t.dtype()), "fill_uniform: {} is not a float tensor", t.str());
  MT_CHECK(lo < hi, "fill_uniform: empty range [{}, {})", lo, hi);
  std::vector<float> host(static_cast<std::size_t>(t.numel()));
  for (std::size_t i = 0; i < host.size(); ++i) host[i] = lo + (hi - lo) * rng.uniform(offset + i);
  t.copy_from(Tensor::wrap(host.data(), t.shape(), DType::kF32));
}

}  // namespace meshtrain
