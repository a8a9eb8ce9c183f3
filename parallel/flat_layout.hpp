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

  std::int64_t numel() const { return shape.numel(); }
  bool replicated() const { return shard_dim < 0; }
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
