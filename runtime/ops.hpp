// The op set: forward and backward of every layer the GPT and Llama families need (Llama 3,
// Qwen2: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention), on any device.
//
// Conventions, for every op below:
// - Tensors are contiguous, row-major, and all on one device. Shapes, dtypes and devices are
//   checked here and a mismatch throws InvalidArgument naming the argument and what was
//   expected; backends receive validated arguments only.
// - "Activations" are in the precision policy's compute dtype (fp32, bf16 or fp16). Matmuls
//   take 16-bit operands and accumulate in fp32; norms, softmax and losses compute in fp32.
// - Parameter gradients are fp32 and are ACCUMULATED (+=): zero them once per optimizer step
//   and micro-steps add up. Activation gradients are WRITTEN (=) unless an op says otherwise.
// - Ops are ordered on the device's compute stream. On the CPU they are complete on return.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "runtime/tensor.hpp"

namespace meshtrain::ops {

// ---- matmul -------------------------------------------------------------------------------

struct MatmulOptions {
  bool trans_a = false;          // a is stored [K, M]
  bool trans_b = false;          // b is stored [N, K]
  bool accumulate = false;       // out += result instead of out = result
  const Tensor* bias = nullptr;  // [N], added to every row (not with accumulate)
};

// out[M, N] = op(a) @ op(b) (+ bias), with a: [M, K] and b: [K, N] as stored unless transposed.
// a and b share a dtype; out may be any float dtype (fp32 out of 16-bit operands is how
// weight gradients are formed); bias has out's dtype or fp32. Leading dimensions of a and out
// are flattened: a [B, T, K] times b [K, N] gives out [B, T, N].
void matmul(Tensor& out, const Tensor& a, const Tensor& b, const MatmulOptions& opt = {});

// y[.., out] = x[.., in] @ w[out, in]^T + bias[out]   (PyTorch's nn.Linear layout)
// bias may be null: Llama's projections have none, and Qwen2 has one on its fused q/k/v
// projection only ([(n_head + 2 n_kv_head) D]: q_proj's, k_proj's and v_proj's biases).
void linear_forward(Tensor& y, const Tensor& x, const Tensor& w, const Tensor* bias);
// Fused: pre = x @ w^T + bias and y = gelu(pre) (the MLP up-projection; backward takes pre:
// gelu_backward, then linear_backward). CUDA runs one cuBLASLt matmul with the GELU_AUX_BIAS
// epilogue for 16-bit dtypes (GELU of the fp32 accumulator, so y may differ from
// gelu(rounded pre) by one 16-bit rounding); the CPU computes linear_forward then gelu_forward
// (the same bits as calling them).
void linear_gelu_forward(Tensor& pre, Tensor& y, const Tensor& x, const Tensor& w,
                         const Tensor* bias);
// dx = dy @ w (written; skipped when dx is null), dw += dy^T @ x, dbias += column sums of dy.
void linear_backward(Tensor* dx, Tensor& dw, Tensor* dbias, const Tensor& dy, const Tensor& x,
                     const Tensor& w);
// dbias[N] (fp32) += sum over rows of dy[.., N].
void bias_backward(Tensor& dbias, const Tensor& dy);

// ---- elementwise ----------------------------------------------------------------------------

// out = a + b (residual). out may alias a or b.
void add(Tensor& out, const Tensor& a, const Tensor& b);
// GELU, tanh approximation (GPT-2's): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
void gelu_forward(Tensor& y, const Tensor& x);
// dx = dy * gelu'(x). dx may alias dy.
void gelu_backward(Tensor& dx, const Tensor& dy, const Tensor& x);
// dst = src converted to dst's dtype (same numel, same device).
void convert(Tensor& dst, const Tensor& src);
// x *= alpha, in place (fp32 gradients after clipping or unscaling).
void scale_(Tensor& x, float alpha);

// ---- layernorm ------------------------------------------------------------------------------

// y = (x - mean) * rstd * weight + bias over the last dimension C; statistics in fp32.
// x, y: [.., C]; weight, bias: [C] in x's dtype; mean, rstd: fp32 with x.numel()/C elements.
void layernorm_forward(Tensor& y, Tensor& mean, Tensor& rstd, const Tensor& x, const Tensor& weight,
                       const Tensor& bias, float eps = 1e-5f);
// Fused residual add and LayerNorm (pre-LN blocks): sum = a + b (rounded to the dtype), then
// y = layernorm(sum), statistics from the rounded sum: the same as add then layernorm_forward
// (bit for bit on the CPU, which calls those). sum may alias a or b. CUDA: one pass per row.
// Backward needs no fused op: layernorm_backward(accumulate_dx = true) adds the LayerNorm's
// input gradient to the residual stream's gradient in the same pass, and an add passes its
// gradient through.
void residual_layernorm_forward(Tensor& sum, Tensor& y, Tensor& mean, Tensor& rstd, const Tensor& a,
                                const Tensor& b, const Tensor& weight, const Tensor& bias,
                                float eps = 1e-5f);
// dx = (or += when accumulate_dx) the input gradient; dweight, dbias (fp32) +=.
void layernorm_backward(Tensor& dx, Tensor& dweight, Tensor& dbias, const Tensor& dy,
                        const Tensor& x, const Tensor& weight, const Tensor& mean,
                        const Tensor& rstd, bool accumulate_dx);

// ---- RMSNorm (Llama, Qwen2) -----------------------------------------------------------------

// y = weight * round(x * rstd) with rstd = 1 / sqrt(mean(x^2) + eps) over the last dimension C,
// in fp32: Hugging Face's LlamaRMSNorm (and Qwen2RMSNorm), including its rounding of the
// normalised x to x's dtype before the product with weight (for 16-bit dtypes y is rounded
// twice, as there; for fp32 the rounding is the identity). x, y: [.., C]; weight: [C] in x's
// dtype; rstd: fp32 with x.numel()/C elements, kept for backward. y may alias x (for inference:
// backward needs x).
void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& weight,
                     float eps = 1e-6f);
