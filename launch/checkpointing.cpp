// The trainer's side of distributed checkpoints: the state a checkpoint holds beyond the tensors,
// saving, and resuming (restore, which a rollback reuses).
#include "launch/checkpointing.hpp"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>

#include <nlohmann/json.hpp>

#include "launch/run_dir.hpp"
#include "launch/trainer.hpp"
#include "parallel/checkpoint.hpp"
#include "runtime/log.hpp"

namespace meshtrain::launch {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

Json model_json(const models::ModelConfig& mc) {
  if (mc.is_gpt()) {
    const models::GPTConfig& m = mc.gpt;
    return Json{{"n_layer", m.n_layer},       {"n_head", m.n_head},
                {"n_embd", m.n_embd},         {"block_size", m.block_size},
                {"vocab_size", m.vocab_size}, {"padded_vocab", m.padded_vocab}};
  }
  // What the checkpoint's tensors mean; block_size (the positions run) and the rope settings
  // may change on resume (a longer context), as may the eps.
  const models::LlamaConfig& m = mc.llama;
  return Json{{"arch", m.arch},
              {"n_layer", m.n_layer},
              {"n_head", m.n_head},
              {"n_kv_head", m.n_kv_head},
              {"n_embd", m.n_embd},
              {"intermediate_size", m.intermediate_size},
              {"head_dim", m.head_size()},
              {"vocab_size", m.vocab_size},
              {"padded_vocab", m.padded_vocab},
              {"tie_word_embeddings", m.tie_word_embeddings},
              {"qkv_bias", m.qkv_bias},
              {"o_bias", m.o_bias}};
}

template <typename T>
T state_value(const std::string& dir, const Json& j, const char* section, const char* key) {
  const std::string where = fmt::format("checkpoint '{}': state.{}.{}", dir, section, key);
  MT_CHECK(
      j.is_object() && j.contains(section) && j[section].is_object() && j[section].contains(key),
      "{} is missing", where);
  const Json& v = j[section][key];
  if constexpr (std::is_same_v<T, float>) {
    // Checked as a double first: a double outside float's range has no float value.
    MT_CHECK(v.is_number() && std::isfinite(v.template get<double>()) &&
                 std::fabs(v.template get<double>()) <= std::numeric_limits<float>::max(),
             "{} must be a finite single-precision number, got {}", where, v.dump());
    return static_cast<float>(v.template get<double>());
  } else {
    MT_CHECK(v.is_number_integer() && v.template get<std::int64_t>() >= 0 &&
                 v.template get<std::int64_t>() <= std::numeric_limits<int>::max(),
             "{} must be a non-negative integer, got {}", where, v.dump());
  }
  return v.template get<T>();
}

}  // namespace

std::string checkpoint_state_json(const CheckpointState& s) {
  const Json state{
      {"model", model_json(s.model)},
      {"precision", s.precision},
      {"seed", s.seed},
      {"optimizer", {{"skipped_steps", s.skipped_steps}, {"bad_in_a_row", s.bad_in_a_row}}},
      {"loss_scaler",
       {{"scale", s.loss_scale}, {"clean_steps", s.clean_steps}, {"skipped", s.scaler_skipped}}},
      {"data",
       {{"skip_steps", s.data_skip},
        {"batch_size", s.batch_size},
        {"grad_accum", s.grad_accum},
        {"seq_len", s.seq_len},
        {"dp", s.dp}}},
  };
  return state.dump();
}

CheckpointState parse_checkpoint_state(const std::string& dir, const std::string& state_json,
                                       const models::ModelConfig& model) {
  Json state;
  try {
    state = Json::parse(state_json);
  } catch (const Json::exception& e) {
    MT_FAIL("checkpoint '{}': state is not JSON: {}", dir, e.what());
  }
  MT_CHECK(state.is_object() && state.contains("model"), "checkpoint '{}': state.model is missing",
           dir);
  const Json want = model_json(model);
  for (const auto& [k, v] : want.items()) {
    if (k == "padded_vocab") continue;  // depends on the TP layout; checked per tensor
    MT_CHECK(state["model"].contains(k) && state["model"][k] == v,
             "checkpoint '{}' holds another model: model.{} is {} there and {} here (model "
             "config: {})",
             dir, k, state["model"].contains(k) ? state["model"][k].dump() : "missing", v.dump(),
             model.str());
  }
  CheckpointState s;
  s.model = model;
  if (state.contains("precision") && state["precision"].is_string())
    s.precision = state["precision"].get<std::string>();
  if (state.contains("seed") && state["seed"].is_number_unsigned())
    s.seed = state["seed"].get<std::uint64_t>();
  s.skipped_steps = state_value<int>(dir, state, "optimizer", "skipped_steps");
  s.bad_in_a_row = state_value<int>(dir, state, "optimizer", "bad_in_a_row");
  s.loss_scale = state_value<float>(dir, state, "loss_scaler", "scale");
  s.clean_steps = state_value<int>(dir, state, "loss_scaler", "clean_steps");
  s.scaler_skipped = state_value<int>(dir, state, "loss_scaler", "skipped");
  s.data_skip = state_value<int>(dir, state, "data", "skip_steps");
  MT_CHECK(std::isfinite(s.loss_scale) && s.loss_scale > 0,
           "checkpoint '{}': loss scale {} is not positive", dir, s.loss_scale);
  s.batch_size = state_value<int>(dir, state, "data", "batch_size");
  s.grad_accum = state_value<int>(dir, state, "data", "grad_accum");
  s.seq_len = state_value<int>(dir, state, "data", "seq_len");
  s.dp = state_value<int>(dir, state, "data", "dp");
  return s;
}

