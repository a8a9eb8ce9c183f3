// Token and position embedding on CUDA. Backward is deterministic without atomics: the
// positions are sorted by token id (CUB's stable radix sort, so positions of one token stay
// in increasing order) and one block per distinct token adds its rows in that order, as the
// CPU backend does. dwpe sums over the batch, one thread per (position, channel).
#include <cub/device/device_radix_sort.cuh>

#include "runtime/cuda/kernel_utils.cuh"

namespace meshtrain::cuda::kernels {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void embedding_forward_kernel(T* out, const std::int32_t* ids, const T* wte,
                                         const T* wpe, std::int64_t rows, int seq, int channels) {
  const std::int64_t n = rows * channels;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / channels;
    const int c = static_cast<int>(i % channels);
    float v = to_f32(wte[static_cast<std::int64_t>(ids[r]) * channels + c]);
    if (wpe != nullptr) v += to_f32(wpe[(r % seq) * channels + c]);
    out[i] =
        wpe != nullptr ? from_f32<T>(v) : wte[static_cast<std::int64_t>(ids[r]) * channels + c];
  }
}

__global__ void iota_kernel(std::int32_t* p, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    p[i] = static_cast<std::int32_t>(i);
}

// Block i handles the run of equal ids that starts at sorted position i (other blocks exit).
template <typename T>
__global__ void embedding_wte_grad_kernel(float* dwte, const T* dout, const std::int32_t* ids,
                                          const std::int32_t* rows, std::int64_t n, int channels) {
  const std::int64_t i = blockIdx.x;
  if (i > 0 && ids[i] == ids[i - 1]) return;
  std::int64_t end = i + 1;
  while (end < n && ids[end] == ids[i]) ++end;
  float* dst = dwte + static_cast<std::int64_t>(ids[i]) * channels;
  for (int c = threadIdx.x; c < channels; c += blockDim.x) {
    float acc = dst[c];
    for (std::int64_t k = i; k < end; ++k)
      acc += to_f32(dout[static_cast<std::int64_t>(rows[k]) * channels + c]);
    dst[c] = acc;
  }
}

template <typename T>
__global__ void embedding_wpe_grad_kernel(float* dwpe, const T* dout, int batch, int seq,
                                          int channels) {
  const std::int64_t n = static_cast<std::int64_t>(seq) * channels;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    float acc = dwpe[i];
    for (int b = 0; b < batch; ++b) acc += to_f32(dout[static_cast<std::int64_t>(b) * n + i]);
    dwpe[i] = acc;
  }
}

int key_bits(std::int64_t vocab) {
  int bits = 1;
  while (bits < 31 && (std::int64_t{1} << bits) < vocab) ++bits;
  return bits;
}

std::size_t align256(std::size_t n) {
  return (n + 255) / 256 * 256;
}

}  // namespace

void embedding_forward(DType t, void* out, const std::int32_t* tokens, const void* wte,
                       const void* wpe, int batch, int seq, int channels, cudaStream_t s) {
  const std::int64_t rows = static_cast<std::int64_t>(batch) * seq;
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    embedding_forward_kernel<<<grid_for(rows * channels, kThreads), kThreads, 0, s>>>(
        static_cast<T*>(out), tokens, static_cast<const T*>(wte), static_cast<const T*>(wpe), rows,
        seq, channels);
    MT_CUDA_LAUNCH_CHECK();
  });
}

void embedding_backward(DType t, float* dwte, float* dwpe, const void* dout,
                        const std::int32_t* tokens, int batch, int seq, int channels,
                        std::int64_t vocab, Scratch& scratch, cudaStream_t s) {
  const std::int64_t n = static_cast<std::int64_t>(batch) * seq;
  MT_CUDA_CHECK(n <= INT32_MAX ? cudaSuccess : cudaErrorInvalidValue);
  const int bits = key_bits(vocab);
  std::size_t sort_bytes = 0;
  MT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, sort_bytes, static_cast<const std::int32_t*>(nullptr),
      static_cast<std::int32_t*>(nullptr), static_cast<const std::int32_t*>(nullptr),
      static_cast<std::int32_t*>(nullptr), static_cast<int>(n), 0, bits, s));
  const std::size_t ids_bytes = align256(sizeof(std::int32_t) * n);
  auto* base = static_cast<char*>(scratch.get(3 * ids_bytes + sort_bytes));
  auto* order_in = reinterpret_cast<std::int32_t*>(base);
  auto* sorted_ids = reinterpret_cast<std::int32_t*>(base + ids_bytes);
  auto* sorted_rows = reinterpret_cast<std::int32_t*>(base + 2 * ids_bytes);
  void* sort_tmp = base + 3 * ids_bytes;
  iota_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(order_in, n);
  MT_CUDA_LAUNCH_CHECK();
  MT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sort_tmp, sort_bytes, tokens, sorted_ids, order_in,
                                                sorted_rows, static_cast<int>(n), 0, bits, s));
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* g = static_cast<const T*>(dout);
    const int threads = channels >= 256 ? 256 : ((channels + 31) / 32) * 32;
    embedding_wte_grad_kernel<<<static_cast<unsigned>(n), threads, 0, s>>>(
        dwte, g, sorted_ids, sorted_rows, n, channels);
    MT_CUDA_LAUNCH_CHECK();
    if (dwpe != nullptr) {
      embedding_wpe_grad_kernel<<<grid_for(static_cast<std::int64_t>(seq) * channels, kThreads),
                                  kThreads, 0, s>>>(dwpe, g, batch, seq, channels);
      MT_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace meshtrain::cuda::kernels