// Fused residual add and RMSNorm (pre-norm blocks): sum = a + b (rounded to the dtype), then
// y = rmsnorm(sum), statistics from the rounded sum: the same as add then rmsnorm_forward (bit
// for bit on the CPU, which calls those). sum may alias a or b. CUDA: one pass per row.
// Backward needs no fused op: rmsnorm_backward(accumulate_dx = true) adds into the residual
// stream's gradient, as for LayerNorm.
void residual_rmsnorm_forward(Tensor& sum, Tensor& y, Tensor& rstd, const Tensor& a,
                              const Tensor& b, const Tensor& weight, float eps = 1e-6f);
// dx = (or += when accumulate_dx) the input gradient, dweight (fp32) +=. The gradient of
// weight * (x * rstd) in fp32, treating the forward's rounding of x * rstd as the identity.
void rmsnorm_backward(Tensor& dx, Tensor& dweight, const Tensor& dy, const Tensor& x,
                      const Tensor& weight, const Tensor& rstd, bool accumulate_dx);

// ---- SwiGLU (Llama, Qwen2 MLP) ---------------------------------------------------------------

// y[.., F] = silu(gate) * up, silu(g) = g / (1 + exp(-g)), from one fused gate|up projection
// x[.., 2F]: gate = x[.., :F], up = x[.., F:] (the rows of the fused weight are gate_proj's then
// up_proj's; under TP each rank holds its own slice of each, stacked the same way). fp32
// math, one rounding to the dtype (Hugging Face's LlamaMLP rounds silu(gate) to the dtype first
// in 16-bit: results may differ from it by one unit in the last place).
void swiglu_forward(Tensor& y, const Tensor& x);
// dx[.., 2F] (written): dgate = dy * up * silu'(gate), dup = dy * silu(gate). dx may alias x.
void swiglu_backward(Tensor& dx, const Tensor& dy, const Tensor& x);

// ---- rotary position embeddings (Llama, Qwen2) ----------------------------------------------

// Hugging Face config.json's rope_theta and rope_scaling. kLinear divides every frequency by
// factor ("rope_type": "linear"); kLlama3 is Llama 3.1's frequency scaling ("rope_type":
// "llama3"): wavelengths 2 pi / f above original_max_position / low_freq_factor are divided by
// factor, those below original_max_position / high_freq_factor are kept, and those between
// are interpolated smoothly (transformers' _compute_llama3_parameters).
struct RopeConfig {
  enum class Scaling { kNone, kLinear, kLlama3 };
  double theta = 10000.0;
  Scaling scaling = Scaling::kNone;
  double factor = 1.0;                        // kLinear, kLlama3: >= 1
  double low_freq_factor = 1.0;               // kLlama3
  double high_freq_factor = 4.0;              // kLlama3: > low_freq_factor
  std::int64_t original_max_position = 8192;  // kLlama3
};

