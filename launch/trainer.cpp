#include "launch/trainer.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>

#include "launch/checkpointing.hpp"
#include "launch/generate.hpp"
#include "launch/preflight.hpp"
#include "launch/run_dir.hpp"
#include "launch/tokenize.hpp"
#include "launch/weights.hpp"
#include "runtime/file_io.hpp"
#include "runtime/log.hpp"
#include "runtime/settings.hpp"
#include "runtime/threads.hpp"

namespace meshtrain::launch {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The layout is checked before the model: a process count that train.tp does not divide is
// named as such, whatever the model.
const TrainConfig& checked_layout(const TrainConfig& cfg, const comm::Communicator* world) {
  const int ranks = world != nullptr ? world->size() : 1;
  MT_CHECK(cfg.pp == 1 || ranks % (cfg.tp * cfg.pp) == 0,
           "train.pp = {} x train.tp = {} needs a multiple of {} ranks (mpirun -np N runs DP = N / "
           "{} x PP = {} x TP = {}); this job has {}",
           cfg.pp, cfg.tp, cfg.tp * cfg.pp, cfg.tp * cfg.pp, cfg.pp, cfg.tp, ranks);
  MT_CHECK(ranks % cfg.tp == 0,
           "train.tp = {} needs a multiple of {} ranks (mpirun -np N runs DP = N / {} x TP = {}); "
           "this job has {}",
           cfg.tp, cfg.tp, cfg.tp, cfg.tp, ranks);
  return cfg;
}

}  // namespace

// run()'s running totals: the first loss, the last ten unskipped losses, and the tokens and
// seconds of every step but the first.
struct Trainer::Progress {
  float first_loss = 0;
  std::vector<float> recent;
  double tokens = 0, seconds = 0;

  void add(const StepMetrics& m, bool first) {
    if (first) first_loss = m.loss;
    if (!first) {
      tokens += m.tokens_per_s * m.step_ms / 1e3;
      seconds += m.step_ms / 1e3;
    }
    if (!m.skipped) {
      recent.push_back(m.loss);
      if (recent.size() > 10) recent.erase(recent.begin());
    }
  }
  // A result with the losses and the rate so far.
  TrainResult totals() const {
    TrainResult r;
    r.first_loss = first_loss;
    r.final_loss = recent.empty() ? std::numeric_limits<float>::quiet_NaN()
                                  : std::accumulate(recent.begin(), recent.end(), 0.0f) /
                                        static_cast<float>(recent.size());
    r.tokens_per_s = seconds > 0 ? tokens / seconds : 0;
    return r;
  }
};

