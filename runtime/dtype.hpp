// Element types and the 16-bit float conversions.
//
// Conversions from fp32 round to nearest, ties to even. NaN stays NaN (quiet, sign kept) and
// Inf stays Inf; fp32 values beyond the fp16 range become Inf, as IEEE rounding says.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace meshtrain {

enum class DType : std::uint8_t { kF32, kBF16, kF16, kI32 };

inline constexpr std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::kF32:
      return 4;
    case DType::kI32:
      return 4;
    case DType::kBF16:
      return 2;
    case DType::kF16:
      return 2;
  }
  return 0;
}

inline constexpr bool is_floating(DType t) {
  return t != DType::kI32;
}

// "fp32", "bf16", "fp16", "int32".
std::string_view dtype_name(DType t);
// Accepts the names above and the safetensors names ("F32", "BF16", "F16", "I32").
// Throws InvalidArgument naming the text and the accepted values.
DType parse_dtype(std::string_view text);
// The safetensors spelling: "F32", "BF16", "F16", "I32".
std::string_view dtype_safetensors_name(DType t);

// Storage types for the 16-bit floats: plain bits, so that they are trivially copyable and
// never converted by accident.
struct bf16 {
  std::uint16_t bits;
};
struct f16 {
  std::uint16_t bits;
};

inline float bf16_to_float(bf16 h) {
  std::uint32_t u = static_cast<std::uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16 float_to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    // NaN: keep the sign and the top payload bits, and force the quiet bit so that a payload
    // held only in the low bits cannot turn into Inf.
    return bf16{static_cast<std::uint16_t>((u >> 16) | 0x0040u)};
  }
  // Round to nearest even: add 0x7fff plus the lowest kept bit. Overflow to Inf is correct.
  std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<std::uint16_t>((u + rounding) >> 16)};
}

float f16_to_float(f16 h);
f16 float_to_f16(float f);

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::kF32;
};
template <>
struct DTypeOf<bf16> {
  static constexpr DType value = DType::kBF16;
};
template <>
struct DTypeOf<f16> {
  static constexpr DType value = DType::kF16;
};
template <>
struct DTypeOf<std::int32_t> {
  static constexpr DType value = DType::kI32;
};

// Load and store any float storage type as fp32.
inline float to_float(float x) {
  return x;
}
inline float to_float(bf16 x) {
  return bf16_to_float(x);
}
inline float to_float(f16 x) {
  return f16_to_float(x);
}
template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) {
  return x;
}
template <>
inline bf16 from_float<bf16>(float x) {
  return float_to_bf16(x);
}
template <>
inline f16 from_float<f16>(float x) {
  return float_to_f16(x);
}

// Converts n elements between float dtypes (host memory). Same dtype copies.
void convert_host(void* dst, DType dst_type, const void* src, DType src_type, std::size_t n);

}  // namespace meshtrain