// The head_dim / 2 inverse frequencies f_i = theta^(-2i / head_dim), scaled as cfg says:
// computed in double and rounded to fp32, which is where Hugging Face keeps them.
std::vector<float> rope_inv_freq(int head_dim, const RopeConfig& cfg);
// table: fp32 [max_position, head_dim], row t = [cos(t f_0) .. cos(t f_{D/2-1}) | sin(t f_0) ..
// sin(t f_{D/2-1})], on table's device. The angle t * f_i is the fp32 product, as Hugging
// Face's rotary embedding forms it (its phase error at long positions is reproduced, not
// improved on); cos and sin of it are rounded once. Built once per model on the host.
void rope_table(Tensor& table, const RopeConfig& cfg);

// Rotates the q and k heads of a fused projection by their positions, "rotate_half" style
// (Hugging Face Llama / Qwen2, GPT-NeoX): within each head of D = table.dim(1), element j < D/2
// pairs with j + D/2: y_j = x_j cos - x_{j+D/2} sin, y_{j+D/2} = x_{j+D/2} cos + x_j sin, with
// the cos and sin of table row pos0 + t. x, y: [B, T, (n_head + 2 n_kv_head) D] as attention
// takes it (q heads, k heads, then v heads, which are copied unchanged), or [B, W] for one
// token per sequence (T = 1, as attention_decode takes it). pos0 + T <= table.dim(0). fp32
// math with the fp32 table, one rounding (Hugging Face rounds cos and sin to the dtype first
// in 16-bit). y may alias x (in place: v is then not touched).
void rope_forward(Tensor& y, const Tensor& x, const Tensor& table, int n_head, int n_kv_head,
                  int pos0 = 0);
// The transpose (rotation by -angle): dx from dy, same layouts; dx may alias dy.
void rope_backward(Tensor& dx, const Tensor& dy, const Tensor& table, int n_head, int n_kv_head,
                   int pos0 = 0);

// ---- attention ------------------------------------------------------------------------------

// Causal multi-head self-attention on GPT-2's fused projection.
// qkv: [B, T, 3C] holding q, k, v of n_head heads of C / n_head each; out: [B, T, C];
// lse: fp32 [B, n_head, T], the log-sum-exp of each softmax row, kept for backward.
// Scores are scaled by 1/sqrt(head size) and softmaxed in fp32. Memory-efficient: no
// [B, n_head, T, T] tensor exists; backward recomputes the probabilities from lse.
void attention_forward(Tensor& out, Tensor& lse, const Tensor& qkv, int n_head);
// dqkv (written): [B, T, 3C].
void attention_backward(Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& out,
                        const Tensor& lse, int n_head);

// Grouped-query causal attention (Llama, Qwen2): qkv: [B, T, (n_head + 2 n_kv_head) D] holds
// the q of n_head heads, then the k and the v of n_kv_head heads (Hugging Face's q_proj,
// k_proj, v_proj outputs side by side); n_kv_head divides n_head and query head h attends with
// key/value head h / (n_head / n_kv_head) (transformers' repeat_kv). out: [B, T, n_head D];
// lse: fp32 [B, n_head, T]. With n_kv_head == n_head this is the multi-head attention above.
// Under tensor parallelism a rank passes its local heads: n_head / tp query heads and the key
// and value heads they use (n_kv_head / tp, or the one shared head when n_kv_head < tp).
void attention_forward(Tensor& out, Tensor& lse, const Tensor& qkv, int n_head, int n_kv_head);
// dqkv (written): the shape of qkv; the gradient of a key/value head sums over its query heads
// in a fixed order (deterministic).
void attention_backward(Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& out,
                        const Tensor& lse, int n_head, int n_kv_head);

// One decoding step with a KV cache. qkv: [B, 3C], the fused projection of the token at
// position pos; its k and v are stored in row pos of k_cache and v_cache ([B, T_max, C]), and
// out [B, C] is the causal attention of its q over positions 0..pos (fp32 softmax).
void attention_decode(Tensor& out, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv, int pos,
                      int n_head);
// The same for grouped-query attention: qkv: [B, (n_head + 2 n_kv_head) D]; the caches store
// only the key/value heads: [B, T_max, n_kv_head D]; out: [B, n_head D].
void attention_decode(Tensor& out, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv, int pos,
                      int n_head, int n_kv_head);

