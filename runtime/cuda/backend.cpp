// CudaBackend: its construction (the cuBLASLt handle) and the ops that are one or two kernel
// launches (kernels.hpp). matmul.cpp holds the cuBLASLt ops, attention.cpp the attention ops.
#include <cstring>

#include "runtime/cuda/cuda_backend.hpp"
#include "runtime/cuda/cuda_check.hpp"
#include "runtime/log.hpp"

namespace meshtrain::cuda {

CudaBackend::CudaBackend(CudaDevice& device)
    : device_(device),
      lt_workspace_(device, kLtWorkspaceBytes),
      scratch_(device),
      host_result_(device, 64),
      host_readback_(64) {
  DeviceGuard g(device.index());
  MT_CUBLAS_CHECK(cublasLtCreate(&lt_));
}

CudaBackend::~CudaBackend() {
  cudnn_.reset();
  if (lt_ != nullptr) MT_CUBLAS_LOG(cublasLtDestroy(lt_));
}

cudaStream_t CudaBackend::stream() const {
  return device_.stream();
}

void CudaBackend::bias_backward(Tensor& dbias, const Tensor& dy, std::int64_t rows,
                                std::int64_t cols) {
  DeviceGuard g(device_.index());
  kernels::bias_backward(dy.dtype(), static_cast<float*>(dbias.data()), dy.data(), rows, cols,
                         scratch_, stream());
}

void CudaBackend::add(Tensor& out, const Tensor& a, const Tensor& b) {
  DeviceGuard g(device_.index());
  kernels::add(out.dtype(), out.data(), a.data(), b.data(), out.numel(), stream());
}

void CudaBackend::gelu_forward(Tensor& y, const Tensor& x) {
  DeviceGuard g(device_.index());
  kernels::gelu_forward(x.dtype(), y.data(), x.data(), x.numel(), stream());
}

void CudaBackend::gelu_backward(Tensor& dx, const Tensor& dy, const Tensor& x) {
  DeviceGuard g(device_.index());
  kernels::gelu_backward(x.dtype(), dx.data(), dy.data(), x.data(), x.numel(), stream());
}

void CudaBackend::convert(Tensor& dst, const Tensor& src) {
  DeviceGuard g(device_.index());
  kernels::convert(dst.dtype(), dst.data(), src.dtype(), src.data(), dst.numel(), stream());
}

void CudaBackend::scale(Tensor& x, float alpha) {
  DeviceGuard g(device_.index());
  kernels::scale(x.dtype(), x.data(), alpha, x.numel(), stream());
}

void CudaBackend::layernorm_forward(Tensor& y, Tensor& mean, Tensor& rstd, const Tensor& x,
                                    const Tensor& weight, const Tensor& bias, std::int64_t rows,
                                    std::int64_t cols, float eps) {
  DeviceGuard g(device_.index());
  kernels::layernorm_forward(x.dtype(), y.data(), static_cast<float*>(mean.data()),
                             static_cast<float*>(rstd.data()), x.data(), weight.data(), bias.data(),
                             rows, cols, eps, stream());
}

void CudaBackend::layernorm_backward(Tensor& dx, Tensor& dweight, Tensor& dbias, const Tensor& dy,
                                     const Tensor& x, const Tensor& weight, const Tensor& mean,
                                     const Tensor& rstd, std::int64_t rows, std::int64_t cols,
                                     bool accumulate_dx) {
  DeviceGuard g(device_.index());
  kernels::layernorm_backward(
      x.dtype(), dx.data(), static_cast<float*>(dweight.data()), static_cast<float*>(dbias.data()),
      dy.data(), x.data(), weight.data(), static_cast<const float*>(mean.data()),
      static_cast<const float*>(rstd.data()), rows, cols, accumulate_dx, scratch_, stream());
}

void CudaBackend::rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& weight,
                                  std::int64_t rows, std::int64_t cols, float eps) {
  DeviceGuard g(device_.index());
  kernels::rmsnorm_forward(x.dtype(), y.data(), static_cast<float*>(rstd.data()), x.data(),
                           weight.data(), rows, cols, eps, stream());
}

void CudaBackend::residual_rmsnorm_forward(Tensor& sum, Tensor& y, Tensor& rstd, const Tensor& a,
                                           const Tensor& b, const Tensor& weight, std::int64_t rows,
                                           std::int64_t cols, float eps) {
  DeviceGuard g(device_.index());
  kernels::residual_rmsnorm_forward(a.dtype(), sum.data(), y.data(),
                                    static_cast<float*>(rstd.data()), a.data(), b.data(),
                                    weight.data(), rows, cols, eps, stream());
}

