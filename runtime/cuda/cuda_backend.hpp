// The CUDA device and backend (internal to meshtrain_runtime_cuda; sees CUDA headers).
//
// CudaBackend implements every op of runtime/backend.hpp on the device's one compute stream:
// matmul through cuBLASLt (matmul.cpp), causal attention through cuDNN's fused SDPA with our
// simple kernels as the fallback (attention.cpp), and our kernels for the rest (kernels.hpp).
// Ops that return a value to the host (sum_of_squares, token_range) synchronize the stream.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "runtime/allocator.hpp"
#include "runtime/backend.hpp"
#include "runtime/cuda/cuda_device.hpp"
#include "runtime/cuda/kernels.hpp"
#include "runtime/cuda/stream.hpp"

namespace meshtrain::cuda {

class CudaDevice;

// A device buffer from the device's caching allocator; move-only, returned on destruction.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Device& device, std::size_t nbytes);
  ~DeviceBuffer() { reset(); }
  DeviceBuffer(DeviceBuffer&& o) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return ptr_; }
  std::size_t size() const { return nbytes_; }
  void reset() noexcept;

 private:
  Device* device_ = nullptr;
  void* ptr_ = nullptr;
  std::size_t nbytes_ = 0;
};

// Scratch memory that grows to the largest request seen (kept between ops).
class GrowingScratch final : public Scratch {
 public:
  explicit GrowingScratch(Device& device) : device_(device) {}
  void* get(std::size_t nbytes) override;

 private:
  Device& device_;
  DeviceBuffer buffer_;
};

class CudnnAttention;  // attention.cpp: cuDNN handle and SDPA graphs per shape
// Deletes a CudnnAttention where that type is complete (attention.cpp), so that CudaBackend's
// constructor and destructor need not be.
struct CudnnAttentionDeleter {
  void operator()(CudnnAttention* p) const noexcept;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(CudaDevice& device);
  ~CudaBackend() override;

