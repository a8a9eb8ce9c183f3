// The flat layout: where each parameter sits in a model's flat buffers, and which flat elements
// a buffer holds. One type for the model (models::ParamInfo is ParamSlot), the gradient reducer,
// the optimizer and checkpoints.
//
// A model keeps its parameters, their gradients and the optimizer's per-element state (master
// weights, AdamW moments) in flat buffers, all in one order: parameter i is flat elements
// [offset, offset + shape.numel()), and the parameters tile the buffer without gaps. Under tensor
// parallelism each TP rank's flat buffer holds its shard of every split parameter, and the
// ParamSlot says how that shard is cut from the full tensor, so that checkpoints store and
// reshard parameters independently of the layout.
//
// A buffer that holds only some flat elements (this rank's ZeRO-1 shard, a checkpoint's piece
// of a state) says which with FlatRuns: its elements [local, local + length) are flat elements
// [flat, flat + length). A whole buffer is the one run {0, 0, n}.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "runtime/tensor.hpp"

namespace meshtrain::parallel {

// Sharding (parallel/tensor_parallel.hpp implements it): the full tensor, of shape full_shape,
// is viewed along shard_dim as shard_parts equal blocks (3 for a fused QKV projection: Q, K, V),
// and TP rank r of K holds from each block the r-th of K equal slices, the slices concatenated in
// block order. shard_dim = -1: replicated on every TP rank (shape == full_shape). The fields are
// the same at TP = 1 (shape == full_shape there), so a TP = 1 layout says how a TP = K one
// splits.
//
// Replicated shards (Megatron-LM's and vLLM's KV heads when a model has fewer KV heads than TP
// ranks): max_shards > 0 caps the slices per block. With K > max_shards ranks (K a multiple of
// it) the tensor is cut into max_shards slices per block and each slice is held by
// K / max_shards consecutive ranks: rank r holds slice r / replicas(K) of shard_count(K). Those
// replicas must stay identical: the model sums their gradients over the ranks that share them,
// and the norm and checkpoints count each slice once (on the first rank of its replicas).
struct ParamSlot {
  std::string name;         // "wte.weight", "h.0.attn.c_attn.weight", ...
  Shape shape;              // this rank's tensor (its TP shard)
  std::int64_t offset = 0;  // elements into the flat buffers
  Shape full_shape;         // the logical (unsharded) tensor
  int shard_dim = -1;       // -1: replicated on every TP rank
  int shard_parts = 1;      // equal blocks along shard_dim, each split over TP
  bool decay = false;       // AdamW's weight decay applies (2-D weights)
  // Rows (dim 0) at and after this index are layout-dependent zero padding (a vocabulary
  // padded to a multiple of 128 x TP): a checkpoint or weights file need not hold them, and
  // they load as zeros. -1: every row is real.
  std::int64_t real_rows = -1;
  // A copy of a parameter another pipeline stage holds (GPT-2's tied embedding on the last
  // stage, for its LM head): its gradient is summed with the original's over the embedding
  // group, so both update identically; the gradient norm and checkpoints count the original
  // only.
  bool tied_copy = false;
  // At most this many slices per block (see above); 0: as many as TP ranks.
  int max_shards = 0;

  std::int64_t numel() const { return shape.numel(); }
  bool replicated() const { return shard_dim < 0; }
  // Ranks of a TP group of tp_size that hold each slice of a split parameter (1: no replicas).
  int replicas(int tp_size) const {
    return shard_dim >= 0 && max_shards > 0 && tp_size > max_shards ? tp_size / max_shards : 1;
  }
  // The split a rank's shard is cut by: shard_index of shard_count equal slices per block.
  int shard_count(int tp_size) const { return tp_size / replicas(tp_size); }
  int shard_index(int tp_rank, int tp_size) const { return tp_rank / replicas(tp_size); }
  // Whether TP rank tp_rank counts this rank's elements in a sum over the TP group that must see
  // each logical element once (the gradient norm, checkpoint writes): a split parameter on the
  // first rank of each slice's replicas, a replicated one on rank 0, a tied copy never.
  bool counted_on(int tp_rank, int tp_size) const {
    if (tied_copy) return false;
    if (replicated()) return tp_rank == 0;
    return tp_rank % replicas(tp_size) == 0;
  }
};

// Buffer elements [local, local + length) hold flat elements [flat, flat + length).
struct FlatRun {
  std::int64_t flat = 0, local = 0, length = 0;
};

// The elements the slots cover. Throws InvalidArgument unless they tile [0, n) in order
// (each at the offset where the previous one ends, none empty); `who` names the caller.
std::int64_t flat_numel(std::span<const ParamSlot> slots, const char* who);

// Slot s's elements of a whole flat buffer, shaped as s.shape (a view).
Tensor slot_view(const Tensor& flat, const ParamSlot& s);

}  // namespace meshtrain::parallel
