// LayerNorm on the CPU. Statistics in fp32 (two passes over the row: mean, then variance,
// which is stable where E[x^2] - E[x]^2 is not). Weight and bias gradients are reduced over
// fixed row chunks in order, so results do not depend on the thread count. With AVX-512, row
// sums run in 16 lanes (then the lanes are added): another rounding order than the scalar path,
// but the same for every thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "runtime/cpu/cpu_backend.hpp"
#include "runtime/cpu/parallel.hpp"
#include "runtime/cpu/simd.hpp"

namespace meshtrain::cpu {

void CpuBackend::layernorm_forward(Tensor& y, Tensor& mean, Tensor& rstd, const Tensor& x,
                                   const Tensor& weight, const Tensor& bias, std::int64_t rows,
                                   std::int64_t cols, float eps) {
  float* mu = static_cast<float*>(mean.data());
  float* rs = static_cast<float*>(rstd.data());
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(x.data());
    const T* w = static_cast<const T*>(weight.data());
    const T* b = static_cast<const T*>(bias.data());
    T* out = static_cast<T*>(y.data());
#pragma omp parallel for schedule(static) if (rows * cols > kParallelGrain)
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* row = in + r * cols;
      T* o = out + r * cols;
#if MT_CPU_AVX512
      const int n = static_cast<int>(cols);
      __m512 acc = _mm512_setzero_ps();
      for (int j = 0; j < n; j += 16) acc = _mm512_add_ps(acc, load16(row + j, lanes_below(n - j)));
      const float m = _mm512_reduce_add_ps(acc) / static_cast<float>(cols);
      const __m512 vm = _mm512_set1_ps(m);
      acc = _mm512_setzero_ps();
      for (int j = 0; j < n; j += 16) {
        const __mmask16 k = lanes_below(n - j);
        const __m512 d = _mm512_maskz_sub_ps(k, load16(row + j, k), vm);
        acc = _mm512_fmadd_ps(d, d, acc);
      }
      const float var = _mm512_reduce_add_ps(acc);
      const float s = 1.0f / std::sqrt(var / static_cast<float>(cols) + eps);
      const __m512 vs = _mm512_set1_ps(s);
      for (int j = 0; j < n; j += 16) {
        const __mmask16 k = lanes_below(n - j);
        const __m512 xn = _mm512_mul_ps(_mm512_sub_ps(load16(row + j, k), vm), vs);
        store16(o + j, _mm512_fmadd_ps(xn, load16(w + j, k), load16(b + j, k)), k);
      }
#else
      float sum = 0.0f;
      for (std::int64_t j = 0; j < cols; ++j) sum += to_float(row[j]);
      const float m = sum / static_cast<float>(cols);
      float var = 0.0f;
      for (std::int64_t j = 0; j < cols; ++j) {
        const float d = to_float(row[j]) - m;
        var += d * d;
      }
      const float s = 1.0f / std::sqrt(var / static_cast<float>(cols) + eps);
      for (std::int64_t j = 0; j < cols; ++j)
        o[j] = from_float<T>((to_float(row[j]) - m) * s * to_float(w[j]) + to_float(b[j]));
#endif
      mu[r] = m;
      rs[r] = s;
    }
  });
}