void CudaBackend::rmsnorm_backward(Tensor& dx, Tensor& dweight, const Tensor& dy, const Tensor& x,
                                   const Tensor& weight, const Tensor& rstd, std::int64_t rows,
                                   std::int64_t cols, bool accumulate_dx) {
  DeviceGuard g(device_.index());
  kernels::rmsnorm_backward(x.dtype(), dx.data(), static_cast<float*>(dweight.data()), dy.data(),
                            x.data(), weight.data(), static_cast<const float*>(rstd.data()), rows,
                            cols, accumulate_dx, scratch_, stream());
}

void CudaBackend::swiglu_forward(Tensor& y, const Tensor& x, std::int64_t rows,
                                 std::int64_t hidden) {
  DeviceGuard g(device_.index());
  kernels::swiglu_forward(x.dtype(), y.data(), x.data(), rows, hidden, stream());
}

void CudaBackend::swiglu_backward(Tensor& dx, const Tensor& dy, const Tensor& x, std::int64_t rows,
                                  std::int64_t hidden) {
  DeviceGuard g(device_.index());
  kernels::swiglu_backward(x.dtype(), dx.data(), dy.data(), x.data(), rows, hidden, stream());
}

void CudaBackend::rope(Tensor& y, const Tensor& x, const Tensor& table, int batch, int seq,
                       int rot_heads, int heads, int head_dim, int pos0, bool inverse) {
  DeviceGuard g(device_.index());
  kernels::rope(x.dtype(), y.data(), x.data(), static_cast<const float*>(table.data()), batch, seq,
                rot_heads, heads, head_dim, pos0, inverse, stream());
}

void CudaBackend::attention_decode(Tensor& out, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv,
                                   int batch, int max_seq, int pos, int n_head, int n_kv_head,
                                   int head_size) {
  MT_CHECK(head_size <= kernels::kMaxHeadSize,
           "attention_decode on CUDA supports head sizes up to {}, got {}", kernels::kMaxHeadSize,
           head_size);
  DeviceGuard g(device_.index());
  kernels::attention_decode(qkv.dtype(), out.data(), k_cache.data(), v_cache.data(), qkv.data(),
                            batch, max_seq, pos, n_head, n_kv_head, head_size, stream());
}

void CudaBackend::embedding_forward(Tensor& out, const Tensor& tokens, const Tensor& wte,
                                    const Tensor& wpe, int batch, int seq, int channels) {
  DeviceGuard g(device_.index());
  kernels::embedding_forward(wte.dtype(), out.data(),
                             static_cast<const std::int32_t*>(tokens.data()), wte.data(),
                             wpe.defined() ? wpe.data() : nullptr, batch, seq, channels, stream());
}

void CudaBackend::embedding_backward(Tensor& dwte, Tensor& dwpe, const Tensor& dout,
                                     const Tensor& tokens, int batch, int seq, int channels) {
  DeviceGuard g(device_.index());
  kernels::embedding_backward(dout.dtype(), static_cast<float*>(dwte.data()),
                              dwpe.defined() ? static_cast<float*>(dwpe.data()) : nullptr,
                              dout.data(), static_cast<const std::int32_t*>(tokens.data()), batch,
                              seq, channels, dwte.dim(0), scratch_, stream());
}

void CudaBackend::cross_entropy_forward(Tensor& losses, Tensor& lse, const Tensor& logits,
                                        const Tensor& targets, std::int64_t rows,
                                        std::int64_t padded_vocab, int vocab) {
  DeviceGuard g(device_.index());
  kernels::cross_entropy_forward(logits.dtype(), static_cast<float*>(losses.data()),
                                 static_cast<float*>(lse.data()), logits.data(),
                                 static_cast<const std::int32_t*>(targets.data()), rows,
                                 padded_vocab, vocab, stream());
}

void CudaBackend::cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& lse,
                                         const Tensor& targets, std::int64_t rows,
                                         std::int64_t padded_vocab, int vocab, float dloss) {
  DeviceGuard g(device_.index());
  kernels::cross_entropy_backward(
      logits.dtype(), dlogits.data(), logits.data(), static_cast<const float*>(lse.data()),
      static_cast<const std::int32_t*>(targets.data()), rows, padded_vocab, vocab, dloss, stream());
}

