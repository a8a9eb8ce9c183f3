// Token and position embedding. The backward scatter-add is parallel over channels: each
// thread owns a range of columns and visits tokens in order, so there are no races and the
// sum order (and so the result) is fixed.
#include <algorithm>

#include "runtime/cpu/cpu_backend.hpp"
#include "runtime/cpu/parallel.hpp"

namespace meshtrain::cpu {

void CpuBackend::embedding_forward(Tensor& out, const Tensor& tokens, const Tensor& wte,
                                   const Tensor& wpe, int batch, int seq, int channels) {
  const std::int32_t* ids = static_cast<const std::int32_t*>(tokens.data());
  const bool has_pos = wpe.defined();
  dispatch_float(wte.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* te = static_cast<const T*>(wte.data());
    const T* pe = has_pos ? static_cast<const T*>(wpe.data()) : nullptr;
    T* o = static_cast<T*>(out.data());
    const std::int64_t rows = static_cast<std::int64_t>(batch) * seq;
#pragma omp parallel for schedule(static) if (rows * channels > kParallelGrain)
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* tr = te + static_cast<std::int64_t>(ids[r]) * channels;
      T* dst = o + r * channels;
      if (pe == nullptr) {
        std::copy(tr, tr + channels, dst);
        continue;
      }
      const T* pr = pe + (r % seq) * channels;
      for (int c = 0; c < channels; ++c) dst[c] = from_float<T>(to_float(tr[c]) + to_float(pr[c]));
    }
  });
}

void CpuBackend::embedding_backward(Tensor& dwte, Tensor& dwpe, const Tensor& dout,
                                    const Tensor& tokens, int batch, int seq, int channels) {
  const std::int32_t* ids = static_cast<const std::int32_t*>(tokens.data());
  float* gte = static_cast<float*>(dwte.data());
  float* gpe = dwpe.defined() ? static_cast<float*>(dwpe.data()) : nullptr;
  const std::int64_t rows = static_cast<std::int64_t>(batch) * seq;
  // Column blocks of 64 floats (one cache line x 4): enough blocks to share among threads.
  constexpr int kBlock = 64;
  const int blocks = (channels + kBlock - 1) / kBlock;
  dispatch_float(dout.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* g = static_cast<const T*>(dout.data());
#pragma omp parallel for schedule(static) if (rows * channels > kParallelGrain)
    for (int blk = 0; blk < blocks; ++blk) {
      const int c0 = blk * kBlock, c1 = std::min(channels, c0 + kBlock);
      for (std::int64_t r = 0; r < rows; ++r) {
        const T* src = g + r * channels;
        float* te = gte + static_cast<std::int64_t>(ids[r]) * channels;
        for (int c = c0; c < c1; ++c) te[c] += to_float(src[c]);
      }
      if (gpe != nullptr) {
        for (int t = 0; t < seq; ++t) {
          float* pe = gpe + static_cast<std::int64_t>(t) * channels;
          for (int b = 0; b < batch; ++b) {
            const T* src = g + (static_cast<std::int64_t>(b) * seq + t) * channels;
            for (int c = c0; c < c1; ++c) pe[c] += to_float(src[c]);
          }
        }
      }
    }
  });
}

}  // namespace meshtrain::cpu
