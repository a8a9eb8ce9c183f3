// The CPU backend: oneDNN for matmul, OpenMP loops for the rest. Each group of ops lives in
// its own file (matmul.cpp, attention.cpp, elementwise.cpp, layernorm.cpp, rmsnorm.cpp,
// rope.cpp, swiglu.cpp, embedding.cpp, cross_entropy.cpp, optimizer.cpp). Threads: see
// runtime/threads.hpp.
#pragma once

#include "runtime/backend.hpp"

namespace meshtrain::cpu {

class CpuBackend final : public Backend {
 public:
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
};

// Calls f(T*) ... with the typed pointers of a float tensor: the dispatch every kernel uses.
template <typename F>
void dispatch_float(DType t, F&& f) {
  switch (t) {
    case DType::kF32:
      f(float{});
      return;
    case DType::kBF16:
      f(bf16{});
      return;
    case DType::kF16:
      f(f16{});
      return;
    case DType::kI32:
      break;
  }
  MT_FAIL("expected a float dtype, got {}", dtype_name(t));
}

}  // namespace meshtrain::cpu
