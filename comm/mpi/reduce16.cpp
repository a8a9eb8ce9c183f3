#include "comm/mpi/reduce16.hpp"

#include <algorithm>
#include <bit>
#include <cstdint>

#include "runtime/error.hpp"

namespace meshtrain::comm::detail {
namespace {

// bf16 <-> fp32 in integer arithmetic, written so that the compiler vectorises the loops (a
// branch-free select for NaN). Same results as runtime/dtype.hpp.
inline float bf16_bits_to_float(std::uint16_t b) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

inline std::uint16_t float_to_bf16_bits(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const std::uint32_t quiet_nan = (u >> 16) | 0x40u;
  return static_cast<std::uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

#if (defined(__F16C__) || defined(__AVX512FP16__)) && defined(__FLT16_MAX__)
// The hardware conversions (vcvtph2ps / vcvtps2ph) round to nearest even, like float_to_f16.
// (__FLT16_MAX__: the compiler has _Float16 on this target; clang 14 has it only with
// AVX512-FP16.)
using Half = _Float16;
inline float f16_bits_to_float(std::uint16_t b) {
  return static_cast<float>(std::bit_cast<Half>(b));
}
inline std::uint16_t float_to_f16_bits(float f) {
  return std::bit_cast<std::uint16_t>(static_cast<Half>(f));
}
#else
inline float f16_bits_to_float(std::uint16_t b) {
  return f16_to_float(f16{b});
}
inline std::uint16_t float_to_f16_bits(float f) {
  return float_to_f16(f).bits;
}
#endif

struct Bf16Codec {
  static float load(std::uint16_t b) { return bf16_bits_to_float(b); }
  static std::uint16_t store(float f) { return float_to_bf16_bits(f); }
};
struct F16Codec {
  static float load(std::uint16_t b) { return f16_bits_to_float(b); }
  static std::uint16_t store(float f) { return float_to_f16_bits(f); }
};

struct Add {
  static float apply(float a, float b) { return a + b; }
};
struct Max {
  static float apply(float a, float b) { return a > b ? a : b; }
};
struct Min {
  static float apply(float a, float b) { return a < b ? a : b; }
};

template <typename Codec, typename Op>
void reduce_loop(const std::uint16_t* __restrict in, std::uint16_t* __restrict inout,
                 std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    inout[i] = Codec::store(Op::apply(Codec::load(in[i]), Codec::load(inout[i])));
  }
}

template <typename Codec>
void reduce_codec(ReduceOp op, const std::uint16_t* in, std::uint16_t* inout, std::size_t n) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      reduce_loop<Codec, Add>(in, inout, n);
      return;
    case ReduceOp::kMax:
      reduce_loop<Codec, Max>(in, inout, n);
      return;
    case ReduceOp::kMin:
      reduce_loop<Codec, Min>(in, inout, n);
      return;
  }
}

// Loads and stores of fp32 data, so that the fp32 loops share the templates.
struct F32Codec {
  static float load(float f) { return f; }
  static float store(float f) { return f; }
};

template <typename Codec, typename T, typename Op, bool kScale>
void reduce3_loop(const T* a, const T* __restrict b, T* out, std::size_t n, float scale) {
  for (std::size_t i = 0; i < n; ++i) {
    float v = Op::apply(Codec::load(a[i]), Codec::load(b[i]));
    if constexpr (kScale) v *= scale;
    out[i] = Codec::store(v);
  }
}

template <typename Codec, typename T>
void reduce3_codec(ReduceOp op, const void* a, const void* b, void* out, std::size_t n,
                   float scale) {
  const T* pa = static_cast<const T*>(a);
  const T* pb = static_cast<const T*>(b);
  T* po = static_cast<T*>(out);
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      if (scale != 1.0f) {
        reduce3_loop<Codec, T, Add, true>(pa, pb, po, n, scale);
      } else {
        reduce3_loop<Codec, T, Add, false>(pa, pb, po, n, scale);
      }
      return;
    case ReduceOp::kMax:
      reduce3_loop<Codec, T, Max, false>(pa, pb, po, n, scale);
      return;
    case ReduceOp::kMin:
      reduce3_loop<Codec, T, Min, false>(pa, pb, po, n, scale);
      return;
  }
}

template <typename Codec>
void widen_loop(const std::uint16_t* __restrict src, float* __restrict dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = Codec::load(src[i]);
}

template <typename Codec>
void narrow_loop(const float* __restrict src, std::uint16_t* __restrict dst, std::size_t n,
                 float scale) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = Codec::store(src[i] * scale);
}

template <typename Codec>
void scale_loop(std::uint16_t* x, std::size_t n, float scale) {
  for (std::size_t i = 0; i < n; ++i) x[i] = Codec::store(Codec::load(x[i]) * scale);
}

}  // namespace

void reduce16(DType dtype, ReduceOp op, const void* in, void* inout, std::size_t n) {
  const auto* a = static_cast<const std::uint16_t*>(in);
  auto* b = static_cast<std::uint16_t*>(inout);
  switch (dtype) {
    case DType::kBF16:
      reduce_codec<Bf16Codec>(op, a, b, n);
      return;
    case DType::kF16:
      reduce_codec<F16Codec>(op, a, b, n);
      return;
    default:
      break;
  }
  MT_ASSERT(false, "reduce16 on {}", dtype_name(dtype));
}

void reduce_into(DType dtype, ReduceOp op, const void* a, const void* b, void* out, std::size_t n,
                 float scale) {
  switch (dtype) {
    case DType::kF32:
      reduce3_codec<F32Codec, float>(op, a, b, out, n, scale);
      return;
    case DType::kBF16:
      reduce3_codec<Bf16Codec, std::uint16_t>(op, a, b, out, n, scale);
      return;
    case DType::kF16:
      reduce3_codec<F16Codec, std::uint16_t>(op, a, b, out, n, scale);
      return;
    case DType::kI32:
      break;
  }
  MT_ASSERT(false, "reduce_into on {}", dtype_name(dtype));
}

void widen16(DType dtype, const void* src, float* dst, std::size_t n) {
  const auto* s = static_cast<const std::uint16_t*>(src);
  switch (dtype) {
    case DType::kBF16:
      widen_loop<Bf16Codec>(s, dst, n);
      return;
    case DType::kF16:
      widen_loop<F16Codec>(s, dst, n);
      return;
    default:
      break;
  }
  MT_ASSERT(false, "widen16 on {}", dtype_name(dtype));
}

void narrow16(DType dtype, const float* src, void* dst, std::size_t n, float scale) {
  auto* d = static_cast<std::uint16_t*>(dst);
  switch (dtype) {
    case DType::kBF16:
      narrow_loop<Bf16Codec>(src, d, n, scale);
      return;
    case DType::kF16:
      narrow_loop<F16Codec>(src, d, n, scale);
      return;
    default:
      break;
  }
  MT_ASSERT(false, "narrow16 to {}", dtype_name(dtype));
}

void scale_inplace(DType dtype, void* x, std::size_t n, float scale) {
  switch (dtype) {
    case DType::kF32: {
      auto* f = static_cast<float*>(x);
      for (std::size_t i = 0; i < n; ++i) f[i] *= scale;
      return;
    }
    case DType::kBF16:
      scale_loop<Bf16Codec>(static_cast<std::uint16_t*>(x), n, scale);
      return;
    case DType::kF16:
      scale_loop<F16Codec>(static_cast<std::uint16_t*>(x), n, scale);
      return;
    case DType::kI32:
      break;
  }
  MT_ASSERT(false, "scale_inplace on {}", dtype_name(dtype));
}

}  // namespace meshtrain::comm::detail
