// Elementwise CUDA kernels (residual add, GELU, conversion, scaling, AdamW) and the small
// reductions (sum of squares, bias gradient, token range). Grid-stride loops; fp32 math.
#include <cfloat>
#include <climits>
#include <cmath>

#include "runtime/cuda/kernel_utils.cuh"

namespace meshtrain::cuda::kernels {
namespace {

constexpr int kThreads = 256;
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCube = 0.044715f;

#define MT_GRID_STRIDE(i, n)                                                                       \
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)

template <typename T>
__global__ void add_kernel(T* out, const T* a, const T* b, std::int64_t n) {
  MT_GRID_STRIDE(i, n) out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}

template <typename T>
__global__ void gelu_forward_kernel(T* y, const T* x, std::int64_t n) {
  MT_GRID_STRIDE(i, n) {
    const float v = to_f32(x[i]);
    const float u = kGeluScale * (v + kGeluCube * v * v * v);
    y[i] = from_f32<T>(0.5f * v * (1.0f + tanhf(u)));
  }
}

template <typename T>
__global__ void gelu_backward_kernel(T* dx, const T* dy, const T* x, std::int64_t n) {
  MT_GRID_STRIDE(i, n) {
    const float v = to_f32(x[i]);
    const float th = tanhf(kGeluScale * (v + kGeluCube * v * v * v));
    const float sech2 = 1.0f - th * th;
    // As the CPU kernel: where tanh saturates the slope term is 0 (avoids 0 * inf = NaN).
    const float slope =
        sech2 > 0.0f ? 0.5f * v * sech2 * kGeluScale * (1.0f + 3.0f * kGeluCube * v * v) : 0.0f;
    dx[i] = from_f32<T>((0.5f * (1.0f + th) + slope) * to_f32(dy[i]));
  }
}

template <typename D, typename S>
__global__ void convert_kernel(D* dst, const S* src, std::int64_t n) {
  MT_GRID_STRIDE(i, n) dst[i] = from_f32<D>(to_f32(src[i]));
}

template <typename T>
__global__ void scale_kernel(T* x, float alpha, std::int64_t n) {
  MT_GRID_STRIDE(i, n) x[i] = from_f32<T>(to_f32(x[i]) * alpha);
}

// torch.optim.AdamW's order of operations, as runtime/cpu/optimizer.cpp.
template <typename T>
__global__ void adamw_kernel(T* param, float* w, const float* g, float* m1, float* m2,
                             std::int64_t n, AdamWArgs a, float step_size, float bc2_sqrt,
                             float decay) {
  MT_GRID_STRIDE(i, n) {
    const float gi = g[i] * a.grad_scale;
    float wi = w[i] * decay;
    const float mi = m1[i] + (1.0f - a.beta1) * (gi - m1[i]);
    const float vi = a.beta2 * m2[i] + (1.0f - a.beta2) * gi * gi;
    wi -= step_size * mi / (sqrtf(vi) / bc2_sqrt + a.eps);
    m1[i] = mi;
    m2[i] = vi;
    w[i] = wi;
    if (param != nullptr) param[i] = from_f32<T>(wi);
  }
}

constexpr int kReduceBlocks = 1024;

template <typename T>
__global__ void sum_squares_partial(const T* x, std::int64_t n, double* partial) {
  double acc = 0.0;
  MT_GRID_STRIDE(i, n) {
    const double v = to_f32(x[i]);
    acc += v * v;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void sum_finish(const double* partial, int count, double* result) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *result = acc;
}

struct MinMax {
  std::int32_t lo, hi;
  std::int64_t lo_at, hi_at;
};

// Smallest id wins, then the earliest index: associative and commutative, so any reduction
// order gives the CPU's answer (the first occurrence).
__device__ MinMax merge(MinMax a, MinMax b) {
  MinMax r;
  const bool take_a_lo = a.lo < b.lo || (a.lo == b.lo && a.lo_at <= b.lo_at);
  r.lo = take_a_lo ? a.lo : b.lo;
  r.lo_at = take_a_lo ? a.lo_at : b.lo_at;
  const bool take_a_hi = a.hi > b.hi || (a.hi == b.hi && a.hi_at <= b.hi_at);
  r.hi = take_a_hi ? a.hi : b.hi;
  r.hi_at = take_a_hi ? a.hi_at : b.hi_at;
  return r;
}

__device__ MinMax block_minmax(MinMax v) {
  __shared__ MinMax part[kThreads];
  part[threadIdx.x] = v;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride)
      part[threadIdx.x] = merge(part[threadIdx.x], part[threadIdx.x + stride]);
    __syncthreads();
  }
  return part[0];
}

__device__ MinMax minmax_identity() {
  return MinMax{INT_MAX, INT_MIN, LLONG_MAX, LLONG_MAX};
}