// ---- embedding ------------------------------------------------------------------------------

// out[b, t] = wte[tokens[b, t]] + wpe[t]. tokens: int32 [B, T]; wte: [V, C]; wpe: [T_max, C]
// (T <= T_max) or undefined for no position embedding. A token outside [0, V) throws,
// naming its position and value.
void embedding_forward(Tensor& out, const Tensor& tokens, const Tensor& wte, const Tensor& wpe);
// dwte[tokens[b, t]] += dout[b, t]; dwpe[t] += sum over b of dout[b, t] (fp32; dwpe may be
// undefined). Deterministic: the result does not depend on thread count.
void embedding_backward(Tensor& dwte, Tensor& dwpe, const Tensor& dout, const Tensor& tokens);

// ---- loss -----------------------------------------------------------------------------------

// Fused softmax cross-entropy over the first `vocab` columns of logits [N, V_padded]; padded
// columns are ignored (they never win and get zero gradient). targets: int32 [N]; a negative
// target marks a position to ignore (loss 0, gradient 0). losses, lse: fp32 [N].
void cross_entropy_forward(Tensor& losses, Tensor& lse, const Tensor& logits, const Tensor& targets,
                           int vocab);
// dlogits = dloss * (softmax(logits) - onehot(target)), written, padded columns 0. dloss
// scales every row (1 / number of counted targets for a mean, times the loss scale).
// dlogits may alias logits.
void cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& lse,
                            const Tensor& targets, int vocab, float dloss);

// ---- vocab-parallel loss (parallel/tensor_parallel.hpp) ------------------------------------
// Cross-entropy over logits whose vocabulary columns are split across K ranks, around one
// all-gather. Rank k first runs cross_entropy_forward on its own columns with its local targets
// (target - its first column where it holds the target, negative elsewhere): its partial
// log-sum-exp lse_k, and on the rank holding the target lse_k - logit[target].
// parts: fp32 [K, 2, N], rank k's lse_k then its losses_k, in rank order. owner: int32 [N], the
// rank holding row i's target, negative for an ignored row. Writes lse[i] = log sum_k
// exp(lse_k[i]) (in rank order: the same bits on every rank) and losses[i] = lse[i] - (lse_o[i]
// - losses_o[i]) for o = owner[i] (0 for ignored rows). lse_k may be -inf (a rank without real
// columns); at least one rank's must be finite.
void cross_entropy_combine(Tensor& losses, Tensor& lse, const Tensor& parts, const Tensor& owner);
// Backward on one rank's columns of logits [N, V_local]: dlogits = dloss * (exp(logit - lse) -
// onehot(t)) on the first `valid` columns (0 <= valid <= V_local), 0 beyond. targets: int32
// [N]: t in [0, valid) a target in this rank's columns, -1 a target on another rank (no one-hot
// term), -2 an ignored row (all 0). lse: the full log-sum-exp (cross_entropy_combine). dlogits
// may alias logits.
void cross_entropy_backward_split(Tensor& dlogits, const Tensor& logits, const Tensor& lse,
                                  const Tensor& targets, int valid, float dloss);

// ---- optimizer ------------------------------------------------------------------------------

struct AdamWParams {
  float lr = 3e-4f;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;  // decoupled: p -= lr * wd * p
  int step = 1;               // 1-based, for bias correction
  float grad_scale = 1.0f;    // the gradient is multiplied by this first (clipping, unscaling)
};

// AdamW on fp32 master weights, as torch.optim.AdamW. grad, m, v, master: fp32, same numel.
// param: the 16-bit copy used in compute, written from the updated master; pass an
// undefined tensor when master is itself the parameter (fp32 policy).
void adamw_update(Tensor& param, Tensor& master, const Tensor& grad, Tensor& m, Tensor& v,
                  const AdamWParams& p);

// Sum of squares of all elements in fp64 accumulation. Non-finite when any element is.
double sum_of_squares(const Tensor& x);
// sqrt of the summed squares of every tensor.
double global_norm(std::span<const Tensor> tensors);
// Scales every tensor so that their global norm is at most max_norm; returns the norm before
// clipping (non-finite norms are returned and nothing is scaled).
double clip_grad_norm(std::span<Tensor> tensors, double max_norm);

}  // namespace meshtrain::ops
