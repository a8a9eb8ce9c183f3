// Distributed checkpoints: a directory per step that stores logical (full, unsharded) tensors as
// pieces with their global offsets, so that a job resumes on any DP x PP x TP layout (each
// pipeline stage writes and reads the tensors it holds, by name).
//
//   ROOT/step_00000100/
//     manifest.json            step, layout, the caller's state (config, RNG, data, loss scaler),
//                              every logical tensor's full shape, every piece's place in it, and
//                              the size and CRC-32C of every file, and of every 1 MiB block of
//                              each shard file
//     config.toml              the effective config of the job that wrote it
//     shard-00000.safetensors  the pieces world rank 0 wrote (fp32), one file per rank
//     ...
//
// What is stored: per-element fp32 state held in flat buffers ("master" weights, Adam "adam_m"
// and "adam_v"), cut from each rank's flat buffer. The flat buffer of TP rank t holds each
// logical tensor's TP shard (ParamSlot: full shape, shard dim, parts). Each rank of a TP group's
// DP replicas writes its share of the group's flat buffer: under ZeRO-1 the pieces it owns,
// without ZeRO DP rank d writes elements [d, d + 1) x ceil(n / DP). Each distinct shard is
// written once, spread evenly over all ranks. A tensor replicated
// over TP (LayerNorms, biases of row-parallel layers) is written by one TP rank, chosen in turn.
//
// A piece is a box of a logical tensor (offsets and shape in full coordinates) of which it holds
// the elements [flat[0], flat[1]) in row-major order. The reader assembles any rank's shard of
// any layout from the pieces that overlap it and checks that every element is covered exactly
// once.
//
// A checkpoint is never replaced: saving a step whose directory exists throws (the Trainer sets
// the newer checkpoints of a history it abandons aside first: set_aside_checkpoints).
//
// Atomicity: the ranks write into ROOT/.tmp-step_N; once every rank reports its file written
// and fsynced, world rank 0 writes the manifest, fsyncs it and the directory, and renames the
// directory to ROOT/step_N (then fsyncs ROOT). A complete checkpoint therefore always has its
// manifest, and latest_checkpoint() only ever sees complete ones. Old checkpoints beyond `keep`
// are renamed away (.del-step_N) before they are removed, so a crash while deleting never leaves
// a partial step_N behind.
//
// Reading: a rank reads only the blocks of the shard files that hold bytes it needs (the
// safetensors header, then the runs of its pieces), with pread, and checks each block's CRC-32C
// before using any byte of it; a resume under ZeRO-1 or TP reads its share of the checkpoint,
// not all of it. Why blocks rather than a checksum per piece: a rank often needs part of a
// piece (its TP slice of a tensor another layout wrote whole, its ZeRO-1 range of one), which
// a per-piece checksum could only check by reading the whole piece. Version 1 checkpoints (a
// CRC-32C per whole file only) still load, each file read and checked whole.
//
// Nothing read is trusted: the manifest's structure, every file's size, every byte's checksum
// (before it is used), every piece's box against the tensor's shape and the stored data's size.
// Errors are InvalidArgument (content) or IoError (system calls), naming the file and what.
//
// The code by concept: checkpoint_geometry.hpp (boxes, the pieces a rank writes, the load plan:
// pure, tested without files), checkpoint_manifest.hpp (the manifest's text, parsed and built),
// checkpoint.cpp (the three phases of a save, the directory's life cycle, reads).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "parallel/flat_layout.hpp"
#include "parallel/mesh.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain::parallel {

// One kind of fp32 per-element state as a rank holds it: `data` (fp32, any device: copied
// through the host) holds the flat elements its runs say; no runs: data[j] is flat element j.
struct FlatState {
  std::string kind;  // "master", "adam_m", "adam_v", ...
  Tensor data;
  std::vector<FlatRun> runs;
};

struct CheckpointLayout {
  int dp = 1, tp = 1, zero = 0;
};