__global__ void token_range_partial(const std::int32_t* t, std::int64_t n, MinMax* partial) {
  MinMax acc = minmax_identity();
  MT_GRID_STRIDE(i, n) acc = merge(acc, MinMax{t[i], t[i], i, i});
  acc = block_minmax(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void token_range_finish(const MinMax* partial, int count, std::int64_t* out) {
  MinMax acc = minmax_identity();
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc = merge(acc, partial[i]);
  acc = block_minmax(acc);
  if (threadIdx.x == 0) {
    out[0] = acc.lo;
    out[1] = acc.lo_at;
    out[2] = acc.hi;
    out[3] = acc.hi_at;
  }
}

template <typename T>
struct BiasValue {
  const T* dy;
  std::int64_t cols;
  __device__ float2 operator()(std::int64_t r, std::int64_t c) const {
    return make_float2(to_f32(dy[r * cols + c]), 0.0f);
  }
};

}  // namespace

void add(DType t, void* out, const void* a, const void* b, std::int64_t n, cudaStream_t s) {
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    add_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(
        static_cast<T*>(out), static_cast<const T*>(a), static_cast<const T*>(b), n);
    MT_CUDA_LAUNCH_CHECK();
  });
}

void gelu_forward(DType t, void* y, const void* x, std::int64_t n, cudaStream_t s) {
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    gelu_forward_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(static_cast<T*>(y),
                                                                   static_cast<const T*>(x), n);
    MT_CUDA_LAUNCH_CHECK();
  });
}

void gelu_backward(DType t, void* dx, const void* dy, const void* x, std::int64_t n,
                   cudaStream_t s) {
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    gelu_backward_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(
        static_cast<T*>(dx), static_cast<const T*>(dy), static_cast<const T*>(x), n);
    MT_CUDA_LAUNCH_CHECK();
  });
}

void convert(DType dst_type, void* dst, DType src_type, const void* src, std::int64_t n,
             cudaStream_t s) {
  if (dst_type == src_type) {
    if (dst != src)
      MT_CUDA_CHECK(
          cudaMemcpyAsync(dst, src, n * dtype_size(dst_type), cudaMemcpyDeviceToDevice, s));
    return;
  }
  dispatch_float(dst_type, [&](auto dtag) {
    using D = typename decltype(dtag)::type;
    dispatch_float(src_type, [&](auto stag) {
      using S = typename decltype(stag)::type;
      convert_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(static_cast<D*>(dst),
                                                                static_cast<const S*>(src), n);
      MT_CUDA_LAUNCH_CHECK();
    });
  });
}

void scale(DType t, void* x, float alpha, std::int64_t n, cudaStream_t s) {
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    scale_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(static_cast<T*>(x), alpha, n);
    MT_CUDA_LAUNCH_CHECK();
  });
}

void adamw(DType param_type, void* param, float* master, const float* grad, float* m, float* v,
           std::int64_t n, const AdamWArgs& a, cudaStream_t s) {
  if (n == 0) return;
  // Bias corrections in fp32 on the host, exactly as the CPU backend computes them.
  const float bc1 = 1.0f - std::pow(a.beta1, static_cast<float>(a.step));
  const float bc2 = 1.0f - std::pow(a.beta2, static_cast<float>(a.step));
  const float step_size = a.lr / bc1;
  const float bc2_sqrt = std::sqrt(bc2);
  const float decay = 1.0f - a.lr * a.weight_decay;
  auto launch = [&](auto* out) {
    adamw_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(out, master, grad, m, v, n, a,
                                                            step_size, bc2_sqrt, decay);
    MT_CUDA_LAUNCH_CHECK();
  };
  if (param == nullptr) {
    launch(static_cast<float*>(nullptr));
    return;
  }
  dispatch_float(param_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch(static_cast<T*>(param));
  });
}

void sum_of_squares(DType t, const void* x, std::int64_t n, double* result, Scratch& scratch,
                    cudaStream_t s) {
  const unsigned blocks = grid_for(n, kThreads, kReduceBlocks);
  auto* partial = static_cast<double*>(scratch.get(sizeof(double) * blocks));
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    sum_squares_partial<<<blocks, kThreads, 0, s>>>(static_cast<const T*>(x), n, partial);
    MT_CUDA_LAUNCH_CHECK();
  });
  sum_finish<<<1, 1024, 0, s>>>(partial, static_cast<int>(blocks), result);
  MT_CUDA_LAUNCH_CHECK();
}

void bias_backward(DType t, float* dbias, const void* dy, std::int64_t rows, std::int64_t cols,
                   Scratch& scratch, cudaStream_t s) {
  if (rows == 0 || cols == 0) return;
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    column_sums(BiasValue<T>{static_cast<const T*>(dy), cols}, rows, cols, dbias, nullptr, scratch,
                s);
  });
}

void token_range(const std::int32_t* tokens, std::int64_t n, std::int64_t* out, Scratch& scratch,
                 cudaStream_t s) {
  const unsigned blocks = grid_for(n, kThreads, kReduceBlocks);
  auto* partial = static_cast<MinMax*>(scratch.get(sizeof(MinMax) * blocks));
  token_range_partial<<<blocks, kThreads, 0, s>>>(tokens, n, partial);
  MT_CUDA_LAUNCH_CHECK();
  token_range_finish<<<1, kThreads, 0, s>>>(partial, static_cast<int>(blocks), out);
  MT_CUDA_LAUNCH_CHECK();
}

}  // namespace meshtrain::cuda::kernels
