// LayerNorm on the CPU. Statistics in fp32 (two passes over the row: mean, then variance,
// which is stable where E[x^2] - E[x]^2 is not). Weight and bias gradients are reduced over
// fixed row chunks in order, so results do not depend on the thread count.
#include <cmath>
#include <vector>

#include "runtime/cpu/cpu_backend.hpp"
#include "runtime/cpu/parallel.hpp"

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
      float sum = 0.0f;
      for (std::int64_t j = 0; j < cols; ++j) sum += to_float(row[j]);
      const float m = sum / static_cast<float>(cols);
      float var = 0.0f;
      for (std::int64_t j = 0; j < cols; ++j) {
        const float d = to_float(row[j]) - m;
        var += d * d;
      }
      const float s = 1.0f / std::sqrt(var / static_cast<float>(cols) + eps);
      T* o = out + r * cols;
      for (std::int64_t j = 0; j < cols; ++j)
        o[j] = from_float<T>((to_float(row[j]) - m) * s * to_float(w[j]) + to_float(b[j]));
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
      std::vector<float> norm(static_cast<std::size_t>(cols)), dnorm(static_cast<std::size_t>(cols));
      const std::int64_t e = chunk_begin(c + 1, rows, chunks);
      for (std::int64_t r = chunk_begin(c, rows, chunks); r < e; ++r) {
        const T* xr = in + r * cols;
        const T* gr = g + r * cols;
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
        T* out = gx + r * cols;
        for (std::int64_t j = 0; j < cols; ++j) {
          float v = (dnorm[j] - dnorm_mean - norm[j] * dnorm_norm_mean) * rs[r];
          if (accumulate_dx) v += to_float(out[j]);
          out[j] = from_float<T>(v);
        }
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

}  // namespace meshtrain::cpu
