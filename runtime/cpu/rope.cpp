// Rotary position embeddings on the CPU, "rotate_half" style: in each rotated head of D, the
// pair (x_j, x_{j+D/2}) turns by the angle of table row pos (cos in the row's first half, sin in
// its second). The backward turns by minus the angle. fp32 math, one rounding; elementwise per
// row, so results do not depend on the thread count.
#include <algorithm>
#include <cstring>

#include "runtime/cpu/cpu_backend.hpp"
#include "runtime/cpu/parallel.hpp"
#include "runtime/cpu/simd.hpp"

namespace meshtrain::cpu {
namespace {

// One head: y1 = x1 c - x2 s, y2 = x2 c + x1 s, with s negated by the caller for the inverse.
// y may alias x (each element is read before it is written).
template <typename T>
void rotate_head(T* y, const T* x, const float* cs, const float* sn, int half, float sign) {
  int j = 0;
#if MT_CPU_AVX512
  const __m512 vsign = _mm512_set1_ps(sign);
  for (; j < half; j += 16) {
    const __mmask16 k = lanes_below(half - j);
    const __m512 x1 = load16(x + j, k), x2 = load16(x + half + j, k);
    const __m512 c = load16(cs + j, k), s = _mm512_mul_ps(load16(sn + j, k), vsign);
    store16(y + j, _mm512_fmsub_ps(x1, c, _mm512_mul_ps(x2, s)), k);
    store16(y + half + j, _mm512_fmadd_ps(x2, c, _mm512_mul_ps(x1, s)), k);
  }
#endif
  for (; j < half; ++j) {
    const float x1 = to_float(x[j]), x2 = to_float(x[half + j]);
    const float c = cs[j], s = sn[j] * sign;
    y[j] = from_float<T>(x1 * c - x2 * s);
    y[half + j] = from_float<T>(x2 * c + x1 * s);
  }
}

}  // namespace

void CpuBackend::rope(Tensor& y, const Tensor& x, const Tensor& table, int batch, int seq,
                      int rot_heads, int heads, int head_dim, int pos0, bool inverse) {
  const float* tab = static_cast<const float*>(table.data());
  const std::int64_t rows = static_cast<std::int64_t>(batch) * seq;
  const std::int64_t width = static_cast<std::int64_t>(heads) * head_dim;
  const std::int64_t rotated = static_cast<std::int64_t>(rot_heads) * head_dim;
  const int half = head_dim / 2;
  const float sign = inverse ? -1.0f : 1.0f;
  const bool copy_rest = y.data() != x.data();
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(x.data());
    T* out = static_cast<T*>(y.data());
#pragma omp parallel for schedule(static) if (rows * width > kParallelGrain)
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* cs = tab + (pos0 + r % seq) * static_cast<std::int64_t>(head_dim);
      const T* xr = in + r * width;
      T* yr = out + r * width;
      for (int h = 0; h < rot_heads; ++h)
        rotate_head(yr + static_cast<std::int64_t>(h) * head_dim,
                    xr + static_cast<std::int64_t>(h) * head_dim, cs, cs + half, half, sign);
      if (copy_rest)
        std::memcpy(yr + rotated, xr + rotated,
                    static_cast<std::size_t>(width - rotated) * sizeof(T));
    }
  });
}

}  // namespace meshtrain::cpu
