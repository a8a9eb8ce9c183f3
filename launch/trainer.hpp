// The Trainer: what a cluster workflow embeds. Config in, metrics out, a callback per step.
//
//   meshtrain::launch::Trainer trainer(meshtrain::launch::load_config("job.toml", {}));
//   trainer.on_step([](const StepMetrics& m) { ... });
//   TrainResult r = trainer.run();
//
// The trainer owns the data, the model and the optimizer state of this rank. It writes the
// effective config (config.toml), the metrics (metrics.jsonl, one JSON object per line) and the
// final weights (model.safetensors) into the run directory.
#pragma once

#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "comm/mpi.hpp"
#include "launch/backends.hpp"
#include "launch/config.hpp"
#include "launch/schedule.hpp"
#include "models/gpt.hpp"
#include "parallel/checkpoint.hpp"
#include "parallel/grad_reducer.hpp"
#include "parallel/mesh.hpp"
#include "runtime/data.hpp"

namespace meshtrain::launch {

struct StepMetrics {
  int step = 0;  // 1-based optimizer step just finished
  int total_steps = 0;
  float loss = 0;  // mean training loss of this step's global batch
  double lr = 0;
  double grad_norm = 0;  // before clipping
  double step_ms = 0;
  double tokens_per_s = 0;
  double mfu = 0;  // model FLOPs utilisation against the measured bf16 matmul peak
  double eta_s = 0;
  bool skipped = false;  // non-finite loss or gradient: no update
  // Data parallelism (0 on one rank): time this rank blocked on communication after backward
  // (the gradient reduction, and under ZeRO-1 also the norm and the parameter all-gather), the
  // share of the reduction's busy time that overlapped backward instead, and that busy time
  // (parallel/grad_reducer.hpp defines both).
  double comm_wait_ms = 0;
  double comm_hidden = 0;
  double comm_ms = 0;
  // The gradient reduction's wait after backward on the DP rank that waited least and the one
  // that waited most (DP > 1; NaN otherwise). A rank that ends backward early waits for the
  // last one as well as for the reduction, so the least wait is the reduction's exposed cost
  // (the last rank to finish backward waits only for that) and the spread is compute skew
  // between ranks: a straggler, not the network.
  double reduce_wait_min_ms = std::numeric_limits<double>::quiet_NaN();
  double reduce_wait_max_ms = std::numeric_limits<double>::quiet_NaN();
  // Measured on the GPU's timeline with CUDA events (NCCL) rather than the host clock
  // (parallel/grad_reducer.hpp says how).
  bool comm_device_timed = false;
};

struct EvalMetrics {
  int step = 0;
  float val_loss = 0;
};

struct TrainResult {
  int steps = 0;
  float first_loss = 0;
  float final_loss = 0;      // mean over the last 10 steps
  float final_val_loss = 0;  // NaN without validation data
  int skipped_steps = 0;
  double tokens_per_s = 0;     // mean over the run, excluding the first step
  double unigram_entropy = 0;  // of the training data, in nats: the loss to beat
  std::string sample;          // text generated at the end
  // Peak resident memory of every rank (getrusage), in MiB, by world rank.
  std::vector<double> peak_rss_mib;
};

class Trainer {
 public:
  // world: the job's ranks (mpirun -np N: DP = N / train.tp x TP = train.tp), or null for one
  // process. Every rank builds the same model from the same seed (under TP, its shard of it)
  // and each DP replica trains on its slice of each global batch (train.batch_size rows per DP
  // rank and micro-step; the ranks of a TP group share their rows); rank 0 alone prints and
  // writes the run directory. Collective: every rank of `world` constructs a Trainer and calls
  // run(). The communicator must outlive the trainer. A model whose heads cannot be split
  // train.tp ways, or a world size that train.tp does not divide, throws InvalidArgument.
  // local: this process among the processes of its node (comm::MpiSession::node_local()), which
  // picks its GPU and divides the node's cores among its ranks (train.threads = 0).
  explicit Trainer(const TrainConfig& cfg, comm::Communicator* world = nullptr,
                   comm::NodeLocal local = {});
  ~Trainer();

