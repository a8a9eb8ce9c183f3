// AVX-512 building blocks shared by the CPU kernels: masked loads and stores of 16 lanes in
// every float dtype (widened to fp32), and a vectorised exp. MT_CPU_AVX512 says whether the
// build targets AVX-512 (F, BW, VL); kernels keep a scalar path for other processors.
#pragma once

#include <bit>
#include <cstdint>

#include "runtime/dtype.hpp"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// GCC 12's AVX-512 headers start from _mm512_undefined_*(), which -Wmaybe-uninitialized takes
// for a read of an uninitialised value once inlined (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define MT_CPU_AVX512 1
#else
#define MT_CPU_AVX512 0
#endif

namespace meshtrain::cpu {

#if MT_CPU_AVX512
// The first n lanes (none for n <= 0, all for n >= 16).
inline __mmask16 lanes_below(int n) {
  if (n <= 0) return 0;
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

// exp(x) as Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so that r is
// exact), exp(r) by a degree-7 minimax polynomial, 2^n by scalef. Within 2 ulp of exp; inputs
// below -104 give 0 (exp underflows there), as softmax wants for masked or tiny scores.
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// tanh(u) = sign(u) (1 - 2 / (exp(2|u|) + 1)): absolute error about 1e-7 (relative error grows
// near 0, where callers such as GELU add it to 1); saturates to +-1 and keeps NaN.
inline __m512 tanh512(__m512 u) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 a = _mm512_abs_ps(u);
  const __m512 e = exp512(_mm512_add_ps(a, a));
  const __m512 t = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(u), _mm512_set1_epi32(INT32_MIN));
  const __m512 r = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign));
  return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(u, u, _CMP_UNORD_Q), u);
}

inline __m512 load16(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
inline __m512 load16(const bf16* p, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const f16* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

inline void store16(float* p, __m512 v, __mmask16 m) {
  _mm512_mask_storeu_ps(p, m, v);
}
// The bf16 bits of 16 floats, rounded to nearest even as float_to_bf16 does.
inline __m256i bf16_bits(__m512 v) {
#if defined(__AVX512BF16__)
  return std::bit_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  // Round to nearest even as float_to_bf16 does, for finite values and infinities (a NaN whose
  // payload sits in the low 16 bits only may become an infinity: no caller stores such NaNs).
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
#endif
}
inline __m256i f16_bits(__m512 v) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

inline void store16(bf16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, bf16_bits(v));
}
inline void store16(f16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, f16_bits(v));
}

// v rounded to the precision of the storage type T (the tag's type) and widened back: what
// store16 then load16 would give, without the memory round trip.
inline __m512 round_as(float, __m512 v) {
  return v;
}
inline __m512 round_as(bf16, __m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits(v)), 16));
}
inline __m512 round_as(f16, __m512 v) {
  return _mm512_cvtph_ps(f16_bits(v));
}
#endif

}  // namespace meshtrain::cpu
