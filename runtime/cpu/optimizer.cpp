// AdamW on fp32 master weights, in the operation order of torch.optim.AdamW (decoupled decay
// first, then the moment updates, then the bias-corrected step) so that fp32 runs match it.
#include <cmath>

#include "runtime/cpu/cpu_backend.hpp"
#include "runtime/cpu/parallel.hpp"

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
  auto update = [&](auto* out) {
    using T = std::remove_pointer_t<decltype(out)>;
#pragma omp parallel for schedule(static) if (n > kParallelGrain)
    for (std::int64_t i = 0; i < n; ++i) {
      const float gi = g[i] * p.grad_scale;
      float wi = w[i] * decay;
      const float mi = m1[i] + (1.0f - p.beta1) * (gi - m1[i]);  // torch: lerp
      const float vi = p.beta2 * m2[i] + (1.0f - p.beta2) * gi * gi;
      wi -= step_size * mi / (std::sqrt(vi) / bc2_sqrt + p.eps);
      m1[i] = mi;
      m2[i] = vi;
      w[i] = wi;
      if constexpr (!std::is_same_v<T, std::nullptr_t>) out[i] = from_float<T>(wi);
    }
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