void CpuBackend::layernorm_backward(Tensor& dx, Tensor& dweight, Tensor& dbias, const Tensor& dy,
                                    const Tensor& x, const Tensor& weight, const Tensor& mean,
                                    const Tensor& rstd, std::int64_t rows, std::int64_t cols,
                                    bool accumulate_dx) {
  const float* mu = static_cast<const float*>(mean.data());
  const float* rs = static_cast<const float*>(rstd.data());
  float* dw = static_cast<float*>(dweight.data());
  float* db = static_cast<float*>(dbias.data());
  const std::int64_t chunks = chunk_count(rows, 16, 64);
  std::vector<float> partial(static_cast<std::size_t>(chunks * cols * 2), 0.0f);
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(x.data());
    const T* g = static_cast<const T*>(dy.data());
    const T* w = static_cast<const T*>(weight.data());
    T* gx = static_cast<T*>(dx.data());
#pragma omp parallel for schedule(static) if (chunks > 1 && rows * cols > kParallelGrain)
    for (std::int64_t c = 0; c < chunks; ++c) {
      float* pdw = partial.data() + c * cols * 2;
      float* pdb = pdw + cols;
      std::vector<float> norm(static_cast<std::size_t>(cols)),
          dnorm(static_cast<std::size_t>(cols));
      const std::int64_t e = chunk_begin(c + 1, rows, chunks);
      for (std::int64_t r = chunk_begin(c, rows, chunks); r < e; ++r) {
        const T* xr = in + r * cols;
        const T* gr = g + r * cols;
        T* out = gx + r * cols;
#if MT_CPU_AVX512
        const int n = static_cast<int>(cols);
        const __m512 vmu = _mm512_set1_ps(mu[r]), vrs = _mm512_set1_ps(rs[r]);
        __m512 acc_dn = _mm512_setzero_ps(), acc_dnn = _mm512_setzero_ps();
        for (int j = 0; j < n; j += 16) {
          const __mmask16 k = lanes_below(n - j);
          const __m512 nv = _mm512_maskz_mul_ps(k, _mm512_sub_ps(load16(xr + j, k), vmu), vrs);
          const __m512 gv = load16(gr + j, k);
          const __m512 dn = _mm512_mul_ps(gv, load16(w + j, k));
          store16(norm.data() + j, nv, k);
          store16(dnorm.data() + j, dn, k);
          acc_dn = _mm512_add_ps(acc_dn, dn);
          acc_dnn = _mm512_fmadd_ps(dn, nv, acc_dnn);
          store16(pdw + j, _mm512_fmadd_ps(gv, nv, load16(pdw + j, k)), k);
          store16(pdb + j, _mm512_add_ps(gv, load16(pdb + j, k)), k);
        }
        const __m512 dnorm_mean =
            _mm512_set1_ps(_mm512_reduce_add_ps(acc_dn) / static_cast<float>(cols));
        const __m512 dnorm_norm_mean =
            _mm512_set1_ps(_mm512_reduce_add_ps(acc_dnn) / static_cast<float>(cols));
        for (int j = 0; j < n; j += 16) {
          const __mmask16 k = lanes_below(n - j);
          __m512 v = _mm512_sub_ps(load16(dnorm.data() + j, k), dnorm_mean);
          v = _mm512_mul_ps(_mm512_fnmadd_ps(load16(norm.data() + j, k), dnorm_norm_mean, v), vrs);
          if (accumulate_dx) v = _mm512_add_ps(v, load16(out + j, k));
          store16(out + j, v, k);
        }
#else
        float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
        for (std::int64_t j = 0; j < cols; ++j) {
          const float nv = (to_float(xr[j]) - mu[r]) * rs[r];
          const float gv = to_float(gr[j]);
          const float dn = gv * to_float(w[j]);
          norm[j] = nv;
          dnorm[j] = dn;
          dnorm_mean += dn;
          dnorm_norm_mean += dn * nv;
          pdw[j] += gv * nv;
          pdb[j] += gv;
        }
        dnorm_mean /= static_cast<float>(cols);
        dnorm_norm_mean /= static_cast<float>(cols);
        for (std::int64_t j = 0; j < cols; ++j) {
          float v = (dnorm[j] - dnorm_mean - norm[j] * dnorm_norm_mean) * rs[r];
          if (accumulate_dx) v += to_float(out[j]);
          out[j] = from_float<T>(v);
        }
#endif
      }
    }
  });
  for (std::int64_t c = 0; c < chunks; ++c) {
    const float* pdw = partial.data() + c * cols * 2;
    for (std::int64_t j = 0; j < cols; ++j) {
      dw[j] += pdw[j];
      db[j] += pdw[cols + j];
    }
  }
}

// Not fused on the CPU: the same calls (and so the same bits) as add then layernorm_forward.
void CpuBackend::residual_layernorm_forward(Tensor& sum, Tensor& y, Tensor& mean, Tensor& rstd,
                                            const Tensor& a, const Tensor& b, const Tensor& weight,
                                            const Tensor& bias, std::int64_t rows,
                                            std::int64_t cols, float eps) {
  add(sum, a, b);
  layernorm_forward(y, mean, rstd, sum, weight, bias, rows, cols, eps);
}

}  // namespace meshtrain::cpu