Trainer::Trainer(const TrainConfig& cfg, comm::Communicator* world, comm::NodeLocal local)
    : cfg_(checked_layout(cfg, world)),
      policy_(PrecisionPolicy::parse(cfg.precision)),
      model_cfg_(model_config(cfg)),
      log_(world == nullptr || world->rank() == 0),
      world_(world) {
  set_cpu_threads(cfg_.threads > 0 ? cfg_.threads : default_cpu_threads(local.size));
  threads_why_ = cfg_.threads > 0         ? std::string("train.threads")
                 : settings().threads > 0 ? std::string("MESHTRAIN_THREADS")
                                          : fmt::format(
                                                "automatic: the cores this process may use "
                                                "shared by {} rank(s) on this node",
                                                std::max(1, local.size));
  if (world != nullptr && world->size() > 1) mesh_ = parallel::Mesh(*world, cfg_.tp, cfg_.pp);
  gpu_ = open_device(cfg_, local.rank);
  comms_ = open_device_comms(cfg_, world, mesh_, gpu_.get());
  // Everything this job could refuse is checked, on every rank, before the run directory is
  // created: the memory plan (before the model is allocated), the data and its vocabulary,
  // model.init, and the checkpoint it resumes from (read and checked in full). The ranks agree
  // after the local checks and again after the checkpoint, so that no rank writes while another
  // refuses, and no rank waits in a collective that a refusing rank never reaches.
  std::exception_ptr refused;
  try {
    check_memory(cfg_, model_cfg_, policy_, world != nullptr ? world->size() : 1, local.size,
                 gpu_free_bytes(gpu_.get()));
    open_data();
    const bool pp = mesh_.pp_size() > 1;
    const parallel::PipeSchedule schedule = parallel::parse_pipe_schedule(cfg_.pp_schedule);
    model_ = std::make_unique<models::Decoder>(
        model_cfg_, policy_, device(), parallel::TPGroup(tp_comm(), cfg_.tp_sequence_parallel),
        pp ? parallel::stage_range(model_cfg_.n_layer(), mesh_.pp_size(), mesh_.pp_rank(),
                                   cfg_.pp_virtual_stages)
           : parallel::StageRange{},
        pp ? PipelineDriver::slots_for(schedule, mesh_.pp_size(), mesh_.pp_rank(), cfg_.grad_accum,
                                       cfg_.pp_virtual_stages)
           : 1);
    build_optimizer();
    if (pp) {
      pipe_ = std::make_unique<PipelineDriver>(
          *model_, mesh_, comms_.pp.valid() ? comms_.pp : mesh_.pp(), reducer_.get(), schedule,
          cfg_.grad_accum, cfg_.batch_size, cfg_.seq_len);
      pipe_->set_trace(&trace_);
    }
    trace_steps_ = launch::trace_steps(cfg_);
    inputs_ = Tensor::empty(Shape{cfg_.batch_size, cfg_.seq_len}, DType::kI32);
    targets_ = Tensor::empty(Shape{cfg_.batch_size, cfg_.seq_len}, DType::kI32);
  } catch (...) {
    refused = std::current_exception();
  }
  agree_or_throw(world_, refused, "start-up");
  schedule_ = LrSchedule{cfg_.schedule,     cfg_.lr,    cfg_.min_lr_ratio,
                         cfg_.warmup_steps, cfg_.steps, cfg_.decay_fraction};
  if (const std::string dir = resolve_resume(cfg_); !dir.empty()) {
    restore(dir);
    resumed_from_ = dir;
  }
  // A run directory this job created and could not write into (a full or read-only disk) is
  // removed again when it is still empty: a failed start leaves nothing behind.
  std::error_code ec;
  const bool created = is_root() && !fs::exists(cfg_.run_dir, ec);
  try {
    if (is_root()) prepare_run_dir(cfg_, builtin_corpus_);
    set_aside_newer_checkpoints();
    start_log();
  } catch (...) {
    if (created) fs::remove(cfg_.run_dir, ec);  // only if empty
    throw;
  }
}

Trainer::~Trainer() = default;

double Trainer::bits_per_byte(float val_loss) const {
  return static_cast<double>(val_loss) / std::log(2.0) / bytes_per_token_;
}

// The training data: the configured files, or the built-in corpus, which every rank reads from
// an anonymous memory file (rank 0 writes it into the run directory once everything is
// checked). Text is tokenized with data.tokenizer, or refused under a vocabulary that is not
// bytes. Every token must be inside the model's vocabulary.
void Trainer::open_data() {
  std::vector<std::string> train = cfg_.train_files;
  MemoryFile corpus;
  if (train.empty()) {
    corpus = builtin_corpus_file();
    train.push_back(corpus.path);
    builtin_corpus_ = true;
  }
  // Text is tokenized with data.tokenizer into private shards (each rank its own, removed once
  // mapped), or refused under a vocabulary that is not bytes (launch/tokenize.hpp).
  if (!cfg_.data_tokenizer.empty()) tokenizer_.emplace(Tokenizer::from_file(cfg_.data_tokenizer));
  const std::string token_dir =
      (fs::temp_directory_path() /
       fmt::format("meshtrain-tokens-{}-{}", ::getpid(), mesh_.world_rank()))
          .string();
  const Tokenizer* tok = tokenizer_ ? &*tokenizer_ : nullptr;
  const int vocab = model_cfg_.vocab_size();
  TextStats text;
  std::vector<std::string> val = cfg_.val_files;
  try {
    train =
        text_files_to_shards(train, cfg_.data_format, tok, vocab, token_dir, cpu_threads(), &text);
    val =
        text_files_to_shards(val, cfg_.data_format, tok, vocab, token_dir + "-val", cpu_threads());
    // Bits per byte need every training file to be text.
    if (text.files == static_cast<std::int64_t>(train.size()) && text.tokens > 0)
      bytes_per_token_ = static_cast<double>(text.bytes) / static_cast<double>(text.tokens);
    data_ = std::make_unique<data::Dataset>(
        train, val, data::parse_format(tok != nullptr ? "auto" : cfg_.data_format),
        cfg_.val_fraction, cfg_.seq_len, cfg_.seed);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(token_dir, ec);
    fs::remove_all(token_dir + "-val", ec);
    throw;
  }
  {
    std::error_code ec;
    fs::remove_all(token_dir, ec);  // mapped: the data stays readable until unmapped
    fs::remove_all(token_dir + "-val", ec);
  }
  check_data_vocab(*data_, model_cfg_, cfg_.vocab);
}

