// Elementwise CPU ops: residual add, GELU, dtype conversion, scaling, reductions.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "runtime/cpu/cpu_backend.hpp"
#include "runtime/cpu/parallel.hpp"
#include "runtime/cpu/simd.hpp"

namespace meshtrain::cpu {
namespace {

constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCube = 0.044715f;

}  // namespace

void CpuBackend::add(Tensor& out, const Tensor& a, const Tensor& b) {
  const std::int64_t n = out.numel();
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* o = static_cast<T*>(out.data());
    const T* x = static_cast<const T*>(a.data());
    const T* y = static_cast<const T*>(b.data());
#pragma omp parallel for schedule(static) if (n > kParallelGrain)
    for (std::int64_t i = 0; i < n; ++i) o[i] = from_float<T>(to_float(x[i]) + to_float(y[i]));
  });
}

// GELU, tanh form: y = x/2 (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3). Vectorised over
// 16 lanes (tanh through exp, see simd.hpp) in fixed chunks; elementwise, so the result does not
// depend on the thread count.
namespace {

#if MT_CPU_AVX512
inline __m512 gelu_inner(__m512 v) {  // u
  const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
  return _mm512_mul_ps(_mm512_set1_ps(kGeluScale),
                       _mm512_fmadd_ps(_mm512_set1_ps(kGeluCube), v3, v));
}
#endif

template <typename T>
void gelu_forward_range(T* out, const T* in, std::int64_t n) {
  std::int64_t i = 0;
#if MT_CPU_AVX512
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  for (; i < n; i += 16) {
    const __mmask16 m = lanes_below(static_cast<int>(std::min<std::int64_t>(n - i, 16)));
    const __m512 v = load16(in + i, m);
    const __m512 th = tanh512(gelu_inner(v));
    store16(out + i, _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, th)), m);
  }
#endif
  for (; i < n; ++i) {
    const float v = to_float(in[i]);
    const float u = kGeluScale * (v + kGeluCube * v * v * v);
    out[i] = from_float<T>(0.5f * v * (1.0f + std::tanh(u)));
  }
}

// dx = dy (1/2 (1 + tanh u) + x/2 sech^2(u) du/dx). Where tanh saturates (|x| > ~5) sech^2 is
// 0 and the second term vanishes; computing it anyway would give 0 x inf = NaN once x^2
// overflows (|x| > ~5e19), so it is masked to 0 there.
template <typename T>
void gelu_backward_range(T* g_in, const T* g_out, const T* in, std::int64_t n) {
  std::int64_t i = 0;
#if MT_CPU_AVX512
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  const __m512 slope_c = _mm512_set1_ps(0.5f * kGeluScale);
  const __m512 cube3 = _mm512_set1_ps(3.0f * kGeluCube);
  for (; i < n; i += 16) {
    const __mmask16 m = lanes_below(static_cast<int>(std::min<std::int64_t>(n - i, 16)));
    const __m512 v = load16(in + i, m);
    const __m512 th = tanh512(gelu_inner(v));
    const __m512 sech2 = _mm512_fnmadd_ps(th, th, one);
    const __m512 dudx = _mm512_fmadd_ps(_mm512_mul_ps(cube3, v), v, one);
    const __m512 slope =
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(sech2, _mm512_setzero_ps(), _CMP_GT_OQ),
                            _mm512_mul_ps(_mm512_mul_ps(slope_c, v), _mm512_mul_ps(sech2, dudx)));
    const __m512 local = _mm512_fmadd_ps(half, _mm512_add_ps(one, th), slope);
    store16(g_in + i, _mm512_mul_ps(local, load16(g_out + i, m)), m);
  }
#endif
  for (; i < n; ++i) {
    const float v = to_float(in[i]);
    const float u = kGeluScale * (v + kGeluCube * v * v * v);
    const float th = std::tanh(u);
    const float sech2 = 1.0f - th * th;
    const float slope =
        sech2 > 0.0f ? 0.5f * v * sech2 * kGeluScale * (1.0f + 3.0f * kGeluCube * v * v) : 0.0f;
    const float local = 0.5f * (1.0f + th) + slope;
    g_in[i] = from_float<T>(local * to_float(g_out[i]));
  }
}

}  // namespace

void CpuBackend::gelu_forward(Tensor& y, const Tensor& x) {
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* out = static_cast<T*>(y.data());
    const T* in = static_cast<const T*>(x.data());
    for_lane_chunks(x.numel(), [&](std::int64_t b, std::int64_t e) {
      gelu_forward_range(out + b, in + b, e - b);
    });
  });
}

