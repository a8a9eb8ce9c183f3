// Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): layers whose weights are split across
// the K ranks of a TP group, each an ordinary layer that calls the group's communicator in
// forward or backward.
//
// Operators on the TP group (Megatron's f and g):
//   f  identity in forward, allreduce(sum) of the input gradient in backward: where a replicated
//      activation enters a column-parallel layer (ln_1 -> QKV, ln_2 -> c_fc, ln_f -> LM head).
//   g  allreduce(sum) in forward, identity in backward: where a row-parallel layer's partial
//      outputs leave the TP region (attention c_proj, MLP c_proj, the vocab-parallel embedding).
//
// Sharding (the contract parallel::ParamSlot documents): a tensor of full shape F is split along
// one dimension d, viewed as `parts` equal blocks (3 for the fused QKV: Q, K, V); TP rank r of K
// holds from every block the r-th of K equal slices, concatenated in block order. So a column-
// parallel weight [out, in] is split along d = 0 (out), a row-parallel one along d = 1 (in), the
// vocab-parallel embedding along d = 0 (rows of the padded vocabulary).
//
// Replicated parameters (LayerNorms, biases of row-parallel layers, the position embedding) see
// identical inputs and identical gradients on every TP rank (each allreduce returns the same
// bits on every rank), so every rank computes the same update and they stay identical without
// communication. A row-parallel bias is added once: by TP rank 0, before the allreduce.
//
// Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
// Transformer Models"), when the group is built with it: the regions outside the column- and
// row-parallel layers (LayerNorms, residual adds) hold only this rank's shard of the tokens, so
// their activations take 1/K of the memory. f becomes an all-gather of the tokens before a
// column-parallel layer (a reduce-scatter of its input gradient in backward), and g a
// reduce-scatter after a row-parallel one (an all-gather of the output gradient in backward):
// the same bytes moved as the allreduce they replace (an allreduce is a reduce-scatter and an
// all-gather).
//
// The token shard: of the N = B x T tokens of a micro-batch, in [B, T] row-major order, rank r
// holds tokens [r N/K, (r + 1) N/K), as [N/K, C]. This is Megatron's shard of its [T, B, C]
// activations transposed to our batch-outermost layout: a contiguous block of the flat token
// dimension, so the all-gather and the reduce-scatter run on contiguous buffers with no permute
// on either side, and the gathered tensor is the [B, T, C] the attention and the linears
// already take. With B = 1 the shard is a range of sequence positions; with K dividing B it is
// whole sequences. Only per-token operations run on the shard (norms, residual adds, the
// embedding's sum), so which tokens a rank holds does not change any value: positions (wpe,
// rotary) are applied where the tokens are whole.
//
// All functions here are collective over the group when its size is above 1: every rank of the
// group calls them in the same order with the same shapes (comm/communicator.hpp). Thread-safety:
// as the communicator.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "comm/communicator.hpp"
#include "parallel/flat_layout.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain::parallel {

// A TP group as the layers see it: a communicator, or none for TP = 1 (then every collective is
// a no-op and the layers are the plain ones).
class TPGroup {
 public:
  TPGroup() = default;
  // The communicator must outlive the group; a communicator of size 1 acts as none.
  // sequence_parallel: the models shard their norm and residual regions along the tokens (see
  // the top of this file); ignored (off) for a group of one rank, where there is nothing to
  // shard.
  explicit TPGroup(comm::Communicator& tp, bool sequence_parallel = false)
      : comm_(tp.valid() && tp.size() > 1 ? &tp : nullptr),
        sequence_parallel_(comm_ != nullptr && sequence_parallel) {}

  int rank() const { return comm_ != nullptr ? comm_->rank() : 0; }
  int size() const { return comm_ != nullptr ? comm_->size() : 1; }
  bool active() const { return comm_ != nullptr; }
  bool sequence_parallel() const { return sequence_parallel_; }
  comm::Communicator* comm() const { return comm_; }

  // Blocking allreduce in place (no-op for TP = 1).
  void allreduce(const Tensor& t, comm::ReduceOp op = comm::ReduceOp::kSum) const;

  // ---- sequence parallelism: the token shard ----
  // Tokens of this rank's shard of `tokens` (N / K). Throws InvalidArgument naming both when K
  // does not divide N.
  std::int64_t shard_tokens(std::int64_t tokens) const;
  // full [N, ...] (any shape of N x width elements) = every rank's shard [N/K, ...] in rank
  // order: a blocking all-gather. The shards must be equal-sized and contiguous.
  void gather_tokens(Tensor& full, const Tensor& shard) const;
  // shard = this rank's token block of the sum over the group of every rank's full: a blocking
  // reduce-scatter. full is not modified.
  void reduce_scatter_tokens(Tensor& shard, const Tensor& full) const;