// The gradient reducer (DP > 1; comm.backend = "nccl" reduces through NCCL even for DP = 1, so
// that mpirun -np 1 on one GPU runs the NCCL gradient path, ZeRO-1 included) and the optimizer,
// from the initial weights: model.init (fine-tuning; a resumed run takes the checkpoint's
// instead) or the seed's.
void Trainer::build_optimizer() {
  if (mesh_.dp_size() > 1 || comms_.dp.valid()) {
    parallel::ReducerOptions ro;
    ro.bucket_bytes = dp_bucket_bytes(cfg_, model_->num_parameters() * 4);
    ro.overlap = cfg_.dp_overlap == "on";
    ro.reduce_dtype = cfg_.dp_reduce_dtype == "bf16" ? DType::kBF16 : DType::kF32;
    // ZeRO-1: gradients are reduce-scattered; rank r owns the r-th chunk of every bucket.
    ro.shard = zero_ = cfg_.zero == 1;
    reducer_ = std::make_unique<parallel::GradReducer>(dp_comm(), model_->flat_grads(),
                                                       model_->params(), ro);
    model_->set_grads_ready_hook(
        [r = reducer_.get()](std::int64_t lo, std::int64_t hi) { r->grads_ready(lo, hi); });
  }
  parallel::AdamWOptions o;
  o.beta1 = cfg_.beta1;
  o.beta2 = cfg_.beta2;
  o.eps = cfg_.eps;
  o.weight_decay = cfg_.weight_decay;
  o.grad_clip = cfg_.grad_clip;
  {
    Tensor weights = !cfg_.model_init.empty() && resolve_resume(cfg_).empty()
                         ? load_weights(*model_, cfg_.model_init)
                         : model_->initial_weights(cfg_.seed);
    optimizer_ = std::make_unique<parallel::DistributedAdamW>(
        model_->params(), model_->flat_params(), model_->flat_grads(), std::move(weights), o, mesh_,
        zero_ ? reducer_.get() : nullptr);
  }
  // The whole initial weights, where the optimizer kept only a shard of them (or copied them),
  // go back to the system rather than to the allocator's cache.
  device().empty_cache();
}

void Trainer::start_log() {
  const std::string effective = to_toml(cfg_);
  peak_flops_ = measure_bf16_matmul_peak(device());
  unigram_entropy_ = data_->unigram_entropy();
  log_.open(cfg_, resumed_from_, start_step_);
  Banner b;
  b.model = model_cfg_.str();
  b.precision = std::string(policy_.name());
  b.device = gpu_ ? gpu_->name() : fmt::format("{} thread(s) ({})", cpu_threads(), threads_why_);
  if (mesh_.distributed() && mesh_.pp_size() > 1) {
    b.layout = fmt::format(" per rank | {} ranks: DP {} x PP {} ({}, {} micro-batches) x TP {}",
                           mesh_.world_size(), mesh_.dp_size(), mesh_.pp_size(), cfg_.pp_schedule,
                           cfg_.grad_accum, mesh_.tp_size());
  } else if (mesh_.distributed()) {
    b.layout = fmt::format(" per rank | {} ranks: DP {} x TP {}", mesh_.world_size(),
                           mesh_.dp_size(), mesh_.tp_size());
  }
  b.comm = comms_.summary;
  b.train_tokens = data_->train().tokens();
  b.val_tokens = data_->val() ? data_->val()->tokens() : 0;
  b.builtin_corpus = builtin_corpus_;
  b.unigram_entropy = unigram_entropy_;
  b.peak_flops = peak_flops_;
  b.effective_config = effective;
  log_.banner(b, cfg_, resumed_from_, start_step_);
}