void CpuBackend::gelu_backward(Tensor& dx, const Tensor& dy, const Tensor& x) {
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* g_in = static_cast<T*>(dx.data());
    const T* g_out = static_cast<const T*>(dy.data());
    const T* in = static_cast<const T*>(x.data());
    for_lane_chunks(x.numel(), [&](std::int64_t b, std::int64_t e) {
      gelu_backward_range(g_in + b, g_out + b, in + b, e - b);
    });
  });
}

void CpuBackend::convert(Tensor& dst, const Tensor& src) {
  const std::int64_t n = dst.numel();
  const std::int64_t chunks = chunk_count(n, kParallelGrain, 256);
  const std::size_t dsz = dtype_size(dst.dtype()), ssz = dtype_size(src.dtype());
  auto* d = static_cast<std::uint8_t*>(dst.data());
  const auto* s = static_cast<const std::uint8_t*>(src.data());
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (std::int64_t c = 0; c < chunks; ++c) {
    const std::int64_t b = chunk_begin(c, n, chunks), e = chunk_begin(c + 1, n, chunks);
    convert_host(d + b * dsz, dst.dtype(), s + b * ssz, src.dtype(),
                 static_cast<std::size_t>(e - b));
  }
}

void CpuBackend::scale(Tensor& x, float alpha) {
  const std::int64_t n = x.numel();
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = static_cast<T*>(x.data());
#pragma omp parallel for schedule(static) if (n > kParallelGrain)
    for (std::int64_t i = 0; i < n; ++i) p[i] = from_float<T>(to_float(p[i]) * alpha);
  });
}

double CpuBackend::sum_of_squares(const Tensor& x) {
  const std::int64_t n = x.numel();
  const std::int64_t chunks = chunk_count(n, 8192, 256);
  std::vector<double> partial(static_cast<std::size_t>(chunks), 0.0);
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* p = static_cast<const T*>(x.data());
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (std::int64_t c = 0; c < chunks; ++c) {
      // fp32 lanes within a short run, fp64 across runs: exact enough and vectorisable.
      double acc = 0.0;
      const std::int64_t e = chunk_begin(c + 1, n, chunks);
      for (std::int64_t i = chunk_begin(c, n, chunks); i < e; i += 256) {
        float run = 0.0f;
        const std::int64_t stop = std::min(e, i + 256);
        for (std::int64_t j = i; j < stop; ++j) {
          const float v = to_float(p[j]);
          run += v * v;
        }
        if (!std::isfinite(run)) {
          // Squares beyond fp32's range (|x| > ~1.8e19) or a non-finite element: redo the run
          // in fp64, which keeps the first finite and the second non-finite.
          double exact = 0.0;
          for (std::int64_t j = i; j < stop; ++j) {
            const double v = to_float(p[j]);
            exact += v * v;
          }
          acc += exact;
          continue;
        }
        acc += run;
      }
      partial[static_cast<std::size_t>(c)] = acc;
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

void CpuBackend::token_range(const Tensor& tokens, std::int32_t& min_id, std::int64_t& min_at,
                             std::int32_t& max_id, std::int64_t& max_at) {
  const std::int32_t* t = static_cast<const std::int32_t*>(tokens.data());
  const std::int64_t n = tokens.numel();
  min_id = std::numeric_limits<std::int32_t>::max();
  max_id = std::numeric_limits<std::int32_t>::min();
  min_at = max_at = -1;
  for (std::int64_t i = 0; i < n; ++i) {
    if (t[i] < min_id) {
      min_id = t[i];
      min_at = i;
    }
    if (t[i] > max_id) {
      max_id = t[i];
      max_at = i;
    }
  }
}

void CpuBackend::bias_backward(Tensor& dbias, const Tensor& dy, std::int64_t rows,
                               std::int64_t cols) {
  float* db = static_cast<float*>(dbias.data());
  const std::int64_t chunks = chunk_count(rows, 64, 64);
  std::vector<float> partial(static_cast<std::size_t>(chunks * cols), 0.0f);
  dispatch_float(dy.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* g = static_cast<const T*>(dy.data());
#pragma omp parallel for schedule(static) if (chunks > 1 && rows * cols > kParallelGrain)
    for (std::int64_t c = 0; c < chunks; ++c) {
      float* acc = partial.data() + c * cols;
      const std::int64_t e = chunk_begin(c + 1, rows, chunks);
      for (std::int64_t r = chunk_begin(c, rows, chunks); r < e; ++r) {
        const T* row = g + r * cols;
        for (std::int64_t j = 0; j < cols; ++j) acc[j] += to_float(row[j]);
      }
    }
  });
  for (std::int64_t c = 0; c < chunks; ++c)
    for (std::int64_t j = 0; j < cols; ++j)
      db[j] += partial[static_cast<std::size_t>(c * cols + j)];
}

}  // namespace meshtrain::cpu
