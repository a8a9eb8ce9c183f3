// The geometry of distributed checkpoints (parallel/checkpoint.hpp), apart from any file: how a
// rank's flat buffers map onto boxes of the logical tensors, which pieces a rank writes, and the
// load plan: from the pieces a checkpoint holds and the layout of the rank that loads it, which
// element runs of which piece go where, each element of the targets covered exactly once. Pure
// functions, so that resharding is tested without files (tests/parallel/test_checkpoint.cpp).
// Internal to parallel/: checkpoint.cpp and its tests use it.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "parallel/flat_layout.hpp"

namespace meshtrain::parallel::ckpt {

// A box of a logical tensor: offsets and shape in full coordinates.
struct Box {
  std::vector<std::int64_t> offsets, shape;
  std::int64_t numel() const;
};

// The boxes of the full tensor that TP rank tp_rank of tp_size holds of a slot, in the order of
// its local elements; each box's local elements are contiguous (a slot with parts > 1 must be
// split along dimension 0: InvalidArgument otherwise).
std::vector<Box> shard_boxes(const ParamSlot& s, int tp_rank, int tp_size);

// A piece of a checkpoint: elements [flat_lo, flat_hi) (row-major) of a box of a logical
// tensor, stored as the tensor `key` of shard file `file`.
struct Piece {
  std::string tensor, kind, file, key;
  Box box;
  std::int64_t flat_lo = 0, flat_hi = 0;
  std::int64_t src = 0;  // writer side: the flat element of the writer's buffers at flat_lo
};

// The shard file world rank r writes: "shard-00003.safetensors".
std::string shard_file_name(int world_rank);

// The flat runs DP rank d writes by default: [d, d + 1) x ceil(n / DP).
std::vector<FlatRun> default_writes(std::int64_t flat_numel, int dp_rank, int dp_size);

// The pieces TP rank tp_rank writes for its flat runs (of every state kind), cut along tensors
// and boxes. A tensor replicated over TP is written by one TP rank, chosen in turn by tensor; a
// tied copy (ParamSlot::tied_copy) is not written (its original is); a slice several TP ranks
// hold (ParamSlot::max_shards) is written by one of them, chosen in turn by tensor.
std::vector<Piece> writer_pieces(std::span<const ParamSlot> slots, std::span<const FlatRun> runs,
                                 const std::vector<std::string>& kinds, int tp_rank, int tp_size,
                                 int world_rank);

// What a loading rank fills: flat elements [flat_lo, flat_hi) of its `kind` state.
struct LoadTarget {
  std::string kind;
  std::int64_t flat_lo = 0, flat_hi = 0;
};
// Elements [dst, dst + length) of target `target` (counted from its flat_lo) are elements
// [src, src + length) of piece `piece`'s stored data (counted from its flat_lo).
struct CopyRun {
  std::size_t target = 0, piece = 0;
  std::int64_t dst = 0, src = 0, length = 0;
};
// Elements [dst, dst + length) of target `target` are layout padding: zeros, not read.
struct ZeroRun {
  std::size_t target = 0;
  std::int64_t dst = 0, length = 0;
};
struct LoadPlan {
  std::vector<CopyRun> copies;  // adjacent runs merged: a box stored whole is one run
  std::vector<ZeroRun> zeros;
};

// Plans a load by TP rank tp_rank of tp_size whose flat buffers are laid out as `slots` (the
// checkpoint's tensors checked against them beforehand). Throws InvalidArgument, naming
// `where`, when an element of a target is stored twice or by no piece.
LoadPlan plan_load(std::span<const Piece> pieces, std::span<const ParamSlot> slots,
                   std::span<const LoadTarget> targets, int tp_rank, int tp_size,
                   const std::string& where);

}  // namespace meshtrain::parallel::ckpt
