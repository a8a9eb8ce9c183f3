// The trainer's side of distributed checkpoints (parallel/checkpoint.hpp has the format): what
// a checkpoint holds beyond the tensors, and which checkpoint a run resumes from. The tensors
// themselves are the optimizer's state (parallel/optimizer.hpp).
#pragma once

#include <cstdint>
#include <string>

#include "launch/config.hpp"
#include "models/gpt.hpp"

namespace meshtrain::launch {

// The checkpoint that cfg.resume names: the directory itself, or for "latest" and "auto" the
// newest complete one under checkpoint_root(cfg). "" for a fresh start (cfg.resume empty, or
// "auto" with none). Throws when "latest" finds none, a named directory does not exist, or the
// checkpoint's manifest or config.toml is damaged or edited (parallel::read_checkpoint_info).
std::string resolve_resume(const TrainConfig& cfg);

// What a checkpoint's manifest carries for the trainer beyond the tensors ("state"): the model
// it belongs to, the optimizer's and loss scaler's counters and the data position.
struct CheckpointState {
  models::ModelConfig model;
  std::string precision;
  std::uint64_t seed = 0;
  int skipped_steps = 0, bad_in_a_row = 0;
  float loss_scale = 1.0f;
  int clean_steps = 0, scaler_skipped = 0;
  int data_skip = 0;  // steps of data skipped by rollbacks
  // The global batch it was saved with: batch_size x grad_accum x dp rows of seq_len tokens.
  int batch_size = 0, grad_accum = 0, seq_len = 0, dp = 0;
};
// The JSON object save_checkpoint stores as the manifest's state.
std::string checkpoint_state_json(const CheckpointState& s);
// Parses and checks a checkpoint's state (read_checkpoint_info's state_json) against the model
// this job builds, before anything is loaded: every field present with its type and range, the
// model the same (padded_vocab aside, which depends on the layout). Throws InvalidArgument
// naming the checkpoint `dir` and the field.
CheckpointState parse_checkpoint_state(const std::string& dir, const std::string& state_json,
                                       const models::ModelConfig& model);

}  // namespace meshtrain::launch