std::string resolve_resume(const TrainConfig& cfg) {
  if (cfg.resume.empty()) return {};
  const std::string root = checkpoint_root(cfg);
  if (cfg.resume == "latest" || cfg.resume == "auto") {
    const std::string dir = parallel::latest_checkpoint(root);
    MT_CHECK(!dir.empty() || cfg.resume == "auto",
             "--resume latest: no complete checkpoint under '{}' (checkpoint.dir, or "
             "run.dir/checkpoints)",
             root);
    // Its manifest is read and checked now, before the caller reads its config or writes
    // anything.
    if (!dir.empty()) parallel::read_checkpoint_info(dir);
    return dir;
  }
  std::error_code ec;
  MT_CHECK(fs::exists(cfg.resume, ec), "--resume '{}': no such checkpoint directory", cfg.resume);
  MT_CHECK(fs::is_directory(cfg.resume, ec),
           "--resume '{}' is not a directory (a checkpoint is a directory RUN_DIR/checkpoints/"
           "step_N holding manifest.json)",
           cfg.resume);
  parallel::read_checkpoint_info(cfg.resume);
  return cfg.resume;
}

std::string Trainer::save_checkpoint(int steps_done) {
  const auto t0 = std::chrono::steady_clock::now();
  CheckpointState state;
  state.model = model_cfg_;
  state.precision = std::string(policy_.name());
  state.seed = cfg_.seed;
  state.skipped_steps = skipped_;
  state.bad_in_a_row = bad_in_a_row_;
  state.loss_scale = scaler_.scale();
  state.clean_steps = scaler_.clean_steps_in_a_row();
  state.scaler_skipped = scaler_.skipped_steps();
  state.data_skip = data_skip_;
  state.batch_size = cfg_.batch_size;
  state.grad_accum = cfg_.grad_accum;
  state.seq_len = cfg_.seq_len;
  state.dp = mesh_.dp_size();
  parallel::CheckpointWrite w;
  w.root = checkpoint_root(cfg_);
  w.step = steps_done;
  w.slots = model_->params();
  // Under PP rank 0 writes the manifest from every stage's layout.
  if (mesh_.pp_size() > 1)
    for (int s = 0; s < mesh_.pp_size(); ++s)
      w.stage_slots.push_back(model_cfg_.param_layout(
          mesh_.tp_size(),
          parallel::stage_range(model_cfg_.n_layer(), mesh_.pp_size(), s, cfg_.pp_virtual_stages)));
  // Under ZeRO-1 each rank writes exactly the runs it owns, from its shards.
  w.states = optimizer_->checkpoint_state();
  w.writes = optimizer_->checkpoint_writes();
  w.zero = zero_ ? 1 : 0;
  w.state_json = checkpoint_state_json(state);
  w.config_toml = to_toml(cfg_);
  w.keep = cfg_.ckpt_keep;
  const std::string dir = parallel::save_checkpoint(mesh_, w);
  last_checkpoint_ = dir;
  checkpointed_step_ = steps_done;
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  log_.checkpoint(steps_done, dir, ms);
  return dir;
}

void Trainer::restore(const std::string& dir) {
  // Every rank reads and checks its part (the manifest, the state, its master weights and
  // moments, straight into the optimizer's buffers) and the ranks agree that all succeeded
  // before the collective half of the load, so that a refusing rank leaves no other waiting.
  std::exception_ptr failed;
  CheckpointState state;
  try {
    const parallel::CheckpointInfo info = parallel::read_checkpoint_info(dir);
    state = parse_checkpoint_state(dir, info.state_json, model_cfg_);
    MT_CHECK(info.step <= cfg_.steps,
             "checkpoint '{}' is at step {}, past train.steps = {}: raise train.steps to continue",
             dir, info.step, cfg_.steps);
    MT_CHECK(state.skipped_steps <= info.step, "checkpoint '{}': {} skipped steps of {}", dir,
             state.skipped_steps, info.step);
    optimizer_->read_checkpoint(dir);
    skipped_ = state.skipped_steps;
    bad_in_a_row_ = state.bad_in_a_row;
    scaler_.restore(state.loss_scale, state.clean_steps, state.scaler_skipped);
    data_skip_ = state.data_skip;
    start_step_ = info.step;
    last_checkpoint_ = dir;
    checkpointed_step_ = info.step;
  } catch (...) {
    failed = std::current_exception();
  }
  agree_or_throw(world_, failed, "loading the checkpoint");
  optimizer_->finish_load();
  const std::int64_t rows = std::int64_t{cfg_.batch_size} * cfg_.grad_accum * mesh_.dp_size();
  const std::int64_t saved_rows = std::int64_t{state.batch_size} * state.grad_accum * state.dp;
  if (rows != saved_rows || state.seq_len != cfg_.seq_len)
    log::warn(
        "resuming from '{}' with a global batch of {} x {} where it was saved with {} x {}: "
        "the data order from here differs from the saved run's",
        dir, rows, cfg_.seq_len, saved_rows, state.seq_len);
}

void Trainer::set_aside_newer_checkpoints() {
  if (!is_root()) return;
  const std::string root = checkpoint_root(cfg_);
  const std::vector<std::string> moved =
      parallel::set_aside_checkpoints(root, start_step_, resumed_from_);
  if (moved.empty()) return;
  std::string names;
  for (const std::string& m : moved)
    names += (names.empty() ? "" : ", ") + fs::path(m).filename().string();
  log::warn(
      "{} holds checkpoints past step {}, where this run {}: {} moved (kept, not deleted) to '{}', "
      "so that this run neither overwrites them nor resumes from them later; --resume can still "
      "name them",
      root, start_step_, resumed_from_.empty() ? "starts" : "resumes", names,
      fs::path(moved.front()).parent_path().string());
}

}  // namespace meshtrain::launch
