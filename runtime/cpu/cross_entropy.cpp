// Fused softmax cross-entropy in fp32 over the real vocabulary columns; the padded columns
// are never read in forward and get zero gradient. No probability tensor is formed: backward
// recomputes exp(logit - lse) row by row.
#include <cmath>
#include <limits>

#include "runtime/cpu/cpu_backend.hpp"
#include "runtime/cpu/parallel.hpp"

namespace meshtrain::cpu {
namespace {

// dlogits = (softmax(logits) - onehot(target)) * dloss over the first `valid` of `cols` columns,
// zero beyond. A row whose target is at or below `ignored` is all zero; a target in [ignored + 1,
// 0) has no one-hot term (vocab-parallel: it lies on another rank). dlogits may alias logits:
// each element is read before it is written.
void backward_rows(Tensor& dlogits, const Tensor& logits, const Tensor& lse, const Tensor& targets,
                   std::int64_t rows, std::int64_t cols, int valid, float dloss, int ignored) {
  const std::int32_t* tgt = static_cast<const std::int32_t*>(targets.data());
  const float* l = static_cast<const float*>(lse.data());
  dispatch_float(logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* z = static_cast<const T*>(logits.data());
    T* dz = static_cast<T*>(dlogits.data());
#pragma omp parallel for schedule(static) if (rows * valid > kParallelGrain)
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* row = z + r * cols;
      T* drow = dz + r * cols;
      const int t = tgt[r];
      const int n = t <= ignored ? 0 : valid;
      for (int j = 0; j < n; ++j) {
        const float p = std::exp(to_float(row[j]) - l[r]);
        drow[j] = from_float<T>((p - (j == t ? 1.0f : 0.0f)) * dloss);
      }
      for (std::int64_t j = n; j < cols; ++j) drow[j] = from_float<T>(0.0f);
    }
  });
}

}  // namespace

void CpuBackend::cross_entropy_forward(Tensor& losses, Tensor& lse, const Tensor& logits,
                                       const Tensor& targets, std::int64_t rows,
                                       std::int64_t padded_vocab, int vocab) {
  const std::int32_t* tgt = static_cast<const std::int32_t*>(targets.data());
  float* loss = static_cast<float*>(losses.data());
  float* out_lse = static_cast<float*>(lse.data());
  dispatch_float(logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* z = static_cast<const T*>(logits.data());
#pragma omp parallel for schedule(static) if (rows * vocab > kParallelGrain)
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* row = z + r * padded_vocab;
      float mx = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < vocab; ++j) mx = std::max(mx, to_float(row[j]));
      float sum = 0.0f;
      for (int j = 0; j < vocab; ++j) sum += std::exp(to_float(row[j]) - mx);
      const float l = mx + std::log(sum);
      out_lse[r] = l;
      loss[r] = tgt[r] < 0 ? 0.0f : l - to_float(row[tgt[r]]);
    }
  });
}

void CpuBackend::cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& lse,
                                        const Tensor& targets, std::int64_t rows,
                                        std::int64_t padded_vocab, int vocab, float dloss) {
  backward_rows(dlogits, logits, lse, targets, rows, padded_vocab, vocab, dloss,
                /*ignored=*/-1);  // any negative target ignores its row
}

void CpuBackend::cross_entropy_combine(Tensor& losses, Tensor& lse, const Tensor& parts,
                                       const Tensor& owner, int ranks, std::int64_t rows) {
  const float* p = static_cast<const float*>(parts.data());
  const std::int32_t* own = static_cast<const std::int32_t*>(owner.data());
  float* loss = static_cast<float*>(losses.data());
  float* out_lse = static_cast<float*>(lse.data());
  for (std::int64_t r = 0; r < rows; ++r) {
    // parts[k, 0, r] is rank k's partial lse, parts[k, 1, r] its loss.
    float mx = -std::numeric_limits<float>::infinity();
    for (int k = 0; k < ranks; ++k) mx = std::max(mx, p[(2 * k) * rows + r]);
    float sum = 0.0f;
    for (int k = 0; k < ranks; ++k) sum += std::exp(p[(2 * k) * rows + r] - mx);
    const float l = mx + std::log(sum);
    out_lse[r] = l;
    const int o = own[r];
    loss[r] = o < 0 ? 0.0f : l - (p[(2 * o) * rows + r] - p[(2 * o + 1) * rows + r]);
  }
}

void CpuBackend::cross_entropy_backward_split(Tensor& dlogits, const Tensor& logits,
                                              const Tensor& lse, const Tensor& targets,
                                              std::int64_t rows, std::int64_t cols, int valid,
                                              float dloss) {
  backward_rows(dlogits, logits, lse, targets, rows, cols, valid, dloss,
                /*ignored=*/-2);  // -1: the target is on another rank
}

}  // namespace meshtrain::cpu
