// RMSNorm on CUDA (Llama, Qwen2): one warp per row, the mean square in fp32, x * rstd rounded
// to the dtype before the product with the weight (Hugging Face's LlamaRMSNorm), as the CPU
// backend. The weight gradient is a column sum over rows, reduced deterministically
// (column_sums in kernel_utils.cuh).
#include "runtime/cuda/kernel_utils.cuh"

namespace meshtrain::cuda::kernels {
namespace {

constexpr int kWarpsPerBlock = 8;

// The RMSNorm of one row, for one warp: y = w * round(x * rstd), and rstd (lane 0). out may be
// row: each lane reads its elements before writing them.
template <typename T>
__device__ void rms_row(T* out, float* rstd, const T* row, const T* w, int cols, float eps,
                        int lane) {
  float ss = 0.0f;
  for (int j = lane; j < cols; j += 32) {
    const float v = to_f32(row[j]);
    ss += v * v;
  }
  const float s = rsqrtf(warp_sum(ss) / static_cast<float>(cols) + eps);
  for (int j = lane; j < cols; j += 32) {
    const float normed = to_f32(from_f32<T>(to_f32(row[j]) * s));
    out[j] = from_f32<T>(normed * to_f32(w[j]));
  }
  if (lane == 0) *rstd = s;
}

template <typename T>
__global__ void rmsnorm_forward_kernel(T* y, float* rstd, const T* x, const T* w, std::int64_t rows,
                                       int cols, float eps) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (r >= rows) return;
  rms_row(y + r * cols, rstd + r, x + r * cols, w, cols, eps, threadIdx.x % 32);
}

// sum = a + b rounded to T (stored; it may alias a or b: each element is read and written by
// one lane), then the RMSNorm of the stored values, so y matches add followed by
// rmsnorm_forward.
template <typename T>
__global__ void residual_rmsnorm_forward_kernel(T* sum_out, T* y, float* rstd, const T* a,
                                                const T* b, const T* w, std::int64_t rows, int cols,
                                                float eps) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  T* row = sum_out + r * cols;
  for (int j = lane; j < cols; j += 32)
    row[j] = from_f32<T>(to_f32(a[r * cols + j]) + to_f32(b[r * cols + j]));
  rms_row(y + r * cols, rstd + r, row, w, cols, eps, lane);
}

// dx = rstd * (dn - n * mean(dn * n)), n = x * rstd, dn = dy * w (+= when accumulating).
template <typename T>
__global__ void rmsnorm_backward_dx_kernel(T* dx, const T* dy, const T* x, const T* w,
                                           const float* rstd, std::int64_t rows, int cols,
                                           bool accumulate) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const T* xr = x + r * cols;
  const T* gr = dy + r * cols;
  const float s = rstd[r];
  float dot = 0.0f;
  for (int j = lane; j < cols; j += 32) dot += to_f32(gr[j]) * to_f32(w[j]) * (to_f32(xr[j]) * s);
  const float mean = warp_sum(dot) / static_cast<float>(cols);
  T* out = dx + r * cols;
  for (int j = lane; j < cols; j += 32) {
    const float nv = to_f32(xr[j]) * s;
    float v = (to_f32(gr[j]) * to_f32(w[j]) - nv * mean) * s;
    if (accumulate) v += to_f32(out[j]);
    out[j] = from_f32<T>(v);
  }
}

// (dy * x * rstd, 0) at (r, c): the terms of dweight.
template <typename T>
struct RmsnormGradValue {
  const T* dy;
  const T* x;
  const float* rstd;
  std::int64_t cols;
  __device__ float2 operator()(std::int64_t r, std::int64_t c) const {
    return make_float2(to_f32(dy[r * cols + c]) * (to_f32(x[r * cols + c]) * rstd[r]), 0.0f);
  }
};

unsigned row_blocks(std::int64_t rows) {
  return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

}  // namespace

void rmsnorm_forward(DType t, void* y, float* rstd, const void* x, const void* weight,
                     std::int64_t rows, std::int64_t cols, float eps, cudaStream_t s) {
  if (rows == 0) return;
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    rmsnorm_forward_kernel<<<row_blocks(rows), kWarpsPerBlock * 32, 0, s>>>(
        static_cast<T*>(y), rstd, static_cast<const T*>(x), static_cast<const T*>(weight), rows,
        static_cast<int>(cols), eps);
    MT_CUDA_LAUNCH_CHECK();
  });
}

void residual_rmsnorm_forward(DType t, void* sum, void* y, float* rstd, const void* a,
                              const void* b, const void* weight, std::int64_t rows,
                              std::int64_t cols, float eps, cudaStream_t s) {
  if (rows == 0) return;
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    residual_rmsnorm_forward_kernel<<<row_blocks(rows), kWarpsPerBlock * 32, 0, s>>>(
        static_cast<T*>(sum), static_cast<T*>(y), rstd, static_cast<const T*>(a),
        static_cast<const T*>(b), static_cast<const T*>(weight), rows, static_cast<int>(cols), eps);
    MT_CUDA_LAUNCH_CHECK();
  });
}

void rmsnorm_backward(DType t, void* dx, float* dweight, const void* dy, const void* x,
                      const void* weight, const float* rstd, std::int64_t rows, std::int64_t cols,
                      bool accumulate_dx, Scratch& scratch, cudaStream_t s) {
  if (rows == 0 || cols == 0) return;
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    // dweight first: it reads dy and x, which dx may overwrite.
    column_sums(
        RmsnormGradValue<T>{static_cast<const T*>(dy), static_cast<const T*>(x), rstd, cols}, rows,
        cols, dweight, nullptr, scratch, s);
    rmsnorm_backward_dx_kernel<<<row_blocks(rows), kWarpsPerBlock * 32, 0, s>>>(
        static_cast<T*>(dx), static_cast<const T*>(dy), static_cast<const T*>(x),
        static_cast<const T*>(weight), rstd, rows, static_cast<int>(cols), accumulate_dx);
    MT_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace meshtrain::cuda::kernels
