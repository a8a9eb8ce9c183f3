// The backend interface: one implementation per device type (CPU here; CUDA in
// runtime/cuda/). ops*.cpp validate every argument and call these with tensors that are
// contiguous, on this backend's device, and of shapes and dtypes the op's contract allows.
// Composite ops (linear, clipping) are built in ops*.cpp from these and need no backend code.
#pragma once

#include "runtime/ops.hpp"

namespace meshtrain {

class Backend {
 public:
  virtual ~Backend() = default;

  // out[M, N] (+)= op(a) @ op(b) (+ bias), with the flattened sizes given.
  virtual void matmul(Tensor& out, const Tensor& a, const Tensor& b, std::int64_t m, std::int64_t n,
                      std::int64_t k, const ops::MatmulOptions& opt) = 0;
  virtual void bias_backward(Tensor& dbias, const Tensor& dy, std::int64_t rows,
                             std::int64_t cols) = 0;
  virtual void add(Tensor& out, const Tensor& a, const Tensor& b) = 0;
  virtual void gelu_forward(Tensor& y, const Tensor& x) = 0;
  virtual void gelu_backward(Tensor& dx, const Tensor& dy, const Tensor& x) = 0;
  virtual void convert(Tensor& dst, const Tensor& src) = 0;
  virtual void scale(Tensor& x, float alpha) = 0;
  virtual void layernorm_forward(Tensor& y, Tensor& mean, Tensor& rstd, const Tensor& x,
                                 const Tensor& weight, const Tensor& bias, std::int64_t rows,
                                 std::int64_t cols, float eps) = 0;
  virtual void layernorm_backward(Tensor& dx, Tensor& dweight, Tensor& dbias, const Tensor& dy,
                                  const Tensor& x, const Tensor& weight, const Tensor& mean,
                                  const Tensor& rstd, std::int64_t rows, std::int64_t cols,
                                  bool accumulate_dx) = 0;
  virtual void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& weight,
                               std::int64_t rows, std::int64_t cols, float eps) = 0;
  virtual void residual_rmsnorm_forward(Tensor& sum, Tensor& y, Tensor& rstd, const Tensor& a,
                                        const Tensor& b, const Tensor& weight, std::int64_t rows,
                                        std::int64_t cols, float eps) = 0;
  virtual void rmsnorm_backward(Tensor& dx, Tensor& dweight, const Tensor& dy, const Tensor& x,
                                const Tensor& weight, const Tensor& rstd, std::int64_t rows,
                                std::int64_t cols, bool accumulate_dx) = 0;
  // x: [rows, 2 * hidden] (gate | up), y: [rows, hidden]; dx like x.
  virtual void swiglu_forward(Tensor& y, const Tensor& x, std::int64_t rows,
                              std::int64_t hidden) = 0;
  virtual void swiglu_backward(Tensor& dx, const Tensor& dy, const Tensor& x, std::int64_t rows,
                               std::int64_t hidden) = 0;
  // Rotary embedding on rows of `heads` heads of head_dim (rows = batch * seq, row b * seq + t at
  // position pos0 + t): the first rot_heads heads are rotated by the table's angles (by minus
  // them when inverse), the others copied when y is not x.
  virtual void rope(Tensor& y, const Tensor& x, const Tensor& table, int batch, int seq,
                    int rot_heads, int heads, int head_dim, int pos0, bool inverse) = 0;
  // n_kv_head divides n_head (equal for multi-head attention); qkv rows hold
  // (n_head + 2 n_kv_head) * head_size elements.
  virtual void attention_forward(Tensor& out, Tensor& lse, const Tensor& qkv, int batch, int seq,
                                 int n_head, int n_kv_head, int head_size) = 0;
  virtual void attention_backward(Tensor& dqkv, const Tensor& dout, const Tensor& qkv,
                                  const Tensor& out, const Tensor& lse, int batch, int seq,
                                  int n_head, int n_kv_head, int head_size) = 0;
  virtual void attention_decode(Tensor& out, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv,
                                int batch, int max_seq, int pos, int n_head, int n_kv_head,
                                int head_size) = 0;
  // Token ids are already checked to lie in [0, V).
  virtual void embedding_forward(Tensor& out, const Tensor& tokens, const Tensor& wte,
                                 const Tensor& wpe, int batch, int seq, int channels) = 0;
  virtual void embedding_backward(Tensor& dwte, Tensor& dwpe, const Tensor& dout,
                                  const Tensor& tokens, int batch, int seq, int channels) = 0;
  virtual void cross_entropy_forward(Tensor& losses, Tensor& lse, const Tensor& logits,
                                     const Tensor& targets, std::int64_t rows,
                                     std::int64_t padded_vocab, int vocab) = 0;
  virtual void cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& lse,
                                      const Tensor& targets, std::int64_t rows,
                                      std::int64_t padded_vocab, int vocab, float dloss) = 0;
  // Fused ops (ops.hpp): the CPU composes them from the ops above.
  virtual void linear_gelu_forward(Tensor& pre, Tensor& y, const Tensor& x, const Tensor& w,
                                   const Tensor* bias, std::int64_t m, std::int64_t n,
                                   std::int64_t k) = 0;
  virtual void residual_layernorm_forward(Tensor& sum, Tensor& y, Tensor& mean, Tensor& rstd,
                                          const Tensor& a, const Tensor& b, const Tensor& weight,
                                          const Tensor& bias, std::int64_t rows, std::int64_t cols,
                                          float eps) = 0;
  // Vocab-parallel loss pieces; owner values are checked to lie below ranks.
  virtual void cross_entropy_combine(Tensor& losses, Tensor& lse, const Tensor& parts,
                                     const Tensor& owner, int ranks, std::int64_t rows) = 0;
  virtual void cross_entropy_backward_split(Tensor& dlogits, const Tensor& logits,
                                            const Tensor& lse, const Tensor& targets,
                                            std::int64_t rows, std::int64_t cols, int valid,
                                            float dloss) = 0;
  virtual void adamw_update(Tensor& param, Tensor& master, const Tensor& grad, Tensor& m, Tensor& v,
                            const ops::AdamWParams& p) = 0;
  virtual double sum_of_squares(const Tensor& x) = 0;
  // Largest token id in tokens and its flat index, for range checks (-1 when empty); and the
  // smallest. Used by ops_embedding_loss.cpp to validate embedding inputs before any work.
  virtual void token_range(const Tensor& tokens, std::int32_t& min_id, std::int64_t& min_at,
                           std::int32_t& max_id, std::int64_t& max_at) = 0;
};

}  // namespace meshtrain