  void on_step(std::function<void(const StepMetrics&)> f) { step_cb_ = std::move(f); }
  void on_eval(std::function<void(const EvalMetrics&)> f) { eval_cb_ = std::move(f); }
  // Prints one line per step (and evaluations and samples) to stdout. On by default, on rank 0.
  void set_verbose(bool v) { verbose_ = v && is_root(); }

  TrainResult run();
  // Mean validation loss over eval.batches batches; NaN without validation data.
  float evaluate();
  // Continues the prompt by `tokens` tokens (byte vocabulary: text; GPT-2 vocabulary: token
  // ids are printed as numbers since no tokenizer ships here). Under TP, collective over the
  // TP group: its ranks call it together and get the same text.
  std::string generate(const std::string& prompt, int tokens, double temperature, int top_k,
                       std::uint64_t seed);

  models::GPT& model() { return *model_; }
  // The whole fp32 master weights: the model's own, or under ZeRO-1 (where each rank holds a
  // shard) the copy gathered at the end of run(). Throws before that.
  Tensor master_weights();
  // Elements of AdamW state (each of m and v) this rank holds: every parameter, or under
  // ZeRO-1 its shard.
  std::int64_t optimizer_state_numel() const { return m_.numel(); }
  const parallel::Mesh& mesh() const { return mesh_; }
  // Which backend carries the DP gradients and the TP activations ("nccl", "mpi", or "none"
  // for a group of one rank that does not communicate).
  std::string dp_backend() const;
  std::string tp_backend() const;
  // Whether this rank prints and writes files (rank 0, or the only one).
  bool is_root() const { return mesh_.world_rank() == 0; }
  const TrainConfig& config() const { return cfg_; }
  // The bf16 matmul rate measured at start-up, the denominator of MFU.
  double peak_flops() const { return peak_flops_; }

  // Checkpoints (launch/checkpointing.cpp). Collective: writes checkpoint.dir/step_N holding
  // the state after `steps_done` optimizer steps; returns its path.
  std::string save_checkpoint(int steps_done);
  // The checkpoint this trainer resumed from ("" for a fresh start) and the step it continues at.
  const std::string& resumed_from() const { return resumed_from_; }
  int start_step() const { return start_step_; }

 private:
  // One optimizer step; returns the metrics.
  StepMetrics step(int step);
  // Loads a checkpoint's weights, optimizer and loss-scaler state, step and data position
  // (launch/checkpointing.cpp). Throws before touching anything when the checkpoint's model
  // differs from this one.
  void restore(const std::string& dir);
  void write_metrics(const std::string& json_line);

