// SwiGLU on CUDA (Llama, Qwen2 MLP): y = silu(gate) * up from a fused [rows, 2F] gate | up
// projection, one thread per output element (grid-stride), fp32 math. The sigmoid is formed
// from e = exp(-|g|), as on the CPU, so the tails give exact 0 and 1 instead of 0 * inf.
#include "runtime/cuda/kernel_utils.cuh"

namespace meshtrain::cuda::kernels {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoid(float g) {
  const float e = expf(-fabsf(g));
  return (g >= 0.0f ? 1.0f : e) / (1.0f + e);
}

template <typename T>
__global__ void swiglu_forward_kernel(T* y, const T* x, std::int64_t rows, std::int64_t hidden) {
  const std::int64_t n = rows * hidden;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / hidden, j = i % hidden;
    const float g = to_f32(x[2 * r * hidden + j]);
    y[i] = from_f32<T>(g * sigmoid(g) * to_f32(x[(2 * r + 1) * hidden + j]));
  }
}

// dgate = dy * up * s (1 + g (1 - s)), dup = dy * g * s. The thread of element (r, j) alone
// reads and writes gate and up at (r, j), so dx may alias x.
template <typename T>
__global__ void swiglu_backward_kernel(T* dx, const T* dy, const T* x, std::int64_t rows,
                                       std::int64_t hidden) {
  const std::int64_t n = rows * hidden;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / hidden, j = i % hidden;
    const std::int64_t gate_at = 2 * r * hidden + j, up_at = gate_at + hidden;
    const float g = to_f32(x[gate_at]), u = to_f32(x[up_at]), d = to_f32(dy[i]);
    const float s = sigmoid(g);
    dx[gate_at] = from_f32<T>(d * u * (s * (1.0f + g * (1.0f - s))));
    dx[up_at] = from_f32<T>(d * (g * s));
  }
}

}  // namespace

void swiglu_forward(DType t, void* y, const void* x, std::int64_t rows, std::int64_t hidden,
                    cudaStream_t s) {
  if (rows * hidden == 0) return;
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    swiglu_forward_kernel<<<grid_for(rows * hidden, kThreads), kThreads, 0, s>>>(
        static_cast<T*>(y), static_cast<const T*>(x), rows, hidden);
    MT_CUDA_LAUNCH_CHECK();
  });
}

void swiglu_backward(DType t, void* dx, const void* dy, const void* x, std::int64_t rows,
                     std::int64_t hidden, cudaStream_t s) {
  if (rows * hidden == 0) return;
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    swiglu_backward_kernel<<<grid_for(rows * hidden, kThreads), kThreads, 0, s>>>(
        static_cast<T*>(dx), static_cast<const T*>(dy), static_cast<const T*>(x), rows, hidden);
    MT_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace meshtrain::cuda::kernels