struct CheckpointInfo {
  std::string dir;
  int step = 0;
  CheckpointLayout layout;
  std::string state_json;   // the caller's state object, as saved
  std::string config_toml;  // the text of config.toml
};

// What one rank saves.
struct CheckpointWrite {
  std::string root;  // the checkpoint directory's parent
  int step = 0;
  // This rank's flat layout (tiling its flat buffers) and its states.
  std::span<const ParamSlot> slots;
  std::vector<FlatState> states;
  // The flat runs this rank writes (their `local` is unused): every flat element must be
  // written by exactly one rank of its TP group (a ZeRO-1 rank passes the runs it owns). Empty:
  // DP rank d writes [d, d + 1) x ceil(n / DP). The states must hold what the rank writes.
  std::vector<FlatRun> writes;
  // Under pipeline parallelism (mesh.pp_size() > 1): every stage's layout, by stage (world rank
  // r is stage r / (DP x TP)); `slots` is this rank's stage's. Empty without PP.
  std::vector<std::vector<ParamSlot>> stage_slots;
  int zero = 0;             // recorded in the manifest's layout: 1 for ZeRO-1 shards
  std::string state_json;   // a JSON object the caller gets back from read_checkpoint_info
  std::string config_toml;  // the job's effective config
  int keep = 0;             // the newest checkpoints kept (this one included); 0 keeps all
};

// The directory name of step N: "step_00000100".
std::string checkpoint_name(int step);

// Collective over the mesh's ranks: writes ROOT/step_N as described above and returns its
// path. Every rank throws IoError if any rank failed to write its file; then no step_N appears.
std::string save_checkpoint(Mesh& mesh, const CheckpointWrite& w);

// The complete checkpoint with the highest step under ROOT, or "" when there is none.
std::string latest_checkpoint(const std::string& root);
// Every complete checkpoint under ROOT, oldest first.
std::vector<std::string> list_checkpoints(const std::string& root);

// A job that starts at `step` (0: a fresh one) in a checkpoint directory that already holds
// checkpoints of a longer history (resuming from an older checkpoint, or a fresh run in an old
// run directory) would overwrite them as it saves, and `latest` would pick them after a crash.
// So they are set aside, never deleted (Megatron and torchtitan keep them too): every complete
// checkpoint under ROOT with a higher step, and one of the same step that is not `resumed_from`,
// is moved whole into ROOT/superseded-YYYYmmddTHHMMSSZ/ (renamed), where list_checkpoints and
// latest no longer see it and `--resume` can still name it. Returns their new paths (none: ROOT
// holds no such checkpoint). Throws IoError naming a directory it could not move.
std::vector<std::string> set_aside_checkpoints(const std::string& root, int step,
                                               const std::string& resumed_from);

// Reads and validates the manifest (structure only; files are checked when loaded). Throws
// InvalidArgument naming the manifest and what is wrong.
CheckpointInfo read_checkpoint_info(const std::string& dir);

// Fills `targets` (this rank's buffers, fp32 CPU; elements past the slots' flat elements are
// left alone) from the checkpoint, for TP rank tp_rank of tp_size whose flat buffers are laid
// out as `slots` (stage: they are one pipeline stage's, so the checkpoint holds other tensors
// too; a tied copy loads from its original), reading only the blocks of the files that hold them
// (logged: bytes read, time). Checks the checkpoint's tensors against the slots, plans every copy
// (checkpoint_geometry.hpp: each target element covered exactly once), then reads, checking
// every block against the manifest's checksum before it is used. Throws when a tensor is
// missing or has another shape, an element is stored twice or not at all, or a file is
// corrupt; the targets may then be partly written.
void load_checkpoint(const std::string& dir, std::span<const ParamSlot> slots,
                     const std::vector<FlatState>& targets, int tp_rank, int tp_size,
                     bool stage = false);

// Checks every file the manifest lists against its size and checksum. Throws on the first
// mismatch.
void verify_checkpoint(const std::string& dir);

}  // namespace meshtrain::parallel