 private:
  comm::Communicator* comm_ = nullptr;
  bool sequence_parallel_ = false;
};

// ---- shards ----------------------------------------------------------------------------------

// The shape of rank r's shard of a tensor of full shape `full` (any r: shards are equal).
// Throws InvalidArgument when full[dim] is not a multiple of parts x size.
Shape shard_shape(const Shape& full, int dim, int parts, int size);
// shard = rank's shard of full (shapes as shard_shape; dtypes may differ: values are converted).
void copy_shard(Tensor& shard, const Tensor& full, int dim, int parts, int rank, int size);
// The inverse: writes rank's shard into its place in full.
void place_shard(Tensor& full, const Tensor& shard, int dim, int parts, int rank, int size);
// Collective: every rank of the group receives the full tensor (in the shard's dtype) assembled
// from every rank's shard. dim = -1 (replicated): a copy of the local tensor. replicas > 1: the
// tensor is cut into size / replicas slices, each held by `replicas` consecutive ranks
// (ParamSlot::max_shards); the first of each is used.
Tensor gather_full(const Tensor& shard, const Shape& full_shape, int dim, int parts,
                   const TPGroup& tp, int replicas = 1);
// The same for a ParamSlot (its dim, parts and replicas): TP rank `rank` of `size`'s shard of
// the full tensor, and the full tensor gathered from the group's shards. A replicated slot (or
// size 1) is a whole copy.
void copy_slot_shard(Tensor& shard, const Tensor& full, const ParamSlot& s, int rank, int size);
Tensor gather_slot(const Tensor& shard, const ParamSlot& s, const TPGroup& tp);

// ---- gradient norm ---------------------------------------------------------------------------

// The sum of squares of the gradient elements [lo, lo + grads.numel()) that this rank counts in
// the global norm (ParamSlot::counted_on): split parameters always, replicated slices of split
// ones (max_shards) on the first rank of their replicas, replicated parameters on TP rank 0
// only, tied copies (ParamSlot::tied_copy) never.
double norm_squared_share(const Tensor& grads, std::int64_t lo, std::span<const ParamSlot> params,
                          int tp_rank, int tp_size);

// ---- column- and row-parallel linear --------------------------------------------------------

// Column-parallel linear: w is this rank's rows [out/K, in] of the full [out, in] weight, bias
// its [out/K] slice; x is replicated. y = x w^T + bias, this rank's out/K columns of the output.
// Forward is f's identity: no communication.
void column_linear_forward(Tensor& y, const Tensor& x, const Tensor& w, const Tensor* bias);
// The same with GELU fused (ops::linear_gelu_forward): pre = x w^T + bias, y = gelu(pre).
void column_linear_gelu_forward(Tensor& pre, Tensor& y, const Tensor& x, const Tensor& w,
                                const Tensor* bias);
// dw, dbias += this rank's gradient; dx (when not null) = f's backward: the allreduce over the
// group of every rank's partial dy w.
void column_linear_backward(Tensor* dx, Tensor& dw, Tensor* dbias, const Tensor& dy,
                            const Tensor& x, const Tensor& w, const TPGroup& tp);
// Sequence parallelism: x_full is the gathered input ([N, in], TPGroup::gather_tokens of the
// shard the forward gathered); dw, dbias += this rank's gradient; dx_full (workspace [N, in]) =
// this rank's partial dy w, and dx [N/K, in] = its reduce-scatter: the summed input gradient of
// this rank's tokens (the all-gather's backward).
void column_linear_backward_sp(Tensor& dx, Tensor& dx_full, Tensor& dw, Tensor* dbias,
                               const Tensor& dy, const Tensor& x_full, const Tensor& w,
                               const TPGroup& tp);

// Row-parallel linear: w is this rank's columns [out, in/K] of the full weight, x this rank's
// in/K features, bias the full (replicated) [out]. y = allreduce_sum(x w^T) + bias, the bias
// added by rank 0 alone before the allreduce (g's forward).
void row_linear_forward(Tensor& y, const Tensor& x, const Tensor& w, const Tensor* bias,
                        const TPGroup& tp);
// Sequence parallelism: y_full (workspace [N, out]) = x w^T (+ bias on rank 0), y [N/K, out] =
// its reduce-scatter, this rank's tokens of the summed output. The bias is added before the sum,
// in the region where every token is present: its gradient (row_linear_backward on the
// all-gathered dy) is the full column sum on every rank, with no further reduction.
void row_linear_forward_sp(Tensor& y, Tensor& y_full, const Tensor& x, const Tensor& w,
                           const Tensor* bias, const TPGroup& tp);
