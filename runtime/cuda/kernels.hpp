// Host entry points of our CUDA kernels (the .cu files). Plain types only, so that the .cu
// files need neither fmt nor the Tensor class: pointers are device memory, sizes are element
// counts, and every launch is queued on `stream` and checked (MT_CUDA_LAUNCH_CHECK) before the
// function returns. Arguments were validated by ops.cpp; nothing here re-checks shapes.
//
// Determinism: no kernel reduces with atomics. Reductions over rows (bias and layernorm
// gradients, sums of squares) write per-block partials that one more launch adds in a fixed
// order, so a result depends only on the inputs and the shape, never on scheduling.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "runtime/cuda/cuda_check.hpp"
#include "runtime/dtype.hpp"

namespace meshtrain::cuda {

// Device scratch memory for one op: get(n) returns at least n bytes, valid on the op's stream
// until the next get() (stream order makes reuse by the next op safe).
class Scratch {
 public:
  virtual void* get(std::size_t nbytes) = 0;

 protected:
  ~Scratch() = default;
};

namespace kernels {

// ---- elementwise (elementwise.cu) ----
void add(DType t, void* out, const void* a, const void* b, std::int64_t n, cudaStream_t s);
void gelu_forward(DType t, void* y, const void* x, std::int64_t n, cudaStream_t s);
void gelu_backward(DType t, void* dx, const void* dy, const void* x, std::int64_t n,
                   cudaStream_t s);
void convert(DType dst_type, void* dst, DType src_type, const void* src, std::int64_t n,
             cudaStream_t s);
void scale(DType t, void* x, float alpha, std::int64_t n, cudaStream_t s);

struct AdamWArgs {
  float lr, beta1, beta2, eps, weight_decay, grad_scale;
  int step;
};
// param may be null (fp32 policy: master is the parameter).
void adamw(DType param_type, void* param, float* master, const float* grad, float* m, float* v,
           std::int64_t n, const AdamWArgs& a, cudaStream_t s);

// sum of x^2 in fp64, written to *result (device). Needs scratch for kReduceBlocks doubles.
void sum_of_squares(DType t, const void* x, std::int64_t n, double* result, Scratch& scratch,
                    cudaStream_t s);
// dbias[cols] += column sums of dy[rows, cols].
void bias_backward(DType t, float* dbias, const void* dy, std::int64_t rows, std::int64_t cols,
                   Scratch& scratch, cudaStream_t s);
// out[0] = min id, out[1] = its first index, out[2] = max id, out[3] = its first index (device).
void token_range(const std::int32_t* tokens, std::int64_t n, std::int64_t* out, Scratch& scratch,
                 cudaStream_t s);

// ---- layernorm (layernorm.cu) ----
void layernorm_forward(DType t, void* y, float* mean, float* rstd, const void* x,
                       const void* weight, const void* bias, std::int64_t rows, std::int64_t cols,
                       float eps, cudaStream_t s);
// sum = a + b (may alias a or b), y = layernorm(sum): one warp per row.
void residual_layernorm_forward(DType t, void* sum, void* y, float* mean, float* rstd,
                                const void* a, const void* b, const void* weight, const void* bias,
                                std::int64_t rows, std::int64_t cols, float eps, cudaStream_t s);
void layernorm_backward(DType t, void* dx, float* dweight, float* dbias, const void* dy,
                        const void* x, const void* weight, const float* mean, const float* rstd,
                        std::int64_t rows, std::int64_t cols, bool accumulate_dx, Scratch& scratch,
                        cudaStream_t s);

// ---- RMSNorm (rmsnorm.cu): one warp per row, as layernorm ----
void rmsnorm_forward(DType t, void* y, float* rstd, const void* x, const void* weight,
                     std::int64_t rows, std::int64_t cols, float eps, cudaStream_t s);
// sum = a + b (may alias a or b), y = rmsnorm(sum).
void residual_rmsnorm_forward(DType t, void* sum, void* y, float* rstd, const void* a,
                              const void* b, const void* weight, std::int64_t rows,
                              std::int64_t cols, float eps, cudaStream_t s);
void rmsnorm_backward(DType t, void* dx, float* dweight, const void* dy, const void* x,
                      const void* weight, const float* rstd, std::int64_t rows, std::int64_t cols,
                      bool accumulate_dx, Scratch& scratch, cudaStream_t s);

// ---- SwiGLU (swiglu.cu): x [rows, 2 * hidden] = gate | up; y, dy [rows, hidden] ----
void swiglu_forward(DType t, void* y, const void* x, std::int64_t rows, std::int64_t hidden,
                    cudaStream_t s);
// dx may alias x.
void swiglu_backward(DType t, void* dx, const void* dy, const void* x, std::int64_t rows,
                     std::int64_t hidden, cudaStream_t s);

// ---- rotary embeddings (rope.cu) ----
// Rows of `heads` heads of head_dim, row b * seq + t at position pos0 + t; the first rot_heads
// heads rotated by table's angles (minus them when inverse), the rest copied when y != x.
void rope(DType t, void* y, const void* x, const float* table, int batch, int seq, int rot_heads,
          int heads, int head_dim, int pos0, bool inverse, cudaStream_t s);

// ---- embedding (embedding.cu) ----
// wpe may be null.
void embedding_forward(DType t, void* out, const std::int32_t* tokens, const void* wte,
                       const void* wpe, int batch, int seq, int channels, cudaStream_t s);
// dwpe may be null. vocab bounds the sort's key bits.
void embedding_backward(DType t, float* dwte, float* dwpe, const void* dout,
                        const std::int32_t* tokens, int batch, int seq, int channels,
                        std::int64_t vocab, Scratch& scratch, cudaStream_t s);

// ---- cross-entropy (cross_entropy.cu) ----
void cross_entropy_forward(DType t, float* losses, float* lse, const void* logits,
                           const std::int32_t* targets, std::int64_t rows,
                           std::int64_t padded_vocab, int vocab, cudaStream_t s);
void cross_entropy_backward(DType t, void* dlogits, const void* logits, const float* lse,
                            const std::int32_t* targets, std::int64_t rows,
                            std::int64_t padded_vocab, int vocab, float dloss, cudaStream_t s);
// Vocab-parallel pieces (runtime/ops.hpp): parts fp32 [ranks, 2, rows].
void cross_entropy_combine(float* losses, float* lse, const float* parts, const std::int32_t* owner,
                           int ranks, std::int64_t rows, cudaStream_t s);
void cross_entropy_backward_split(DType t, void* dlogits, const void* logits, const float* lse,
                                  const std::int32_t* targets, std::int64_t rows, std::int64_t cols,
                                  int valid, float dloss, cudaStream_t s);

// ---- attention (attention.cu): the simple kernels, for shapes and dtypes cuDNN refuses ----
// Head sizes up to kMaxHeadSize. qkv rows hold (n_head + 2 n_kv_head) * head_size elements
// (n_kv_head == n_head: multi-head attention); the decode caches n_kv_head * head_size per row.
inline constexpr int kMaxHeadSize = 256;
void attention_forward(DType t, void* out, float* lse, const void* qkv, int batch, int seq,
                       int n_head, int n_kv_head, int head_size, cudaStream_t s);
void attention_backward(DType t, void* dqkv, const void* dout, const void* qkv, const void* out,
                        const float* lse, int batch, int seq, int n_head, int n_kv_head,
                        int head_size, Scratch& scratch, cudaStream_t s);
void attention_decode(DType t, void* out, void* k_cache, void* v_cache, const void* qkv, int batch,
                      int max_seq, int pos, int n_head, int n_kv_head, int head_size,
                      cudaStream_t s);

}  // namespace kernels
}  // namespace meshtrain::cuda
