#include "runtime/dtype.hpp"

#include "runtime/error.hpp"

namespace meshtrain {

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::kF32:
      return "fp32";
    case DType::kBF16:
      return "bf16";
    case DType::kF16:
      return "fp16";
    case DType::kI32:
      return "int32";
  }
  return "?";
}

std::string_view dtype_safetensors_name(DType t) {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "F16";
    case DType::kI32:
      return "I32";
  }
  return "?";
}

DType parse_dtype(std::string_view text) {
  if (text == "fp32" || text == "F32" || text == "float32") return DType::kF32;
  if (text == "bf16" || text == "BF16" || text == "bfloat16") return DType::kBF16;
  if (text == "fp16" || text == "F16" || text == "float16") return DType::kF16;
  if (text == "int32" || text == "I32") return DType::kI32;
  MT_FAIL("unknown dtype '{}': expected one of fp32, bf16, fp16, int32 (or F32, BF16, F16, I32)",
          text);
}

float f16_to_float(f16 h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
  const std::uint32_t exp = (h.bits >> 10) & 0x1fu;
  std::uint32_t mant = h.bits & 0x3ffu;
  std::uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);  // Inf, or NaN with its payload
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {
    // Subnormal: normalise.
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    u = sign | ((112u - static_cast<std::uint32_t>(e)) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

f16 float_to_f16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) {
    return f16{static_cast<std::uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu))};  // quiet NaN
  }
  if (abs >= 0x477ff000u) {
    // >= 65520 rounds to Inf (65504 is the largest finite half; the halfway point rounds up).
    return f16{static_cast<std::uint16_t>(sign | 0x7c00u)};
  }
  if (abs < 0x38800000u) {
    // Result is subnormal or zero in fp16: scale into the subnormal grid, round to even.
    if (abs < 0x33000000u) return f16{sign};  // below half the smallest subnormal: +-0
    const std::uint32_t exp = abs >> 23;
    const std::uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126u - exp;  // 14..24 for exp 112..102
    std::uint32_t half = mant >> shift;
    const std::uint32_t rem = mant & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half & 1u))) ++half;
    return f16{static_cast<std::uint16_t>(sign | half)};
  }
  // Normal: rebias the exponent and round the mantissa to even; a carry into the exponent is
  // the correct result.
  std::uint32_t v = abs - (112u << 23);
  v += 0xfffu + ((v >> 13) & 1u);
  return f16{static_cast<std::uint16_t>(sign | (v >> 13))};
}

namespace {
template <typename D, typename S>
void convert_loop(D* dst, const S* src, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = from_float<D>(to_float(src[i]));
}
template <typename D>
void convert_to(D* dst, const void* src, DType src_type, std::size_t n) {
  switch (src_type) {
    case DType::kF32:
      convert_loop(dst, static_cast<const float*>(src), n);
      return;
    case DType::kBF16:
      convert_loop(dst, static_cast<const bf16*>(src), n);
      return;
    case DType::kF16:
      convert_loop(dst, static_cast<const f16*>(src), n);
      return;
    case DType::kI32:
      break;
  }
  MT_FAIL("cannot convert from {}: only float dtypes convert", dtype_name(src_type));
}
}  // namespace

void convert_host(void* dst, DType dst_type, const void* src, DType src_type, std::size_t n) {
  if (dst_type == src_type) {
    std::memcpy(dst, src, n * dtype_size(dst_type));
    return;
  }
  switch (dst_type) {
    case DType::kF32:
      convert_to(static_cast<float*>(dst), src, src_type, n);
      return;
    case DType::kBF16:
      convert_to(static_cast<bf16*>(dst), src, src_type, n);
      return;
    case DType::kF16:
      convert_to(static_cast<f16*>(dst), src, src_type, n);
      return;
    case DType::kI32:
      break;
  }
  MT_FAIL("cannot convert to {}: only float dtypes convert", dtype_name(dst_type));
}

}  // namespace meshtrain
