// AdamW on fp32 master weights, in the operation order of torch.optim.AdamW (decoupled decay
// first, then the moment updates, then the bias-corrected step) so that fp32 runs match it.
#include <cmath>
#include <type_traits>

#include "runtime/cpu/cpu_backend.hpp"
#include "runtime/cpu/parallel.hpp"
#include "runtime/cpu/simd.hpp"

namespace meshtrain::cpu {

void CpuBackend::adamw_update(Tensor& param, Tensor& master, const Tensor& grad, Tensor& m,
                              Tensor& v, const ops::AdamWParams& p) {
  const std::int64_t n = master.numel();
  float* w = static_cast<float*>(master.data());
  const float* g = static_cast<const float*>(grad.data());
  float* m1 = static_cast<float*>(m.data());
  float* m2 = static_cast<float*>(v.data());
  const float bc1 = 1.0f - std::pow(p.beta1, static_cast<float>(p.step));
  const float bc2 = 1.0f - std::pow(p.beta2, static_cast<float>(p.step));
  const float step_size = p.lr / bc1;
  const float bc2_sqrt = std::sqrt(bc2);
  const float decay = 1.0f - p.lr * p.weight_decay;
  // Locals, so that the compiler knows the stores below cannot change them.
  const float gs = p.grad_scale, b1 = p.beta1, b2 = p.beta2, eps = p.eps;
  auto update = [&](auto* out) {
    using T = std::remove_pointer_t<decltype(out)>;
    constexpr bool kOut = !std::is_same_v<T, std::nullptr_t>;
    for_lane_chunks(n, [&](std::int64_t i, std::int64_t end) {
#if MT_CPU_AVX512
      // The same operations in the same order as the scalar loop below, 16 lanes at a time.
      const __m512 vgs = _mm512_set1_ps(gs), vdecay = _mm512_set1_ps(decay);
      const __m512 c1 = _mm512_set1_ps(1.0f - b1), vb2 = _mm512_set1_ps(b2);
      const __m512 c2 = _mm512_set1_ps(1.0f - b2), vstep = _mm512_set1_ps(step_size);
      const __m512 vbc2 = _mm512_set1_ps(bc2_sqrt), veps = _mm512_set1_ps(eps);
      for (; i + 16 <= end; i += 16) {
        const __m512 gi = _mm512_mul_ps(_mm512_loadu_ps(g + i), vgs);
        const __m512 wi = _mm512_mul_ps(_mm512_loadu_ps(w + i), vdecay);
        const __m512 mold = _mm512_loadu_ps(m1 + i);
        const __m512 mi = _mm512_add_ps(mold, _mm512_mul_ps(c1, _mm512_sub_ps(gi, mold)));
        const __m512 vi = _mm512_add_ps(_mm512_mul_ps(vb2, _mm512_loadu_ps(m2 + i)),
                                        _mm512_mul_ps(_mm512_mul_ps(c2, gi), gi));
        const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), vbc2), veps);
        const __m512 wn = _mm512_sub_ps(wi, _mm512_div_ps(_mm512_mul_ps(vstep, mi), denom));
        _mm512_storeu_ps(m1 + i, mi);
        _mm512_storeu_ps(m2 + i, vi);
        _mm512_storeu_ps(w + i, wn);
        if constexpr (kOut) store16(out + i, wn, static_cast<__mmask16>(0xffff));
      }
#endif
      for (; i < end; ++i) {
        const float gi = g[i] * gs;
        float wi = w[i] * decay;
        const float mi = m1[i] + (1.0f - b1) * (gi - m1[i]);  // torch: lerp
        const float vi = b2 * m2[i] + (1.0f - b2) * gi * gi;
        wi -= step_size * mi / (std::sqrt(vi) / bc2_sqrt + eps);
        m1[i] = mi;
        m2[i] = vi;
        w[i] = wi;
        if constexpr (kOut) out[i] = from_float<T>(wi);
      }
    });
  };
  if (!param.defined()) {
    update(static_cast<std::nullptr_t*>(nullptr));
    return;
  }
  dispatch_float(param.dtype(), [&](auto tag) {
    using T = decltype(tag);
    update(static_cast<T*>(param.data()));
  });
}

}  // namespace meshtrain::cpu