// Sequence parallelism: `partial` (fp32) is the gradient of a replicated parameter that only
// the token shard uses (a norm's weight, or LayerNorm's adjacent weight and bias) from this
// rank's tokens of one micro-batch; it is summed over the group in place, then added to `grad`
// (same shape). Only the micro-batch's share travels: `grad` already holds earlier
// micro-batches' group sums, identical on every rank, and summing it again would count them K
// times.
void accumulate_group_sum(Tensor& grad, const Tensor& partial, const TPGroup& tp);
// g's backward is the identity: dy is the same on every rank (under sequence parallelism, the
// caller all-gathers the shard's gradient into it first). dx = dy w (this rank's in/K features);
// dw += this rank's gradient; dbias (replicated) += column sums of dy on every rank.
void row_linear_backward(Tensor* dx, Tensor& dw, Tensor* dbias, const Tensor& dy, const Tensor& x,
                         const Tensor& w);

// ---- vocab-parallel embedding ----------------------------------------------------------------

// Token embedding with the rows of wte split across the group: rank r holds rows
// [vocab_start, vocab_start + wte.dim(0)) of the padded vocabulary. Forward looks up the ids this
// rank holds, writes zero for the others (masked), adds the (replicated) position embedding on
// rank 0, and allreduces (g). Backward: every rank holds the same output gradient; this rank's
// rows of dwte get the gradient of its own ids, dwpe (replicated) the full gradient.
class VocabParallelEmbedding {
 public:
  // ids: host token ids of tokens [B, T] (B * T values, each in [0, vocabulary)); out: [B, T, C].
  // With `shard` (sequence parallelism): the rows are summed by a reduce-scatter into shard
  // ([B T / K, C], this rank's tokens) instead of the allreduce, and out is a workspace.
  void forward(Tensor& out, const std::vector<std::int32_t>& ids, int batch, int seq,
               const Tensor& wte, const Tensor& wpe, std::int64_t vocab_start, const TPGroup& tp,
               Tensor* shard = nullptr);
  // After forward: dwte (this rank's rows) and dwpe (fp32) +=. dout ([B, T, C], every token:
  // under sequence parallelism the all-gathered gradient of the shards) is not modified.
  void backward(Tensor& dwte, Tensor& dwpe, const Tensor& dout);

 private:
  // Runs [first, second) of flat token positions whose ids this rank does not hold.
  std::vector<std::pair<std::int64_t, std::int64_t>> masked_;
  Tensor local_ids_;  // int32 [B, T]: id - vocab_start, 0 where masked
  Tensor scratch_;    // dout with the masked rows zeroed
  int batch_ = 0, seq_ = 0;
};

// ---- vocab-parallel cross-entropy ------------------------------------------------------------

// Softmax cross-entropy over logits whose columns are split across the group: rank r holds
// columns [vocab_start, vocab_start + logits.dim(-1)) of the padded vocabulary; columns at or
// beyond `vocab` are padding (ignored, zero gradient). The full-vocabulary logits are never
// gathered. Runs on any device (on a GPU, on its stream): each rank runs
// ops::cross_entropy_forward on its own columns, one all-gather of every rank's partial
// log-sum-exp and loss ([K, 2, N] fp32), then ops::cross_entropy_combine; backward is
// ops::cross_entropy_backward_split. Deterministic, and every rank gets the same losses.
class VocabParallelCrossEntropy {
 public:
  // logits: [N, V/K] (activation dtype); targets: N host ids, negative = ignored (loss 0).
  // losses: fp32 [N] on the logits' device, written (identical on every rank).
  void forward(Tensor& losses, const Tensor& logits, const std::vector<std::int32_t>& targets,
               std::int64_t vocab_start, int vocab, const TPGroup& tp);
  // dlogits = dloss * (softmax - onehot(target)) on this rank's columns, written, padded columns
  // zero, ignored rows zero. dlogits may alias logits.
  void backward(Tensor& dlogits, const Tensor& logits, float dloss);

 private:
  // On the logits' device: local targets (-1: another rank's, -2: ignored), the owner rank of
  // each target (-1: ignored), this rank's [lse; losses], everyone's, and the full lse.
  Tensor local_, owner_, stats_, parts_, lse_;
  std::int64_t vocab_start_ = 0;
  int vocab_ = 0;
};

}  // namespace meshtrain::parallel
