// Device helpers shared by the .cu files: fp32 loads and stores of every storage type, warp
// and block reductions, and the dtype dispatch. Included by .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "runtime/cuda/kernels.hpp"

namespace meshtrain::cuda {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with the device storage type of a float dtype.
template <typename F>
void dispatch_float(DType t, F&& f) {
  switch (t) {
    case DType::kF32:
      f(TypeTag<float>{});
      return;
    case DType::kBF16:
      f(TypeTag<__nv_bfloat16>{});
      return;
    case DType::kF16:
      f(TypeTag<__half>{});
      return;
    case DType::kI32:
      break;
  }
  detail::fail_call("dispatch_float: int32 where a float dtype is needed",
                    static_cast<int>(cudaErrorInvalidValue),
                    cudaGetErrorString(cudaErrorInvalidValue), __FILE__, __LINE__);
}

__device__ __forceinline__ float to_f32(float x) {
  return x;
}
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
__device__ __forceinline__ float to_f32(__half x) {
  return __half2float(x);
}

// Round to nearest even, as the CPU conversions in runtime/dtype.hpp.
template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. The order of additions is fixed by the thread layout, so it is deterministic.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T total = lane < warps ? partial[lane] : T(0);
  return warp_sum(total);
}

// Blocks for n elements handled by a grid-stride loop of `threads` threads per block.
inline unsigned grid_for(std::int64_t n, int threads, std::int64_t cap = 65535 * 8) {
  std::int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > cap) b = cap;
  return static_cast<unsigned>(b);
}

}  // namespace meshtrain::cuda

namespace meshtrain::cuda {

// Column sums of a [rows, cols] matrix of two values per element, value(r, c) -> float2, in
// two deterministic steps: colsum_partials writes partial[chunk][c] for fixed row chunks (a
// block is 32 columns x kColRowLanes row lanes, summed lane by lane through shared memory),
// colsum_finish adds the chunks in order and accumulates into out0[c] (and out1[c]).
inline constexpr int kColRowLanes = 8;

inline int colsum_chunks(std::int64_t rows) {
  std::int64_t c = (rows + 63) / 64;
  if (c > 256) c = 256;
  return c < 1 ? 1 : static_cast<int>(c);
}

template <typename Value>
__global__ void colsum_partials(Value value, std::int64_t rows, std::int64_t cols, int chunks,
                                float2* partial) {
  __shared__ float2 acc[kColRowLanes][32];
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const std::int64_t per = (rows + chunks - 1) / chunks;
  const std::int64_t r0 = blockIdx.y * per;
  const std::int64_t r1 = r0 + per < rows ? r0 + per : rows;
  float2 sum = make_float2(0.0f, 0.0f);
  if (c < cols) {
    for (std::int64_t r = r0 + threadIdx.y; r < r1; r += kColRowLanes) {
      const float2 v = value(r, c);
      sum.x += v.x;
      sum.y += v.y;
    }
  }
  acc[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float2 total = acc[0][threadIdx.x];
    for (int l = 1; l < kColRowLanes; ++l) {
      total.x += acc[l][threadIdx.x].x;
      total.y += acc[l][threadIdx.x].y;
    }
    partial[static_cast<std::int64_t>(blockIdx.y) * cols + c] = total;
  }
}

// out1 may be null. A template so that every .cu file has its own copy of the kernel.
template <int kUnused = 0>
__global__ void colsum_finish(const float2* partial, int chunks, std::int64_t cols, float* out0,
                              float* out1) {
  for (std::int64_t c = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; c < cols;
       c += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    float2 total = partial[c];
    for (int k = 1; k < chunks; ++k) {
      total.x += partial[static_cast<std::int64_t>(k) * cols + c].x;
      total.y += partial[static_cast<std::int64_t>(k) * cols + c].y;
    }
    out0[c] += total.x;
    if (out1 != nullptr) out1[c] += total.y;
  }
}

template <typename Value>
void column_sums(Value value, std::int64_t rows, std::int64_t cols, float* out0, float* out1,
                 Scratch& scratch, cudaStream_t s) {
  const int chunks = colsum_chunks(rows);
  auto* partial = static_cast<float2*>(scratch.get(sizeof(float2) * chunks * cols));
  const dim3 grid(static_cast<unsigned>((cols + 31) / 32), static_cast<unsigned>(chunks));
  colsum_partials<<<grid, dim3(32, kColRowLanes), 0, s>>>(value, rows, cols, chunks, partial);
  MT_CUDA_LAUNCH_CHECK();
  colsum_finish<<<grid_for(cols, 256), 256, 0, s>>>(partial, chunks, cols, out0, out1);
  MT_CUDA_LAUNCH_CHECK();
}

}  // namespace meshtrain::cuda