std::string Trainer::dp_backend() const {
  if (comms_.dp.valid()) return "nccl";
  return mesh_.dp_size() > 1 ? "mpi" : "none";
}

std::string Trainer::tp_backend() const {
  if (comms_.tp.valid()) return "nccl";
  return mesh_.tp_size() > 1 ? "mpi" : "none";
}

// data -> forward/backward -> reduce -> optimizer -> metrics.
StepMetrics Trainer::step(int step) {
  const auto t0 = Clock::now();
  StepMetrics m;
  m.step = step + 1;
  m.total_steps = cfg_.steps;
  m.lr = schedule_.at(step);
  const float scale = policy_.loss_scaling ? scaler_.scale() : 1.0f;
  trace_.set_active(std::find(trace_steps_.begin(), trace_steps_.end(), m.step) !=
                    trace_steps_.end());
  trace_.set_step(m.step);
  m.loss = forward_backward(step, scale);
  if (pipe_) {
    m.pipe_wait_ms = pipe_->last_stats().wait_ms;
    m.pipe_compute_ms = pipe_->last_stats().compute_ms;
  }
  const auto t_reduce = Clock::now();
  if (!pipe_) trace_.complete("forward+backward", parallel::Trace::kCompute, t0, t_reduce);
  if (reducer_) reduce(m);
  const auto t_opt = Clock::now();
  if (reducer_) trace_.complete("DP reduce (wait)", parallel::Trace::kData, t_reduce, t_opt);
  stop_.post(world_);  // read in end_step: the update hides it
  const parallel::GradNorm norm = optimizer_->grad_norm(scale);
  m.grad_norm = norm.norm;
  m.comm_wait_ms += norm.wait_ms;
  if (accept(m)) m.comm_wait_ms += optimizer_->step(m.lr, step + 1 - skipped_, m.grad_norm, scale);
  trace_.complete("optimizer", parallel::Trace::kOptimizer, t_opt, Clock::now());
  trace_.set_active(false);
  end_step(m, t0);
  return m;
}

// This rank's micro-batches of step `step`, forward and backward; the gradients accumulate and
// the last micro-step's backward starts their reduction. Returns this rank's mean loss.
float Trainer::forward_backward(int step, float loss_scale) {
  if (pipe_)
    return pipe_
        ->train_step(data_->train(), static_cast<std::int64_t>(step + data_skip_) * cfg_.grad_accum,
                     loss_scale)
        .loss;
  model_->zero_grads();
  double loss_sum = 0.0;
  for (int micro = 0; micro < cfg_.grad_accum; ++micro) {
    data_->train().batch(static_cast<std::int64_t>(step + data_skip_) * cfg_.grad_accum + micro,
                         mesh_.dp_rank(), mesh_.dp_size(), inputs_, targets_);
    // Only the last micro-step's backward reduces: earlier ones accumulate locally.
    if (reducer_) reducer_->begin_step(micro + 1 == cfg_.grad_accum);
    loss_sum += model_->forward(inputs_, targets_);
    model_->backward(loss_scale / static_cast<float>(cfg_.grad_accum));
  }
  return static_cast<float>(loss_sum / cfg_.grad_accum);
}

// Waits for the gradient reduction; the global mean loss rides along with the last buckets.
// Afterwards the gradients are averaged over DP (ZeRO-1: this rank's shard of them), so the norm
// is the global one on every rank.
void Trainer::reduce(StepMetrics& m) {
  // A host scalar: over the mesh's MPI group, which exists for DP > 1.
  Tensor loss = Tensor::from_floats({m.loss}, Shape{1}, DType::kF32);
  comm::Work loss_work;
  if (mesh_.dp().valid()) loss_work = mesh_.dp().allreduce(loss, comm::ReduceOp::kAvg);
  const parallel::ReducerStats rs = reducer_->finish();
  if (loss_work.defined()) loss_work.wait();
  m.loss = loss.data_as<float>()[0];
  m.comm_wait_ms = rs.wait_ms;
  m.comm_hidden = rs.hidden;
  m.comm_ms = rs.comm_ms;
  m.comm_device_timed = rs.device_timed;
  if (mesh_.dp().valid()) {
    // Every rank's wait, as its max and -min: posted now, read at the end of the step, so the
    // optimizer update hides it.
    wait_spread_ = Tensor::from_floats(
        {static_cast<float>(rs.wait_ms), -static_cast<float>(rs.wait_ms)}, Shape{2}, DType::kF32);
    wait_spread_work_ = mesh_.dp().allreduce(wait_spread_, comm::ReduceOp::kMax);
  }
}

