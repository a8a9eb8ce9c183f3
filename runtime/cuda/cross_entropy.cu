// Fused softmax cross-entropy on CUDA: one block per row, fp32, over the first `vocab`
// columns only. No probability tensor: backward recomputes exp(logit - lse) per element.
#include <cfloat>

#include "runtime/cuda/kernel_utils.cuh"

namespace meshtrain::cuda::kernels {
namespace {

constexpr int kThreads = 512;

__device__ float block_max(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float m = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : -INFINITY;
  return warp_max(m);
}

template <typename T>
__global__ void cross_entropy_forward_kernel(float* losses, float* lse, const T* logits,
                                             const std::int32_t* targets, std::int64_t padded_vocab,
                                             int vocab) {
  const std::int64_t r = blockIdx.x;
  const T* row = logits + r * padded_vocab;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, to_f32(row[j]));
  mx = block_max(mx);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(to_f32(row[j]) - mx);
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    const float l = mx + logf(sum);
    const int t = targets[r];
    lse[r] = l;
    losses[r] = t < 0 ? 0.0f : l - to_f32(row[t]);
  }
}

// One thread per row; the ranks' partials are combined in rank order (deterministic).
__global__ void cross_entropy_combine_kernel(float* losses, float* lse, const float* parts,
                                             const std::int32_t* owner, int ranks,
                                             std::int64_t rows) {
  for (std::int64_t r = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    float mx = -INFINITY;
    for (int k = 0; k < ranks; ++k) mx = fmaxf(mx, parts[(2 * k) * rows + r]);
    float sum = 0.0f;
    for (int k = 0; k < ranks; ++k) sum += expf(parts[(2 * k) * rows + r] - mx);
    const float l = mx + logf(sum);
    lse[r] = l;
    const int o = owner[r];
    losses[r] = o < 0 ? 0.0f : l - (parts[(2 * o) * rows + r] - parts[(2 * o + 1) * rows + r]);
  }
}

// dlogits = (softmax(logits) - onehot(target)) * dloss over the first `valid` of `cols` columns,
// zero beyond, one block per row. A row whose target is at or below `ignored` is all zero; a
// target in [ignored + 1, 0) has no one-hot term (vocab-parallel: it lies on another rank).
// dlogits may alias logits: each element is read and written by the same thread.
template <typename T>
__global__ void cross_entropy_backward_kernel(T* dlogits, const T* logits, const float* lse,
                                              const std::int32_t* targets, std::int64_t cols,
                                              int valid, float dloss, int ignored) {
  const std::int64_t r = blockIdx.x;
  const T* row = logits + r * cols;
  T* drow = dlogits + r * cols;
  const int t = targets[r];
  const int n = t <= ignored ? 0 : valid;
  const float l = lse[r];
  for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    float g = 0.0f;
    if (j < n) g = (expf(to_f32(row[j]) - l) - (j == t ? 1.0f : 0.0f)) * dloss;
    drow[j] = from_f32<T>(g);
  }
}

template <typename T>
void launch_backward(void* dlogits, const void* logits, const float* lse,
                     const std::int32_t* targets, std::int64_t rows, std::int64_t cols, int valid,
                     float dloss, int ignored, cudaStream_t s) {
  cross_entropy_backward_kernel<<<static_cast<unsigned>(rows), kThreads, 0, s>>>(
      static_cast<T*>(dlogits), static_cast<const T*>(logits), lse, targets, cols, valid, dloss,
      ignored);
  MT_CUDA_LAUNCH_CHECK();
}

}  // namespace

void cross_entropy_combine(float* losses, float* lse, const float* parts, const std::int32_t* owner,
                           int ranks, std::int64_t rows, cudaStream_t s) {
  if (rows == 0) return;
  cross_entropy_combine_kernel<<<grid_for(rows, 256), 256, 0, s>>>(losses, lse, parts, owner, ranks,
                                                                   rows);
  MT_CUDA_LAUNCH_CHECK();
}

void cross_entropy_backward_split(DType t, void* dlogits, const void* logits, const float* lse,
                                  const std::int32_t* targets, std::int64_t rows, std::int64_t cols,
                                  int valid, float dloss, cudaStream_t s) {
  if (rows == 0) return;
  dispatch_float(t, [&](auto tag) {
    // -1: the target is on another rank; -2 and below: an ignored row.
    launch_backward<typename decltype(tag)::type>(dlogits, logits, lse, targets, rows, cols, valid,
                                                  dloss, /*ignored=*/-2, s);
  });
}

void cross_entropy_forward(DType t, float* losses, float* lse, const void* logits,
                           const std::int32_t* targets, std::int64_t rows,
                           std::int64_t padded_vocab, int vocab, cudaStream_t s) {
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    cross_entropy_forward_kernel<<<static_cast<unsigned>(rows), kThreads, 0, s>>>(
        losses, lse, static_cast<const T*>(logits), targets, padded_vocab, vocab);
    MT_CUDA_LAUNCH_CHECK();
  });
}

void cross_entropy_backward(DType t, void* dlogits, const void* logits, const float* lse,
                            const std::int32_t* targets, std::int64_t rows,
                            std::int64_t padded_vocab, int vocab, float dloss, cudaStream_t s) {
  dispatch_float(t, [&](auto tag) {
    // Any negative target ignores its row.
    launch_backward<typename decltype(tag)::type>(dlogits, logits, lse, targets, rows, padded_vocab,
                                                  vocab, dloss, /*ignored=*/-1, s);
  });
}

}  // namespace meshtrain::cuda::kernels
