#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include <gtest/gtest.h>

#include "runtime/dtype.hpp"
#include "runtime/error.hpp"

namespace meshtrain {
namespace {

std::uint32_t bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Reference rounding: pick the nearer of the two neighbouring representable values, ties to
// the even one, computed in double (exact for both formats).
template <typename Decode>
std::uint16_t nearest_even(float x, Decode decode) {
  double best_err = std::numeric_limits<double>::infinity();
  std::uint16_t best = 0;
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const float v = decode(static_cast<std::uint16_t>(h));
    if (!std::isfinite(v)) continue;
    if (std::signbit(v) != std::signbit(x)) continue;
    const double err = std::fabs(static_cast<double>(v) - static_cast<double>(x));
    if (err < best_err || (err == best_err && (h & 1u) == 0)) {
      best_err = err;
      best = static_cast<std::uint16_t>(h);
    }
  }
  return best;
}

TEST(DType, NamesRoundTrip) {
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16, DType::kI32}) {
    EXPECT_EQ(parse_dtype(dtype_name(t)), t);
    EXPECT_EQ(parse_dtype(dtype_safetensors_name(t)), t);
  }
  EXPECT_THROW(parse_dtype("fp8"), InvalidArgument);
}

TEST(DType, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties go to even (1.0).
  EXPECT_EQ(float_to_bf16(from_bits(0x3f808000u)).bits, 0x3f80u);
  // 1 + 3 * 2^-8 is halfway between 1+2^-7 (odd mantissa) and 1 + 2^-6: rounds up to even.
  EXPECT_EQ(float_to_bf16(from_bits(0x3f818000u)).bits, 0x3f82u);
  EXPECT_EQ(float_to_bf16(from_bits(0x3f808001u)).bits, 0x3f81u);  // just above halfway
  // Largest finite float rounds to Inf.
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()).bits, 0x7f80u);
  std::mt19937 rng(1);
  for (int i = 0; i < 100000; ++i) {
    const float x = from_bits(rng());
    if (!std::isfinite(x)) continue;
    const std::uint32_t u = bits(x);
    const std::uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
    const double dlo = std::fabs(static_cast<double>(from_bits(lo)) - x);
    // Past the largest finite value IEEE rounding treats Inf as 2^128.
    const double hi_value = (hi & 0x7fffffffu) == 0x7f800000u
                                ? std::copysign(std::ldexp(1.0, 128), x)
                                : static_cast<double>(from_bits(hi));
    const double dhi = std::fabs(hi_value - x);
    std::uint16_t want = static_cast<std::uint16_t>(lo >> 16);
    if (dhi < dlo || (dhi == dlo && ((lo >> 16) & 1u))) want = static_cast<std::uint16_t>(hi >> 16);
    ASSERT_EQ(float_to_bf16(x).bits, want) << "x bits " << std::hex << u;
    ASSERT_EQ(bits(bf16_to_float(bf16{want})), static_cast<std::uint32_t>(want) << 16);
  }
}

TEST(DType, Bf16KeepsNanAndInf) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(float_to_bf16(inf).bits, 0x7f80u);
  EXPECT_EQ(float_to_bf16(-inf).bits, 0xff80u);
  // A NaN whose payload sits only in the low 16 bits must not become Inf.
  const float nan_low = from_bits(0x7f800001u);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(nan_low))));
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(-nan_low))));
  EXPECT_TRUE(std::signbit(bf16_to_float(float_to_bf16(-nan_low))));
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
}

TEST(DType, F16DecodesEveryValue) {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const float f = f16_to_float(f16{static_cast<std::uint16_t>(h)});
    const std::uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    const double sign = (h & 0x8000) ? -1.0 : 1.0;
    if (exp == 0x1f) {
      EXPECT_TRUE(mant ? std::isnan(f) : std::isinf(f)) << h;
      continue;
    }
    const double want = exp == 0
                            ? sign * std::ldexp(static_cast<double>(mant), -24)
                            : sign * std::ldexp(1.0 + mant / 1024.0, static_cast<int>(exp) - 15);
    ASSERT_EQ(static_cast<double>(f), want) << "half bits " << h;
    // Encoding the decoded value gives the same bits back.
    ASSERT_EQ(float_to_f16(f).bits, h) << "half bits " << h;
  }
}

TEST(DType, F16RoundsToNearestEven) {
  auto decode = [](std::uint16_t h) { return f16_to_float(f16{h}); };
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> mag(-26.0f, 17.0f);
  for (int i = 0; i < 300; ++i) {
    float x = std::exp2(mag(rng)) * ((rng() & 1) ? -1.0f : 1.0f);
    if (std::fabs(x) >= 65520.0f) continue;
    ASSERT_EQ(float_to_f16(x).bits, nearest_even(x, decode)) << "x = " << x;
  }
  // Halfway cases: 2049 lies between 2048 and 2050 (spacing 2): ties to even mantissa (2048).
  EXPECT_EQ(f16_to_float(float_to_f16(2049.0f)), 2048.0f);
  EXPECT_EQ(f16_to_float(float_to_f16(2051.0f)), 2052.0f);
  // Overflow and the halfway point to Inf.
  EXPECT_EQ(f16_to_float(float_to_f16(65504.0f)), 65504.0f);
  EXPECT_EQ(f16_to_float(float_to_f16(65519.0f)), 65504.0f);
  EXPECT_TRUE(std::isinf(f16_to_float(float_to_f16(65520.0f))));
  // Smallest subnormal and half of it (a tie: rounds to even zero).
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -24)).bits, 1u);
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -25)).bits, 0u);
  EXPECT_EQ(float_to_f16(std::ldexp(1.5f, -25)).bits, 1u);
  EXPECT_TRUE(std::isnan(f16_to_float(float_to_f16(std::nanf("")))));
  EXPECT_TRUE(std::isnan(f16_to_float(float_to_f16(from_bits(0x7f800001u)))));
  EXPECT_EQ(float_to_f16(-std::numeric_limits<float>::infinity()).bits, 0xfc00u);
}

TEST(DType, ConvertHostRejectsIntegers) {
  float f = 1.0f;
  std::int32_t i = 0;
  EXPECT_THROW(convert_host(&i, DType::kI32, &f, DType::kF32, 1), InvalidArgument);
}

}  // namespace
}  // namespace meshtrain