  void matmul(Tensor& out, const Tensor& a, const Tensor& b, std::int64_t m, std::int64_t n,
              std::int64_t k, const ops::MatmulOptions& opt) override;
  void bias_backward(Tensor& dbias, const Tensor& dy, std::int64_t rows,
                     std::int64_t cols) override;
  void add(Tensor& out, const Tensor& a, const Tensor& b) override;
  void gelu_forward(Tensor& y, const Tensor& x) override;
  void gelu_backward(Tensor& dx, const Tensor& dy, const Tensor& x) override;
  void convert(Tensor& dst, const Tensor& src) override;
  void scale(Tensor& x, float alpha) override;
  void layernorm_forward(Tensor& y, Tensor& mean, Tensor& rstd, const Tensor& x,
                         const Tensor& weight, const Tensor& bias, std::int64_t rows,
                         std::int64_t cols, float eps) override;
  void layernorm_backward(Tensor& dx, Tensor& dweight, Tensor& dbias, const Tensor& dy,
                          const Tensor& x, const Tensor& weight, const Tensor& mean,
                          const Tensor& rstd, std::int64_t rows, std::int64_t cols,
                          bool accumulate_dx) override;
  void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& weight,
                       std::int64_t rows, std::int64_t cols, float eps) override;
  void residual_rmsnorm_forward(Tensor& sum, Tensor& y, Tensor& rstd, const Tensor& a,
                                const Tensor& b, const Tensor& weight, std::int64_t rows,
                                std::int64_t cols, float eps) override;
  void rmsnorm_backward(Tensor& dx, Tensor& dweight, const Tensor& dy, const Tensor& x,
                        const Tensor& weight, const Tensor& rstd, std::int64_t rows,
                        std::int64_t cols, bool accumulate_dx) override;
  void swiglu_forward(Tensor& y, const Tensor& x, std::int64_t rows, std::int64_t hidden) override;
  void swiglu_backward(Tensor& dx, const Tensor& dy, const Tensor& x, std::int64_t rows,
                       std::int64_t hidden) override;
  void rope(Tensor& y, const Tensor& x, const Tensor& table, int batch, int seq, int rot_heads,
            int heads, int head_dim, int pos0, bool inverse) override;
  // cuDNN's SDPA (grouped-query too) where it accepts the shape, the simple kernels otherwise.
  void attention_forward(Tensor& out, Tensor& lse, const Tensor& qkv, int batch, int seq,
                         int n_head, int n_kv_head, int head_size) override;
  void attention_backward(Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& out,
                          const Tensor& lse, int batch, int seq, int n_head, int n_kv_head,
                          int head_size) override;
  void attention_decode(Tensor& out, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv, int batch,
                        int max_seq, int pos, int n_head, int n_kv_head, int head_size) override;
  void embedding_forward(Tensor& out, const Tensor& tokens, const Tensor& wte, const Tensor& wpe,
                         int batch, int seq, int channels) override;
  void embedding_backward(Tensor& dwte, Tensor& dwpe, const Tensor& dout, const Tensor& tokens,
                          int batch, int seq, int channels) override;
  void cross_entropy_forward(Tensor& losses, Tensor& lse, const Tensor& logits,
                             const Tensor& targets, std::int64_t rows, std::int64_t padded_vocab,
                             int vocab) override;
  void cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& lse,
                              const Tensor& targets, std::int64_t rows, std::int64_t padded_vocab,
                              int vocab, float dloss) override;
  // 16-bit with a bias of the same dtype: matmul_gelu (cuBLASLt's GELU_AUX_BIAS epilogue);
  // otherwise matmul and the GELU kernel.
  void linear_gelu_forward(Tensor& pre, Tensor& y, const Tensor& x, const Tensor& w,
                           const Tensor* bias, std::int64_t m, std::int64_t n,
                           std::int64_t k) override;
  void residual_layernorm_forward(Tensor& sum, Tensor& y, Tensor& mean, Tensor& rstd,
                                  const Tensor& a, const Tensor& b, const Tensor& weight,
                                  const Tensor& bias, std::int64_t rows, std::int64_t cols,
                                  float eps) override;
  void cross_entropy_combine(Tensor& losses, Tensor& lse, const Tensor& parts, const Tensor& owner,
                             int ranks, std::int64_t rows) override;
  void cross_entropy_backward_split(Tensor& dlogits, const Tensor& logits, const Tensor& lse,
                                    const Tensor& targets, std::int64_t rows, std::int64_t cols,
                                    int valid, float dloss) override;
  void adamw_update(Tensor& param, Tensor& master, const Tensor& grad, Tensor& m, Tensor& v,
                    const ops::AdamWParams& p) override;
  double sum_of_squares(const Tensor& x) override;
  void token_range(const Tensor& tokens, std::int32_t& min_id, std::int64_t& min_at,
                   std::int32_t& max_id, std::int64_t& max_at) override;

  // out[M, N] = gelu(op(a) @ op(b) + bias) with pre_gelu[M, N] = op(a) @ op(b) + bias, in one
  // cuBLASLt call (epilogue GELU_AUX_BIAS; the tanh approximation of runtime/ops.hpp). All of
  // out, pre_gelu, a, b 16-bit of one dtype; bias of that dtype. Falls back to matmul + GELU
  // when cuBLASLt offers no algorithm for it.
  void matmul_gelu(Tensor& out, Tensor& pre_gelu, const Tensor& a, const Tensor& b,
                   const Tensor& bias, std::int64_t m, std::int64_t n, std::int64_t k, bool trans_a,
                   bool trans_b);

  // Which attention path ran last (for tests and benchmarks): true = cuDNN.
  bool last_attention_used_cudnn() const { return last_attention_cudnn_; }

 private:
  struct GemmKey {
    int trans_a, trans_b;
    std::int64_t m, n, k;
    int a_type, c_type, bias_type, epilogue;
    int align_a, align_b, align_c, accumulate;
    auto tie() const {
      return std::tie(trans_a, trans_b, m, n, k, a_type, c_type, bias_type, epilogue, align_a,
                      align_b, align_c, accumulate);
    }
    bool operator<(const GemmKey& o) const { return tie() < o.tie(); }
  };
  struct GemmPlan {
    bool found = false;
    cublasLtMatmulAlgo_t algo{};
  };
  // Runs one cuBLASLt matmul; returns false (nothing launched) when cuBLASLt has no algorithm.
  bool lt_matmul(void* out, DType out_type, const void* a, const void* b, DType ab_type,
                 std::int64_t m, std::int64_t n, std::int64_t k, bool trans_a, bool trans_b,
                 bool accumulate, const void* bias, DType bias_type, void* aux,
                 cublasLtEpilogue_t epilogue);

  cudaStream_t stream() const;

  static constexpr std::size_t kLtWorkspaceBytes = std::size_t{32} << 20;  // NVIDIA's Hopper advice

  CudaDevice& device_;
  cublasLtHandle_t lt_ = nullptr;
  DeviceBuffer lt_workspace_;
  std::map<GemmKey, GemmPlan> plans_;
  GrowingScratch scratch_;
  DeviceBuffer host_result_;  // small device buffer for values read back by the host
  PinnedBuffer host_readback_;
  std::unique_ptr<CudnnAttention, CudnnAttentionDeleter> cudnn_;
  bool last_attention_cudnn_ = false;
};

class CudaDevice final : public Device {
 public:
  explicit CudaDevice(int index);
  ~CudaDevice() override;

  DeviceType type() const override { return DeviceType::kCUDA; }
  int index() const override { return index_; }
  std::string name() const override { return "cuda:" + std::to_string(index_); }

  void* allocate(std::size_t nbytes) override;
  void deallocate(void* ptr, std::size_t nbytes) noexcept override;
  MemoryStats memory_stats() const override { return allocator_.stats(); }
  void reset_peak_memory() override { allocator_.reset_peak(); }
  void empty_cache() override;

  void copy_from_host(void* dst, const void* src, std::size_t nbytes) override;
  void copy_to_host(void* dst, const void* src, std::size_t nbytes) override;
  void copy_within(void* dst, const void* src, std::size_t nbytes) override;
  void fill_zero(void* dst, std::size_t nbytes) override;
  void synchronize() override;
  Backend& backend() override { return *backend_; }

  cudaStream_t stream() const { return stream_.get(); }

 private:
  int index_;
  Stream stream_;
  CachingAllocator allocator_;
  std::mutex staging_mu_;
  PinnedBuffer staging_;
  std::unique_ptr<CudaBackend> backend_;
};

// The compute stream of a CUDA device (throws InvalidArgument for any other device), for code
// that must order its own CUDA work with the ops (NCCL, benchmarks).
cudaStream_t stream_of(Device& device);

}  // namespace meshtrain::cuda
