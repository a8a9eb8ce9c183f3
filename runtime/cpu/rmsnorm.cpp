// RMSNorm on the CPU (Llama, Qwen2). The mean square is taken in fp32 over the row (16 lanes
// with AVX-512, then the lanes added: another rounding order than the scalar path, but the same
// for every thread count). The forward rounds x * rstd to the dtype before the product with the
// weight, as Hugging Face's LlamaRMSNorm does. The weight gradient is reduced over fixed row
// chunks in order, so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "runtime/cpu/cpu_backend.hpp"
#include "runtime/cpu/parallel.hpp"
#include "runtime/cpu/simd.hpp"

namespace meshtrain::cpu {
namespace {

template <typename T>
float mean_square(const T* row, std::int64_t cols) {
#if MT_CPU_AVX512
  const int n = static_cast<int>(cols);
  __m512 acc = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    const __m512 v = load16(row + j, lanes_below(n - j));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  return _mm512_reduce_add_ps(acc) / static_cast<float>(cols);
#else
  float acc = 0.0f;
  for (std::int64_t j = 0; j < cols; ++j) {
    const float v = to_float(row[j]);
    acc += v * v;
  }
  return acc / static_cast<float>(cols);
#endif
}

// y = w * round(x * s) for one row.
template <typename T>
void scale_row(T* out, const T* row, const T* w, float s, std::int64_t cols) {
#if MT_CPU_AVX512
  const int n = static_cast<int>(cols);
  const __m512 vs = _mm512_set1_ps(s);
  for (int j = 0; j < n; j += 16) {
    const __mmask16 k = lanes_below(n - j);
    const __m512 xn = round_as(T{}, _mm512_mul_ps(load16(row + j, k), vs));
    store16(out + j, _mm512_mul_ps(xn, load16(w + j, k)), k);
  }
#else
  for (std::int64_t j = 0; j < cols; ++j) {
    const float xn = to_float(from_float<T>(to_float(row[j]) * s));
    out[j] = from_float<T>(xn * to_float(w[j]));
  }
#endif
}

}  // namespace

void CpuBackend::rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& weight,
                                 std::int64_t rows, std::int64_t cols, float eps) {
  float* rs = static_cast<float*>(rstd.data());
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(x.data());
    const T* w = static_cast<const T*>(weight.data());
    T* out = static_cast<T*>(y.data());
#pragma omp parallel for schedule(static) if (rows * cols > kParallelGrain)
    for (std::int64_t r = 0; r < rows; ++r) {
      const float s = 1.0f / std::sqrt(mean_square(in + r * cols, cols) + eps);
      scale_row(out + r * cols, in + r * cols, w, s, cols);
      rs[r] = s;
    }
  });
}

// Not fused on the CPU: the same calls (and so the same bits) as add then rmsnorm_forward.
void CpuBackend::residual_rmsnorm_forward(Tensor& sum, Tensor& y, Tensor& rstd, const Tensor& a,
                                          const Tensor& b, const Tensor& weight, std::int64_t rows,
                                          std::int64_t cols, float eps) {
  add(sum, a, b);
  rmsnorm_forward(y, rstd, sum, weight, rows, cols, eps);
}

// With n = x * rstd and dn = dy * w: dx = rstd * (dn - n * mean(dn * n)), dweight += dy * n.
void CpuBackend::rmsnorm_backward(Tensor& dx, Tensor& dweight, const Tensor& dy, const Tensor& x,
                                  const Tensor& weight, const Tensor& rstd, std::int64_t rows,
                                  std::int64_t cols, bool accumulate_dx) {
  const float* rs = static_cast<const float*>(rstd.data());
  float* dw = static_cast<float*>(dweight.data());
  const std::int64_t chunks = chunk_count(rows, 16, 64);
  std::vector<float> partial(static_cast<std::size_t>(chunks * cols), 0.0f);
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(x.data());
    const T* g = static_cast<const T*>(dy.data());
    const T* w = static_cast<const T*>(weight.data());
    T* gx = static_cast<T*>(dx.data());
#pragma omp parallel for schedule(static) if (chunks > 1 && rows * cols > kParallelGrain)
    for (std::int64_t c = 0; c < chunks; ++c) {
      float* pdw = partial.data() + c * cols;
      const std::int64_t e = chunk_begin(c + 1, rows, chunks);
      for (std::int64_t r = chunk_begin(c, rows, chunks); r < e; ++r) {
        const T* xr = in + r * cols;
        const T* gr = g + r * cols;
        T* out = gx + r * cols;
        const float s = rs[r];
#if MT_CPU_AVX512
        const int n = static_cast<int>(cols);
        const __m512 vs = _mm512_set1_ps(s);
        __m512 acc = _mm512_setzero_ps();
        for (int j = 0; j < n; j += 16) {
          const __mmask16 k = lanes_below(n - j);
          const __m512 nv = _mm512_mul_ps(load16(xr + j, k), vs);
          const __m512 gv = load16(gr + j, k);
          acc = _mm512_fmadd_ps(_mm512_mul_ps(gv, load16(w + j, k)), nv, acc);
          store16(pdw + j, _mm512_fmadd_ps(gv, nv, load16(pdw + j, k)), k);
        }
        const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(acc) / static_cast<float>(cols));
        for (int j = 0; j < n; j += 16) {
          const __mmask16 k = lanes_below(n - j);
          const __m512 nv = _mm512_mul_ps(load16(xr + j, k), vs);
          const __m512 dn = _mm512_mul_ps(load16(gr + j, k), load16(w + j, k));
          __m512 v = _mm512_mul_ps(_mm512_fnmadd_ps(nv, dot, dn), vs);
          if (accumulate_dx) v = _mm512_add_ps(v, load16(out + j, k));
          store16(out + j, v, k);
        }
#else
        float dot = 0.0f;
        for (std::int64_t j = 0; j < cols; ++j) {
          const float nv = to_float(xr[j]) * s;
          const float gv = to_float(gr[j]);
          dot += gv * to_float(w[j]) * nv;
          pdw[j] += gv * nv;
        }
        dot /= static_cast<float>(cols);
        for (std::int64_t j = 0; j < cols; ++j) {
          const float nv = to_float(xr[j]) * s;
          float v = (to_float(gr[j]) * to_float(w[j]) - nv * dot) * s;
          if (accumulate_dx) v += to_float(out[j]);
          out[j] = from_float<T>(v);
        }
#endif
      }
    }
  });
  for (std::int64_t c = 0; c < chunks; ++c) {
    const float* pdw = partial.data() + c * cols;
    for (std::int64_t j = 0; j < cols; ++j) dw[j] += pdw[j];
  }
}

}  // namespace meshtrain::cpu