  TrainConfig cfg_;
  PrecisionPolicy policy_;
  // The GPU of this rank under train.device = "cuda" (null on the CPU). Declared before every
  // tensor member so that it is destroyed after them.
  std::unique_ptr<Device> gpu_;
  Device& device() const { return gpu_ ? *gpu_ : cpu_device(); }
  parallel::Mesh mesh_;
  // comm.backend: NCCL over the DP and TP groups where chosen (launch/backends.hpp).
  DeviceComms comms_;
  comm::Communicator& dp_comm() { return comms_.dp.valid() ? comms_.dp : mesh_.dp(); }
  comm::Communicator& tp_comm() { return comms_.tp.valid() ? comms_.tp : mesh_.tp(); }
  comm::Communicator* world_ = nullptr;
  std::unique_ptr<parallel::GradReducer> reducer_;  // DP > 1
  // ZeRO-1 (train.zero = 1 with DP > 1): AdamW state and (16-bit policies) the fp32 master
  // weights exist only for this rank's shard (reducer_->shard_runs()); the model holds no
  // master copy. final_master_: the whole master weights, gathered at the end of run().
  bool zero_ = false;
  Tensor master_shard_, final_master_;
  // This rank's share of the squared gradient norm for flat elements [lo, lo + grads.numel())
  // (parallel::norm_squared_share: split parameters counted per shard, replicated ones once).
  double grad_norm_share(const Tensor& grads, std::int64_t lo) const;
  models::GPTConfig model_cfg_;
  std::unique_ptr<data::Dataset> data_;
  std::unique_ptr<models::GPT> model_;
  Tensor m_, v_;  // AdamW state, fp32 flat (this rank's shard under ZeRO-1)
  LrSchedule schedule_;
  DynamicLossScaler scaler_;
  Tensor inputs_, targets_;
  // The reduction wait's max and -min over the DP ranks, in flight from the reducer's finish()
  // to the end of the step (StepMetrics::reduce_wait_min_ms).
  Tensor wait_spread_;
  comm::Work wait_spread_work_;
  std::function<void(const StepMetrics&)> step_cb_;
  std::function<void(const EvalMetrics&)> eval_cb_;
  bool verbose_ = true;
  double peak_flops_ = 0;
  double unigram_entropy_ = 0;
  int bad_in_a_row_ = 0;
  int skipped_ = 0;
  // Checkpoints: where this run started, the steps of data skipped by rollbacks (the batch of
  // step s is drawn at s + data_skip_), the rollbacks so far and the last checkpoint written.
  int start_step_ = 0;
  int data_skip_ = 0;
  int rollbacks_ = 0;
  std::string resumed_from_, last_checkpoint_;
  std::FILE* metrics_ = nullptr;
  std::string corpus_path_;  // the built-in corpus, written into the run directory
};

// The model a config describes (preset plus overrides, vocabulary); checks it against
// train.seq_len.
models::GPTConfig model_config(const TrainConfig& cfg);

// The DP gradient bucket size in bytes for `grad_bytes` of fp32 gradients on a rank:
// dp.bucket_mb, or parallel::auto_bucket_bytes when it is 0 (automatic).
std::int64_t dp_bucket_bytes(const TrainConfig& cfg, std::int64_t grad_bytes);

// Continues `prompt` by `tokens` tokens, running the model on a fixed window of window_len
// positions. Byte vocabulary: the prompt's bytes in, text out. GPT-2 vocabulary: starts from
// end-of-text and returns token ids as numbers (no tokenizer ships here). temperature 0 is
// greedy; top_k 0 samples the whole vocabulary. The draws are a function of seed.
std::string generate_text(models::GPT& model, int window_len, const std::string& prompt, int tokens,
                          double temperature, int top_k, std::uint64_t seed);

// Loads weights saved by Trainer::run (model.safetensors) into the model's master weights and
// parameters; every name and full shape must match, except wte's padded rows (the padding
// depends on the TP layout). Under TP each rank keeps its shard.
void load_weights(models::GPT& model, const std::string& path);

// The checkpoint that cfg.resume names: the directory itself, or for "latest" and "auto" the
// newest complete one under checkpoint_root(cfg). "" for a fresh start (cfg.resume empty, or
// "auto" with none). Throws when "latest" finds none or a named directory does not exist.
std::string resolve_resume(const TrainConfig& cfg);

// What a checkpoint's manifest carries for the trainer beyond the tensors ("state"): the model
// it belongs to, the optimizer's and loss scaler's counters and the data position.
struct CheckpointState {
  models::GPTConfig model;
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
                                       const models::GPTConfig& model);

// Loads the master weights (only) of a checkpoint into the model, any layout it was saved
// under, and refreshes the compute parameters.
void load_checkpoint_weights(models::GPT& model, const std::string& dir);

// Measures this process's bf16 matmul rate in FLOP/s (a few 1024^3 products).
double measure_bf16_matmul_peak(Device& device = cpu_device());

// The built-in default corpus (Debian's fortune cookies, embedded at build time).
std::string_view default_corpus();

}  // namespace meshtrain::launch