// Whether the step updates: a finite loss and gradient. A non-finite one is skipped (and lowers
// the fp16 loss scale); too many in a row stop the job.
bool Trainer::accept(StepMetrics& m) {
  const bool finite = std::isfinite(m.loss) && std::isfinite(m.grad_norm);
  if (policy_.loss_scaling) scaler_.update(!finite);
  if (finite) {
    bad_in_a_row_ = 0;
    return true;
  }
  m.skipped = true;
  ++skipped_;
  ++bad_in_a_row_;
  log::warn("step {}: non-finite {} (loss {}, grad norm {}); update skipped ({} in a row)", m.step,
            std::isfinite(m.loss) ? "gradient" : "loss", m.loss, m.grad_norm, bad_in_a_row_);
  MT_CHECK(policy_.loss_scaling || bad_in_a_row_ < cfg_.max_bad_steps,
           "stopping: {} steps in a row had a non-finite loss or gradient (train.max_bad_steps = "
           "{}); lower train.lr or check the data",
           bad_in_a_row_, cfg_.max_bad_steps);
  MT_CHECK(!policy_.loss_scaling || bad_in_a_row_ < std::max(cfg_.max_bad_steps, 30),
           "stopping: {} fp16 steps in a row overflowed even as the loss scale fell to {}",
           bad_in_a_row_, scaler_.scale());
  return false;
}

// The reduction waits of every DP rank, the step's time, throughput and MFU.
void Trainer::end_step(StepMetrics& m, Clock::time_point t0) {
  if (wait_spread_work_.defined()) {
    wait_spread_work_.wait();
    wait_spread_work_ = comm::Work();
    m.reduce_wait_max_ms = wait_spread_.data_as<float>()[0];
    m.reduce_wait_min_ms = -wait_spread_.data_as<float>()[1];
  }
  stop_signal_ = stop_.wait();
  device().synchronize();  // a GPU step ends when its queued work does
  m.step_ms = seconds_since(t0) * 1e3;
  const double tokens =
      static_cast<double>(cfg_.batch_size) * cfg_.seq_len * cfg_.grad_accum * mesh_.dp_size();
  m.tokens_per_s = tokens / (m.step_ms / 1e3);
  // Per rank: the global rate over the ranks' summed peak.
  m.mfu = model_cfg_.training_flops_per_token(cfg_.seq_len) * m.tokens_per_s / peak_flops_ /
          mesh_.world_size();
}

Tensor Trainer::master_weights() {
  if (optimizer_->holds_whole_master()) return optimizer_->master();
  MT_CHECK(final_master_.defined(),
           "master_weights(): under ZeRO-1 the whole master weights exist only after run()");
  return final_master_;
}

float Trainer::evaluate() {
  const data::Sampler* val = data_->val();
  if (val == nullptr) return std::numeric_limits<float>::quiet_NaN();
  if (pipe_) return pipe_->evaluate(*val, cfg_.eval_batches);
  double sum = 0.0;
  for (int i = 0; i < cfg_.eval_batches; ++i) {
    val->batch(i, 0, 1, inputs_, targets_);
    sum += model_->forward(inputs_, targets_);
  }
  return static_cast<float>(sum / cfg_.eval_batches);
}

std::string Trainer::generate(const std::string& prompt, int tokens, double temperature, int top_k,
                              std::uint64_t seed) {
  return generate_text(*model_, cfg_.seq_len, prompt, tokens, temperature, top_k, seed,
                       tokenizer_ ? &*tokenizer_ : nullptr);
}

