// One step of cached causal attention: a single query per sequence against the keys and
// values of all earlier positions. Memory-bound (it reads the whole cache), so a plain loop
// over positions is as fast as a GEMM here.
#include <algorithm>
#include <cmath>
#include <vector>

#include "runtime/cpu/cpu_backend.hpp"

namespace meshtrain::cpu {

void CpuBackend::attention_decode(Tensor& out, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv,
                                  int batch, int max_seq, int pos, int n_head, int n_kv_head,
                                  int head_size) {
  // qkv rows: q of n_head heads, then k and v of n_kv_head heads; the caches hold kv = n_kv_head
  // heads per position. Query head h reads key/value head h / group.
  const std::int64_t c = static_cast<std::int64_t>(n_head) * head_size;
  const std::int64_t kv = static_cast<std::int64_t>(n_kv_head) * head_size;
  const std::int64_t width = c + 2 * kv;
  const int group = n_head / n_kv_head;
  dispatch_float(qkv.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(qkv.data());
    T* kc = static_cast<T*>(k_cache.data());
    T* vc = static_cast<T*>(v_cache.data());
    T* o = static_cast<T*>(out.data());
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_size));
    // The token's keys and values first, once per key/value head, then the queries read them.
    for (int b = 0; b < batch; ++b) {
      const T* row = in + b * width;
      const std::int64_t at = (static_cast<std::int64_t>(b) * max_seq + pos) * kv;
      std::copy(row + c, row + c + kv, kc + at);
      std::copy(row + c + kv, row + width, vc + at);
    }
#pragma omp parallel for collapse(2) \
    schedule(static) if (batch * n_head * (pos + 1) * head_size > 1 << 16)
    for (int b = 0; b < batch; ++b) {
      for (int h = 0; h < n_head; ++h) {
        const T* row = in + b * width;
        const std::int64_t head = static_cast<std::int64_t>(h / group) * head_size;
        std::vector<float> q(static_cast<std::size_t>(head_size)),
            acc(static_cast<std::size_t>(head_size), 0.0f);
        for (int d = 0; d < head_size; ++d) q[d] = to_float(row[h * head_size + d]) * scale;
        // Online softmax over positions 0..pos: one pass, fp32.
        float mx = -INFINITY, denom = 0.0f;
        for (int t = 0; t <= pos; ++t) {
          const T* k = kc + (static_cast<std::int64_t>(b) * max_seq + t) * kv + head;
          const T* v = vc + (static_cast<std::int64_t>(b) * max_seq + t) * kv + head;
          float s = 0.0f;
          for (int d = 0; d < head_size; ++d) s += q[d] * to_float(k[d]);
          if (s > mx) {
            const float shrink = std::exp(mx - s);
            denom *= shrink;
            for (float& a : acc) a *= shrink;
            mx = s;
          }
          const float p = std::exp(s - mx);
          denom += p;
          for (int d = 0; d < head_size; ++d) acc[d] += p * to_float(v[d]);
        }
        T* orow = o + b * c + h * head_size;
        for (int d = 0; d < head_size; ++d) orow[d] = from_float<T>(acc[d] / denom);
      }
    }
  });
}

}  // namespace meshtrain::cpu
