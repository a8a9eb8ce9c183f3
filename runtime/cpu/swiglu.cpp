// SwiGLU on the CPU (Llama, Qwen2 MLP): y = silu(gate) * up from a fused [rows, 2F] gate | up
// projection. The sigmoid is formed from e = exp(-|g|), which never overflows: s = 1 / (1 + e)
// for g >= 0 and e / (1 + e) below, so silu and its derivative go to exactly 0 (and 1) in the
// tails instead of meeting 0 * inf. Elementwise, so results do not depend on the thread count.
#include <cmath>

#include "runtime/cpu/cpu_backend.hpp"
#include "runtime/cpu/parallel.hpp"
#include "runtime/cpu/simd.hpp"

namespace meshtrain::cpu {
namespace {

inline float sigmoid(float g) {
  const float e = std::exp(-std::fabs(g));
  return (g >= 0.0f ? 1.0f : e) / (1.0f + e);
}

#if MT_CPU_AVX512
inline __m512 sigmoid512(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
  const __m512 num =
      _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ), one);
  return _mm512_div_ps(num, _mm512_add_ps(one, e));
}
#endif

template <typename T>
void forward_row(T* y, const T* gate, const T* up, int n) {
  int j = 0;
#if MT_CPU_AVX512
  for (; j < n; j += 16) {
    const __mmask16 k = lanes_below(n - j);
    const __m512 g = load16(gate + j, k);
    const __m512 silu = _mm512_mul_ps(g, sigmoid512(g));
    store16(y + j, _mm512_mul_ps(silu, load16(up + j, k)), k);
  }
#endif
  for (; j < n; ++j) {
    const float g = to_float(gate[j]);
    y[j] = from_float<T>(g * sigmoid(g) * to_float(up[j]));
  }
}

// dgate = dy * up * s (1 + g (1 - s)), dup = dy * g * s. dgate and dup may alias gate and up:
// each element is read before it is written.
template <typename T>
void backward_row(T* dgate, T* dup, const T* dy, const T* gate, const T* up, int n) {
  int j = 0;
#if MT_CPU_AVX512
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; j < n; j += 16) {
    const __mmask16 k = lanes_below(n - j);
    const __m512 g = load16(gate + j, k);
    const __m512 u = load16(up + j, k);
    const __m512 d = load16(dy + j, k);
    const __m512 s = sigmoid512(g);
    const __m512 slope = _mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one));
    store16(dgate + j, _mm512_mul_ps(_mm512_mul_ps(d, u), slope), k);
    store16(dup + j, _mm512_mul_ps(d, _mm512_mul_ps(g, s)), k);
  }
#endif
  for (; j < n; ++j) {
    const float g = to_float(gate[j]), u = to_float(up[j]), d = to_float(dy[j]);
    const float s = sigmoid(g);
    dgate[j] = from_float<T>(d * u * (s * (1.0f + g * (1.0f - s))));
    dup[j] = from_float<T>(d * (g * s));
  }
}

}  // namespace

void CpuBackend::swiglu_forward(Tensor& y, const Tensor& x, std::int64_t rows,
                                std::int64_t hidden) {
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(x.data());
    T* out = static_cast<T*>(y.data());
    const int n = static_cast<int>(hidden);
#pragma omp parallel for schedule(static) if (rows * hidden > kParallelGrain)
    for (std::int64_t r = 0; r < rows; ++r)
      forward_row(out + r * hidden, in + 2 * r * hidden, in + (2 * r + 1) * hidden, n);
  });
}

void CpuBackend::swiglu_backward(Tensor& dx, const Tensor& dy, const Tensor& x, std::int64_t rows,
                                 std::int64_t hidden) {
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(x.data());
    const T* g = static_cast<const T*>(dy.data());
    T* gx = static_cast<T*>(dx.data());
    const int n = static_cast<int>(hidden);
#pragma omp parallel for schedule(static) if (rows * hidden > kParallelGrain)
    for (std::int64_t r = 0; r < rows; ++r)
      backward_row(gx + 2 * r * hidden, gx + (2 * r + 1) * hidden, g + r * hidden,
                   in + 2 * r * hidden, in + (2 * r + 1) * hidden, n);
  });
}

}  // namespace meshtrain::cpu