TrainResult Trainer::run() {
  Progress progress;
  const auto t_start = Clock::now();
  for (int s = start_step_; s < cfg_.steps; ++s) {
    StepMetrics m = step(s);
    progress.add(m, s == start_step_);
    m.eta_s = seconds_since(t_start) / (s + 1 - start_step_) * (cfg_.steps - s - 1);
    log_.step(m, cfg_.log_every, mesh_.distributed() || reducer_ != nullptr);
    if (step_cb_) step_cb_(m);
    if (should_roll_back(m)) {
      s = roll_back(m.step) - 1;
      if (stop_signal_ != 0) return stop_early(progress.totals(), start_step_);
      continue;
    }
    after_step(m.step);
    // The last step's stop is no stop: the run is complete.
    if (stop_signal_ != 0 && m.step < cfg_.steps) return stop_early(progress.totals(), m.step);
  }
  return finish(progress);
}

// Checkpoints, evaluations and samples due after `step` (the last step's come in finish()).
void Trainer::after_step(int step) {
  if (cfg_.ckpt_every > 0 && (step % cfg_.ckpt_every == 0 || step == cfg_.steps))
    save_checkpoint(step);
  if (cfg_.eval_every > 0 && step % cfg_.eval_every == 0 && step != cfg_.steps) {
    const float vl = evaluate();
    if (std::isfinite(vl)) {
      log_.eval(step, vl, false, bits_per_byte(vl));
      if (eval_cb_) eval_cb_(EvalMetrics{step, vl, bits_per_byte(vl)});
    }
  }
  if (cfg_.sample_every > 0 && step % cfg_.sample_every == 0 && step != cfg_.steps) sample(step);
}

bool Trainer::should_roll_back(const StepMetrics& m) const {
  return m.skipped && cfg_.rollback_after > 0 && bad_in_a_row_ >= cfg_.rollback_after &&
         !last_checkpoint_.empty();
}

// Reloads the last checkpoint and draws fresh batches from the step that failed on: the steps
// since the checkpoint are redone on data the model has not seen (as PaLM did after loss
// spikes). Returns the step to continue from.
int Trainer::roll_back(int failed_at) {
  MT_CHECK(rollbacks_ < cfg_.max_rollbacks,
           "stopping: {} non-finite steps in a row again after {} rollbacks "
           "(checkpoint.max_rollbacks = {})",
           bad_in_a_row_, rollbacks_, cfg_.max_rollbacks);
  const int rollbacks = rollbacks_ + 1;
  restore(last_checkpoint_);
  rollbacks_ = rollbacks;
  data_skip_ += failed_at - start_step_;
  bad_in_a_row_ = 0;
  log::warn(
      "step {}: {} non-finite steps in a row; rolled back to {} (step {}), skipping {} "
      "steps of data (rollback {} of at most {})",
      failed_at, cfg_.rollback_after, last_checkpoint_, start_step_, failed_at - start_step_,
      rollbacks_, cfg_.max_rollbacks);
  log_.rollback(failed_at, start_step_, last_checkpoint_, data_skip_);
  return start_step_;
}

// The TP group of world rank 0 decodes together (decode is collective over TP); other DP
// replicas skip sampling. Rank 0 alone writes and prints.
std::string Trainer::sample(int at_step) {
  if (mesh_.dp_rank() != 0) return {};
  if (pipe_) return sample_pipeline(at_step);
  const std::string s = generate(cfg_.prompt, cfg_.sample_tokens, cfg_.temperature, cfg_.top_k,
                                 cfg_.seed + static_cast<std::uint64_t>(at_step));
  log_.sample(at_step, s);
  return s;
}

std::string Trainer::sample_pipeline(int at_step) {
  // The compute parameters (what a non-pipelined sample decodes with), as fp32 flat weights.
  const Tensor params = Tensor::from_floats(model_->flat_params().to_floats(),
                                            Shape{model_->num_parameters()}, DType::kF32);
  const auto weights = gather_pipeline_weights(*model_, params, mesh_);
  if (!is_root()) return {};
  std::unique_ptr<models::Decoder> whole = whole_model(model_cfg_, policy_, weights);
  const std::string s = generate_text(
      *whole, cfg_.seq_len, cfg_.prompt, cfg_.sample_tokens, cfg_.temperature, cfg_.top_k,
      cfg_.seed + static_cast<std::uint64_t>(at_step), tokenizer_ ? &*tokenizer_ : nullptr);
  log_.sample(at_step, s);
  return s;
}

