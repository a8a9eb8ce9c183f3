// The Trainer: what a cluster workflow embeds. Config in, metrics out, a callback per step.
//
//   meshtrain::launch::Trainer trainer(meshtrain::launch::load_config("job.toml", {}));
//   trainer.on_step([](const meshtrain::launch::StepMetrics& m) { ... });
//   meshtrain::launch::TrainResult r = trainer.run();
//
// What an embedder may call: this header (Trainer and the metrics of launch/metrics.hpp) and
// launch/config.hpp (TrainConfig, load_config, to_toml). Under mpirun, pass the world
// communicator of a comm::MpiSession (comm/mpi.hpp); every rank constructs a Trainer and calls
// run(). The rest of launch/ (backends, run_log, weights, generate, checkpointing, hf) is how
// the CLI and the Trainer are built, and may change between minor versions.
//
// The trainer owns the data, the model and the optimizer of this rank. It writes the effective
// config (config.toml), the metrics (metrics.jsonl, one JSON object per line: launch/run_log.hpp)
// and the final weights (model.safetensors) into the run directory.
#pragma once

#include <chrono>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "comm/mpi.hpp"
#include "launch/backends.hpp"
#include "launch/config.hpp"
#include "launch/metrics.hpp"
#include "launch/pipeline_driver.hpp"
#include "launch/preemption.hpp"
#include "launch/run_log.hpp"
#include "launch/schedule.hpp"
#include "models/decoder.hpp"
#include "parallel/grad_reducer.hpp"
#include "parallel/mesh.hpp"
#include "parallel/optimizer.hpp"
#include "runtime/data.hpp"
#include "runtime/precision.hpp"
#include "runtime/tokenizer.hpp"

namespace meshtrain::launch {

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
  void set_verbose(bool v) { log_.set_verbose(v); }

  // Runs to train.steps, or stops early after the step in which any rank was asked to stop by
  // a signal (launch/preemption.hpp): then it saves a checkpoint of that step when one is due
  // (checkpoint.on_signal) and returns with TrainResult::stop_signal set, without the final
  // evaluation, weights or sample (the CLI then exits with status 75).
  TrainResult run();
  // Mean validation loss over eval.batches batches; NaN without validation data.
  float evaluate();
  // Continues the prompt by `tokens` tokens (launch/generate.hpp). Under TP, collective over the
  // TP group: its ranks call it together and get the same text.
  std::string generate(const std::string& prompt, int tokens, double temperature, int top_k,
                       std::uint64_t seed);

  // The model (GPT or Llama family: model.arch); model().gpt() / llama() for the family's own API.
  models::Decoder& model() { return *model_; }
  const parallel::DistributedAdamW& optimizer() const { return *optimizer_; }
  // The whole fp32 master weights: the optimizer's, or under ZeRO-1 with a 16-bit policy (where
  // each rank holds a shard) the copy gathered at the end of run(). Throws before that.
  Tensor master_weights();
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
  using Clock = std::chrono::steady_clock;
  struct Progress;  // run()'s running totals

  // Wiring, in the constructor's order.
  void open_data();
  void build_optimizer();
  void start_log();
  // One optimizer step and its parts, in order.
  StepMetrics step(int step);
  float forward_backward(int step, float loss_scale);
  void reduce(StepMetrics& m);
  bool accept(StepMetrics& m);
  void end_step(StepMetrics& m, Clock::time_point t0);
  // Around the steps.
  void after_step(int step);
  bool should_roll_back(const StepMetrics& m) const;
  int roll_back(int failed_at);
  std::string sample(int at_step);
  // Under PP: the whole model gathered onto world rank 0, which decodes alone (collective over
  // DP replica 0's ranks).
  std::string sample_pipeline(int at_step);
  TrainResult finish(const Progress& p);
  // Stops after `step` on a signal (launch/preemption.cpp); r: the totals so far.
  TrainResult stop_early(TrainResult r, int step);
  MemoryReport memory_report();
  void save_final_weights();
  // Loads a checkpoint's weights, optimizer and loss-scaler state, step and data position
  // (launch/checkpointing.cpp). Collective: the ranks agree that every rank read its part before
  // the parameters are written. Throws before touching anything when the checkpoint's model
  // differs from this one; a checksum failure throws with the state partly loaded (the run
  // stops).
  void restore(const std::string& dir);
  // Rank 0, before the run directory is written: moves the checkpoints of a longer history out
  // of the way (parallel::set_aside_checkpoints), saying so.
  void set_aside_newer_checkpoints();

  Device& device() const { return gpu_ ? *gpu_ : cpu_device(); }
  comm::Communicator& dp_comm() { return comms_.dp.valid() ? comms_.dp : mesh_.dp(); }
  comm::Communicator& tp_comm() { return comms_.tp.valid() ? comms_.tp : mesh_.tp(); }

  TrainConfig cfg_;
  PrecisionPolicy policy_;
  models::ModelConfig model_cfg_;
  RunLog log_;
  comm::Communicator* world_ = nullptr;
  // The GPU of this rank under train.device = "cuda" (null on the CPU). Declared before every
  // tensor member so that it is destroyed after them.
  std::unique_ptr<Device> gpu_;
  parallel::Mesh mesh_;
  // comm.backend: NCCL over the DP and TP groups where chosen (launch/backends.hpp).
  DeviceComms comms_;
  std::unique_ptr<data::Dataset> data_;
  bool builtin_corpus_ = false;         // no data.train: the built-in corpus
  std::optional<Tokenizer> tokenizer_;  // data.tokenizer
  // Bytes of training text per token (1 for text as bytes), NaN for token shards: what turns a
  // loss into bits per byte (EvalMetrics::val_bits_per_byte).
  double bytes_per_token_ = std::numeric_limits<double>::quiet_NaN();
  double bits_per_byte(float val_loss) const;
  std::unique_ptr<models::Decoder> model_;
  std::unique_ptr<parallel::GradReducer> reducer_;  // DP > 1, or NCCL at DP = 1
  bool zero_ = false;                               // ZeRO-1: train.zero = 1 with a reducer
  std::unique_ptr<parallel::DistributedAdamW> optimizer_;
  std::unique_ptr<PipelineDriver> pipe_;  // train.pp > 1
  // trace.steps: the steps traced, and this rank's events (written by finish()).
  std::vector<int> trace_steps_;
  parallel::Trace trace_;
  void write_trace();
  Tensor final_master_;  // ZeRO-1 with a 16-bit policy: gathered at the end of run()
  LrSchedule schedule_;
  DynamicLossScaler scaler_;
  Tensor inputs_, targets_;
  // The reduction wait's max and -min over the DP ranks, in flight from the reducer's finish()
  // to the end of the step (StepMetrics::reduce_wait_min_ms).
  Tensor wait_spread_;
  comm::Work wait_spread_work_;
  std::function<void(const StepMetrics&)> step_cb_;
  std::function<void(const EvalMetrics&)> eval_cb_;
  std::string threads_why_;  // where the CPU thread count came from (the banner says)
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
  // The step whose state last_checkpoint_ holds (saved or restored), -1 for none.
  int checkpointed_step_ = -1;
  // Preemption: this step's agreement over the ranks, and the signal agreed on (0: none).
  StopAgreement stop_;
  int stop_signal_ = 0;
};

}  // namespace meshtrain::launch
