// A counter-based random number generator (Philox-4x32-10, Salmon et al. 2011, as in cuRAND
// and PyTorch): the value at position i of stream s under seed k is a pure function of
// (k, s, i). Any rank or device can generate any slice of a tensor's initialisation without
// generating what comes before it, and a resumed run draws exactly what it would have drawn.
#pragma once

#include <array>
#include <cstdint>

#include "runtime/tensor.hpp"

namespace meshtrain {

class Philox {
 public:
  Philox(std::uint64_t seed, std::uint64_t stream) : seed_(seed), stream_(stream) {}

  // Four 32-bit words for counter block `block`.
  std::array<std::uint32_t, 4> block(std::uint64_t block) const;
  // The i-th 32-bit word of the stream.
  std::uint32_t u32(std::uint64_t i) const { return block(i / 4)[i % 4]; }
  // Uniform in [0, 1) with 24 random bits, from word i.
  float uniform(std::uint64_t i) const { return static_cast<float>(u32(i) >> 8) * 0x1p-24f; }
  // Standard normal number i (Box-Muller on words 2i and 2i+1; both from one block).
  float normal(std::uint64_t i) const;

  std::uint64_t seed() const { return seed_; }
  std::uint64_t stream() const { return stream_; }

 private:
  std::uint64_t seed_;
  std::uint64_t stream_;
};

// Fills t with normal(mean, std) values number offset .. offset + numel - 1 of the stream,
// so that a shard of a larger tensor gets exactly the values the full tensor has there.
void fill_normal(Tensor& t, const Philox& rng, float mean, float std, std::uint64_t offset = 0);
// Fills with uniform values in [lo, hi).
void fill_uniform(Tensor& t, const Philox& rng, float lo, float hi, std::uint64_t offset = 0);

}  // namespace meshtrain