TrainResult Trainer::finish(const Progress& p) {
  TrainResult r;
  r.steps = cfg_.steps;
  r.first_loss = p.first_loss;
  r.skipped_steps = skipped_;
  r.final_loss = p.recent.empty() ? std::numeric_limits<float>::quiet_NaN()
                                  : std::accumulate(p.recent.begin(), p.recent.end(), 0.0f) /
                                        static_cast<float>(p.recent.size());
  r.final_val_loss = evaluate();
  if (std::isfinite(r.final_val_loss)) {
    r.final_val_bits_per_byte = bits_per_byte(r.final_val_loss);
    log_.eval(cfg_.steps, r.final_val_loss, true, r.final_val_bits_per_byte);
    if (eval_cb_) eval_cb_(EvalMetrics{cfg_.steps, r.final_val_loss, r.final_val_bits_per_byte});
  }
  r.tokens_per_s = p.seconds > 0 ? p.tokens / p.seconds : 0;
  r.unigram_entropy = unigram_entropy_;
  const MemoryReport mem = memory_report();
  r.peak_rss_mib = mem.peak_rss_mib;
  log_.memory(cfg_.steps, mem);
  save_final_weights();
  write_trace();
  if (cfg_.sample_tokens > 0) r.sample = sample(cfg_.steps);
  if (comms_.dp.valid()) comms_.dp.finalize();
  if (comms_.tp.valid()) comms_.tp.finalize();
  if (comms_.pp.valid()) comms_.pp.finalize();
  mesh_.finalize();
  return r;
}

// Every rank writes its own file (rank 0 created the run directory before any step).
void Trainer::write_trace() {
  if (trace_steps_.empty()) return;
  const fs::path dir = fs::path(cfg_.run_dir) / "traces";
  std::error_code ec;
  fs::create_directories(dir, ec);
  trace_.write((dir / fmt::format("rank-{:05}.json", mesh_.world_rank())).string(),
               mesh_.world_rank(),
               fmt::format("rank {}: stage {}, dp {}, tp {}", mesh_.world_rank(), mesh_.pp_rank(),
                           mesh_.dp_rank(), mesh_.tp_rank()));
}

// What this rank holds for training (the same on every rank of a layout, but for ZeRO-1's last
// shard), and every rank's peak resident set size (collective).
MemoryReport Trainer::memory_report() {
  MemoryReport m;
  m.params = static_cast<std::int64_t>(model_->flat_params().nbytes());
  m.grads = static_cast<std::int64_t>(model_->flat_grads().nbytes());
  m.master = optimizer_->master_bytes();
  m.adam = optimizer_->moment_bytes();
  m.zero_buffers = zero_ ? static_cast<std::int64_t>(reducer_->shard_grads().nbytes()) : 0;
  m.activations = model_->activation_bytes();
  m.peak_rss_mib = gather_peak_rss_mib(world_);
  for (double t : gather_per_rank(world_, static_cast<float>(cpu_threads())))
    m.threads.push_back(static_cast<int>(t));
  return m;
}

// The final weights in the Hugging Face GPT-2 names (our [out, in] layout; see models/gpt.hpp).
// Under ZeRO-1 every rank gathers the whole master weights; under TP the TP group of rank 0
// gathers every split tensor. The file holds the full model in the TP = 1 layout whatever the
// layout (wte padded to a multiple of 128 rows only).
void Trainer::save_final_weights() {
  if (!optimizer_->holds_whole_master()) final_master_ = optimizer_->gather_master();
  if (mesh_.dp_rank() != 0) return;
  if (pipe_) {
    const auto weights = gather_pipeline_weights(*model_, master_weights(), mesh_);
    if (is_root())
      save_weights((fs::path(cfg_.run_dir) / "model.safetensors").string(), weights, to_toml(cfg_));
    return;
  }
  const auto weights = gather_weights(*model_, master_weights(), parallel::TPGroup(mesh_.tp()));
  if (is_root())
    save_weights((fs::path(cfg_.run_dir) / "model.safetensors").string(), weights, to_toml(cfg_));
}

}  // namespace meshtrain::launch