void CudaBackend::cross_entropy_combine(Tensor& losses, Tensor& lse, const Tensor& parts,
                                        const Tensor& owner, int ranks, std::int64_t rows) {
  DeviceGuard g(device_.index());
  kernels::cross_entropy_combine(
      static_cast<float*>(losses.data()), static_cast<float*>(lse.data()),
      static_cast<const float*>(parts.data()), static_cast<const std::int32_t*>(owner.data()),
      ranks, rows, stream());
}

void CudaBackend::cross_entropy_backward_split(Tensor& dlogits, const Tensor& logits,
                                               const Tensor& lse, const Tensor& targets,
                                               std::int64_t rows, std::int64_t cols, int valid,
                                               float dloss) {
  DeviceGuard g(device_.index());
  kernels::cross_entropy_backward_split(
      logits.dtype(), dlogits.data(), logits.data(), static_cast<const float*>(lse.data()),
      static_cast<const std::int32_t*>(targets.data()), rows, cols, valid, dloss, stream());
}

void CudaBackend::residual_layernorm_forward(Tensor& sum, Tensor& y, Tensor& mean, Tensor& rstd,
                                             const Tensor& a, const Tensor& b, const Tensor& weight,
                                             const Tensor& bias, std::int64_t rows,
                                             std::int64_t cols, float eps) {
  DeviceGuard g(device_.index());
  kernels::residual_layernorm_forward(a.dtype(), sum.data(), y.data(),
                                      static_cast<float*>(mean.data()),
                                      static_cast<float*>(rstd.data()), a.data(), b.data(),
                                      weight.data(), bias.data(), rows, cols, eps, stream());
}

void CudaBackend::linear_gelu_forward(Tensor& pre, Tensor& y, const Tensor& x, const Tensor& w,
                                      const Tensor* bias, std::int64_t m, std::int64_t n,
                                      std::int64_t k) {
  if (x.dtype() != DType::kF32 && bias != nullptr && bias->dtype() == x.dtype()) {
    matmul_gelu(y, pre, x, w, *bias, m, n, k, /*trans_a=*/false, /*trans_b=*/true);
    return;
  }
  ops::MatmulOptions opt;
  opt.trans_b = true;
  opt.bias = bias;
  matmul(pre, x, w, m, n, k, opt);
  gelu_forward(y, pre);
}

void CudaBackend::adamw_update(Tensor& param, Tensor& master, const Tensor& grad, Tensor& m,
                               Tensor& v, const ops::AdamWParams& p) {
  DeviceGuard g(device_.index());
  const kernels::AdamWArgs a{p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, p.grad_scale, p.step};
  kernels::adamw(param.defined() ? param.dtype() : DType::kF32,
                 param.defined() ? param.data() : nullptr, static_cast<float*>(master.data()),
                 static_cast<const float*>(grad.data()), static_cast<float*>(m.data()),
                 static_cast<float*>(v.data()), master.numel(), a, stream());
}

double CudaBackend::sum_of_squares(const Tensor& x) {
  DeviceGuard g(device_.index());
  auto* result = static_cast<double*>(host_result_.data());
  kernels::sum_of_squares(x.dtype(), x.data(), x.numel(), result, scratch_, stream());
  MT_CUDA_CHECK(cudaMemcpyAsync(host_readback_.data(), result, sizeof(double),
                                cudaMemcpyDeviceToHost, stream()));
  MT_CUDA_CHECK(cudaStreamSynchronize(stream()));
  double v;
  std::memcpy(&v, host_readback_.data(), sizeof v);
  return v;
}

void CudaBackend::token_range(const Tensor& tokens, std::int32_t& min_id, std::int64_t& min_at,
                              std::int32_t& max_id, std::int64_t& max_at) {
  DeviceGuard g(device_.index());
  auto* out = static_cast<std::int64_t*>(host_result_.data());
  kernels::token_range(static_cast<const std::int32_t*>(tokens.data()), tokens.numel(), out,
                       scratch_, stream());
  MT_CUDA_CHECK(cudaMemcpyAsync(host_readback_.data(), out, 4 * sizeof(std::int64_t),
                                cudaMemcpyDeviceToHost, stream()));
  MT_CUDA_CHECK(cudaStreamSynchronize(stream()));
  std::int64_t v[4];
  std::memcpy(v, host_readback_.data(), sizeof v);
  min_id = static_cast<std::int32_t>(v[0]);
  min_at = v[1];
  max_id = static_cast<std::int32_t>(v[2]);
  max_at = v[3];
}

}  // namespace meshtrain::cuda
