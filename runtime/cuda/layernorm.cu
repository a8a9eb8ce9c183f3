// LayerNorm on CUDA: one warp per row, statistics in fp32 with two passes (mean, then the
// centred variance), as the CPU backend. Weight and bias gradients are column sums over rows,
// reduced deterministically (column_sums in kernel_utils.cuh).
#include "runtime/cuda/kernel_utils.cuh"

namespace meshtrain::cuda::kernels {
namespace {

constexpr int kWarpsPerBlock = 8;

// The rest of a row's LayerNorm once its mean m is known, for one warp: the centred variance,
// y = (x - m) * rstd * w + b, and the row's statistics (lane 0).
template <typename T>
__device__ void normalize_row(T* out, float* mean, float* rstd, const T* row, float m, const T* w,
                              const T* b, int cols, float eps, int lane) {
  float var = 0.0f;
  for (int j = lane; j < cols; j += 32) {
    const float d = to_f32(row[j]) - m;
    var += d * d;
  }
  const float s = rsqrtf(warp_sum(var) / static_cast<float>(cols) + eps);
  for (int j = lane; j < cols; j += 32)
    out[j] = from_f32<T>((to_f32(row[j]) - m) * s * to_f32(w[j]) + to_f32(b[j]));
  if (lane == 0) {
    *mean = m;
    *rstd = s;
  }
}

template <typename T>
__global__ void layernorm_forward_kernel(T* y, float* mean, float* rstd, const T* x, const T* w,
                                         const T* b, std::int64_t rows, int cols, float eps) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const T* row = x + r * cols;
  float sum = 0.0f;
  for (int j = lane; j < cols; j += 32) sum += to_f32(row[j]);
  const float m = warp_sum(sum) / static_cast<float>(cols);
  normalize_row(y + r * cols, mean + r, rstd + r, row, m, w, b, cols, eps, lane);
}

template <typename T>
__global__ void layernorm_backward_dx_kernel(T* dx, const T* dy, const T* x, const T* w,
                                             const float* mean, const float* rstd,
                                             std::int64_t rows, int cols, bool accumulate) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const T* xr = x + r * cols;
  const T* gr = dy + r * cols;
  const float mu = mean[r], rs = rstd[r];
  float dn_sum = 0.0f, dn_norm_sum = 0.0f;
  for (int j = lane; j < cols; j += 32) {
    const float nv = (to_f32(xr[j]) - mu) * rs;
    const float dn = to_f32(gr[j]) * to_f32(w[j]);
    dn_sum += dn;
    dn_norm_sum += dn * nv;
  }
  const float dn_mean = warp_sum(dn_sum) / static_cast<float>(cols);
  const float dn_norm_mean = warp_sum(dn_norm_sum) / static_cast<float>(cols);
  T* out = dx + r * cols;
  for (int j = lane; j < cols; j += 32) {
    const float nv = (to_f32(xr[j]) - mu) * rs;
    const float dn = to_f32(gr[j]) * to_f32(w[j]);
    float v = (dn - dn_mean - nv * dn_norm_mean) * rs;
    if (accumulate) v += to_f32(out[j]);
    out[j] = from_f32<T>(v);
  }
}

// Residual add fused into the LayerNorm: sum = a + b rounded to T (stored; it may alias a or b:
// each element is read and written by one lane, before any lane reads sum), then the same
// statistics as layernorm_forward_kernel from the rounded values, so y matches add followed by
// layernorm_forward.
template <typename T>
__global__ void residual_layernorm_forward_kernel(T* sum_out, T* y, float* mean, float* rstd,
                                                  const T* a, const T* b, const T* w, const T* bias,
                                                  std::int64_t rows, int cols, float eps) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const T* ar = a + r * cols;
  const T* br = b + r * cols;
  T* row = sum_out + r * cols;
  float sum = 0.0f;
  for (int j = lane; j < cols; j += 32) {
    const T v = from_f32<T>(to_f32(ar[j]) + to_f32(br[j]));
    row[j] = v;
    sum += to_f32(v);
  }
  const float m = warp_sum(sum) / static_cast<float>(cols);
  normalize_row(y + r * cols, mean + r, rstd + r, row, m, w, bias, cols, eps, lane);
}

// (dy * normalised x, dy) at (r, c): the terms of dweight and dbias.
template <typename T>
struct LayernormGradValue {
  const T* dy;
  const T* x;
  const float* mean;
  const float* rstd;
  std::int64_t cols;
  __device__ float2 operator()(std::int64_t r, std::int64_t c) const {
    const float g = to_f32(dy[r * cols + c]);
    const float nv = (to_f32(x[r * cols + c]) - mean[r]) * rstd[r];
    return make_float2(g * nv, g);
  }
};

unsigned row_blocks(std::int64_t rows) {
  return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

}  // namespace

void layernorm_forward(DType t, void* y, float* mean, float* rstd, const void* x,
                       const void* weight, const void* bias, std::int64_t rows, std::int64_t cols,
                       float eps, cudaStream_t s) {
  if (rows == 0) return;
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    layernorm_forward_kernel<<<row_blocks(rows), kWarpsPerBlock * 32, 0, s>>>(
        static_cast<T*>(y), mean, rstd, static_cast<const T*>(x), static_cast<const T*>(weight),
        static_cast<const T*>(bias), rows, static_cast<int>(cols), eps);
    MT_CUDA_LAUNCH_CHECK();
  });
}

void residual_layernorm_forward(DType t, void* sum, void* y, float* mean, float* rstd,
                                const void* a, const void* b, const void* weight, const void* bias,
                                std::int64_t rows, std::int64_t cols, float eps, cudaStream_t s) {
  if (rows == 0) return;
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    residual_layernorm_forward_kernel<<<row_blocks(rows), kWarpsPerBlock * 32, 0, s>>>(
        static_cast<T*>(sum), static_cast<T*>(y), mean, rstd, static_cast<const T*>(a),
        static_cast<const T*>(b), static_cast<const T*>(weight), static_cast<const T*>(bias), rows,
        static_cast<int>(cols), eps);
    MT_CUDA_LAUNCH_CHECK();
  });
}

void layernorm_backward(DType t, void* dx, float* dweight, float* dbias, const void* dy,
                        const void* x, const void* weight, const float* mean, const float* rstd,
                        std::int64_t rows, std::int64_t cols, bool accumulate_dx, Scratch& scratch,
                        cudaStream_t s) {
  if (rows == 0 || cols == 0) return;
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    layernorm_backward_dx_kernel<<<row_blocks(rows), kWarpsPerBlock * 32, 0, s>>>(
        static_cast<T*>(dx), static_cast<const T*>(dy), static_cast<const T*>(x),
        static_cast<const T*>(weight), mean, rstd, rows, static_cast<int>(cols), accumulate_dx);
    MT_CUDA_LAUNCH_CHECK();
    column_sums(LayernormGradValue<T>{static_cast<const T*>(dy), static_cast<const T*>(x), mean,
                                      rstd, cols},
                rows, cols, dweight, dbias, scratch, s);
  });
}

}  // namespace meshtrain::cuda::kernels
