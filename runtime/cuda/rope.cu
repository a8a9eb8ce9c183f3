// Rotary position embeddings on CUDA, "rotate_half" style, as the CPU backend: one thread per
// rotated pair (x_j, x_{j+D/2}) of a head, turned by the angle of table row pos (cos in the
// row's first half, sin in its second; minus the angle for the backward). fp32 math, one
// rounding. The heads after the rotated ones (v) are copied when y is not x.
#include "runtime/cuda/kernel_utils.cuh"

namespace meshtrain::cuda::kernels {
namespace {

constexpr int kThreads = 256;

struct RopeShape {
  std::int64_t rows;  // batch * seq
  int seq, rot_heads, heads, head_dim, pos0;
};

// The thread of pair (r, h, j) alone reads and writes its two elements, so y may alias x.
template <typename T>
__global__ void rope_kernel(T* y, const T* x, const float* table, RopeShape p, float sign) {
  const int half = p.head_dim / 2;
  const std::int64_t width = static_cast<std::int64_t>(p.heads) * p.head_dim;
  const std::int64_t n = p.rows * p.rot_heads * half;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / (static_cast<std::int64_t>(p.rot_heads) * half);
    const int h = static_cast<int>(i / half % p.rot_heads), j = static_cast<int>(i % half);
    const float* row = table + (p.pos0 + r % p.seq) * static_cast<std::int64_t>(p.head_dim);
    const float c = row[j], s = row[half + j] * sign;
    const std::int64_t at = r * width + static_cast<std::int64_t>(h) * p.head_dim + j;
    const float x1 = to_f32(x[at]), x2 = to_f32(x[at + half]);
    y[at] = from_f32<T>(x1 * c - x2 * s);
    y[at + half] = from_f32<T>(x2 * c + x1 * s);
  }
}

template <typename T>
__global__ void copy_rest_kernel(T* y, const T* x, RopeShape p) {
  const std::int64_t width = static_cast<std::int64_t>(p.heads) * p.head_dim;
  const std::int64_t first = static_cast<std::int64_t>(p.rot_heads) * p.head_dim;
  const std::int64_t rest = width - first;
  const std::int64_t n = p.rows * rest;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t at = i / rest * width + first + i % rest;
    y[at] = x[at];
  }
}

}  // namespace

void rope(DType t, void* y, const void* x, const float* table, int batch, int seq, int rot_heads,
          int heads, int head_dim, int pos0, bool inverse, cudaStream_t s) {
  const RopeShape p{static_cast<std::int64_t>(batch) * seq, seq, rot_heads, heads, head_dim, pos0};
  if (p.rows == 0) return;
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const std::int64_t pairs = p.rows * rot_heads * (head_dim / 2);
    rope_kernel<<<grid_for(pairs, kThreads), kThreads, 0, s>>>(
        static_cast<T*>(y), static_cast<const T*>(x), table, p, inverse ? -1.0f : 1.0f);
    MT_CUDA_LAUNCH_CHECK();
    if (y != x && heads > rot_heads) {
      const std::int64_t rest = p.rows * (heads - rot_heads) * head_dim;
      copy_rest_kernel<<<grid_for(rest, kThreads), kThreads, 0, s>>>(static_cast<T*>(y),
                                                                     static_cast<const T*>(x), p);
      MT_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace meshtrain::cuda::kernels
