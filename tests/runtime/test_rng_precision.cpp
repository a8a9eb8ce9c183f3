#include <cmath>

#include <gtest/gtest.h>

#include "runtime/precision.hpp"
#include "runtime/rng.hpp"

namespace meshtrain {
namespace {

TEST(Philox, KnownAnswers) {
  // Random123's known-answer vectors for philox4x32-10.
  auto zero = Philox(0, 0).block(0);
  EXPECT_EQ(zero,
            (std::array<std::uint32_t, 4>{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
  auto ones = Philox(~0ull, ~0ull).block(~0ull);
  EXPECT_EQ(ones,
            (std::array<std::uint32_t, 4>{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}));
  // ctr = (0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), key = (0xa4093822, 0x299f31d0)
  auto pi = Philox(0x299f31d0a4093822ull, 0x0370734413198a2eull).block(0x85a308d3243f6a88ull);
  EXPECT_EQ(pi, (std::array<std::uint32_t, 4>{0xd16cfe09u, 0x94fdcceBu, 0x5001e420u, 0x24126ea1u}));
}

TEST(Philox, NormalMomentsAndSlicing) {
  Philox rng(42, 7);
  const int n = 200000;
  double sum = 0, sq = 0;
  for (int i = 0; i < n; ++i) {
    const double v = rng.normal(i);
    sum += v;
    sq += v * v;
  }
  EXPECT_NEAR(sum / n, 0.0, 0.01);
  EXPECT_NEAR(sq / n, 1.0, 0.02);
  // A shard filled at an offset equals the same slice of the full tensor.
  Tensor full = Tensor::empty(Shape{100}, DType::kF32);
  fill_normal(full, rng, 0.0f, 0.02f);
  Tensor shard = Tensor::empty(Shape{30}, DType::kF32);
  fill_normal(shard, rng, 0.0f, 0.02f, 50);
  auto f = full.to_floats(), s = shard.to_floats();
  for (int i = 0; i < 30; ++i) EXPECT_EQ(s[i], f[50 + i]);
  // Other streams differ.
  Tensor other = Tensor::empty(Shape{100}, DType::kF32);
  fill_normal(other, Philox(42, 8), 0.0f, 0.02f);
  EXPECT_NE(other.to_floats(), f);
}

TEST(Precision, Policies) {
  auto bf = PrecisionPolicy::parse("bf16");
  EXPECT_EQ(bf.param, DType::kBF16);
  EXPECT_EQ(bf.grad, DType::kF32);
  EXPECT_TRUE(bf.has_master_copy());
  EXPECT_FALSE(bf.loss_scaling);
  auto fp = PrecisionPolicy::parse("fp32");
  EXPECT_FALSE(fp.has_master_copy());
  EXPECT_TRUE(PrecisionPolicy::parse("fp16").loss_scaling);
  EXPECT_THROW(PrecisionPolicy::parse("int8"), InvalidArgument);
}

TEST(DynamicLossScaler, BacksOffAndGrows) {
  DynamicLossScaler s(1024.0f, 2.0f, 0.5f, 3);
  EXPECT_FALSE(s.update(true));
  EXPECT_EQ(s.scale(), 512.0f);
  EXPECT_TRUE(s.update(false));
  EXPECT_TRUE(s.update(false));
  EXPECT_EQ(s.scale(), 512.0f);
  EXPECT_TRUE(s.update(false));
  EXPECT_EQ(s.scale(), 1024.0f);
  EXPECT_EQ(s.skipped_steps(), 1);
  // Never below the minimum.
  DynamicLossScaler low(2.0f, 2.0f, 0.5f, 10, 1.0f);
  low.update(true);
  low.update(true);
  EXPECT_EQ(low.scale(), 1.0f);
  EXPECT_THROW(DynamicLossScaler(0.0f), InvalidArgument);
  EXPECT_THROW(DynamicLossScaler(1.0f, 2.0f, 1.5f), InvalidArgument);
}

}  // namespace
}  // namespace meshtrain
