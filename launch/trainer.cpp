#include "launch/trainer.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>

#include <sys/resource.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "runtime/config.hpp"
#include "runtime/log.hpp"
#include "runtime/ops.hpp"
#include "runtime/rng.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/threads.hpp"

extern "C" const char mt_default_corpus_begin[];
extern "C" const char mt_default_corpus_end[];

namespace meshtrain::launch {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const long total = std::lround(s);
  if (total >= 3600) return fmt::format("{}h{:02}m", total / 3600, (total % 3600) / 60);
  if (total >= 60) return fmt::format("{}m{:02}s", total / 60, total % 60);
  return fmt::format("{}s", total);
}

// The progress line's communication part: this rank's wait and, with DP > 1, the reduction's
// least and most wait over the ranks (a wide spread is a straggler, not the network).
std::string comm_summary(const StepMetrics& m) {
  if (std::isnan(m.reduce_wait_min_ms))
    return fmt::format(" | comm wait {:.1f} ms, {:.0f}% hidden", m.comm_wait_ms,
                       100.0 * m.comm_hidden);
  return fmt::format(" | comm wait {:.1f} ms (ranks {:.1f}-{:.1f}), {:.0f}% hidden", m.comm_wait_ms,
                     m.reduce_wait_min_ms, m.reduce_wait_max_ms, 100.0 * m.comm_hidden);
}

// A resumed run redoes the steps after its checkpoint: the records of the run it continues past
// that step (and a line torn by a kill) are dropped, so metrics.jsonl holds one history. The file
// is rewritten beside itself and renamed over the old one, so a kill leaves one or the other.
// Returns the number of records dropped.
int drop_metrics_after(const std::string& path, int step) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return 0;  // no metrics yet (resumed into another run directory)
  std::string kept, line;
  int dropped = 0;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const nlohmann::json r = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    const bool torn = r.is_discarded() || !r.is_object();
    if (torn || (r.contains("step") && r["step"].is_number() && r["step"].get<double>() > step)) {
      ++dropped;
      continue;
    }
    kept += line;
    kept += '\n';
  }
  if (in.bad()) throw IoError(fmt::format("cannot read '{}'", path));
  in.close();
  if (dropped == 0) return 0;
  const std::string tmp = path + ".tmp";
  {
    std::FILE* f = std::fopen(tmp.c_str(), "wb");
    if (f == nullptr) throw IoError(fmt::format("cannot write '{}'", tmp));
    const bool ok = std::fwrite(kept.data(), 1, kept.size(), f) == kept.size() &&
                    std::fflush(f) == 0 && ::fsync(::fileno(f)) == 0;
    if (std::fclose(f) != 0 || !ok) {
      std::remove(tmp.c_str());
      throw IoError(fmt::format("cannot write '{}'", tmp));
    }
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    throw IoError(fmt::format("cannot rename '{}' to '{}': {}", tmp, path, ec.message()));
  }
  return dropped;
}

}  // namespace

std::int64_t dp_bucket_bytes(const TrainConfig& cfg, std::int64_t grad_bytes) {
  if (cfg.dp_bucket_mb <= 0) return parallel::auto_bucket_bytes(grad_bytes);
  return std::max<std::int64_t>(1, static_cast<std::int64_t>(cfg.dp_bucket_mb * (1 << 20)));
}

models::GPTConfig model_config(const TrainConfig& c) {
  models::GPTConfig m = models::GPTConfig::preset(c.model_preset);
  if (c.n_layer) m.n_layer = c.n_layer;
  if (c.n_head) m.n_head = c.n_head;
  if (c.n_embd) m.n_embd = c.n_embd;
  if (c.block_size) m.block_size = c.block_size;
  const bool bytes = c.vocab == "bytes" || (c.vocab == "auto" && m.vocab_size == 256);
  m.vocab_size = bytes ? 256 : 50257;
  // Under tensor parallelism every rank holds an equal, 128-aligned slice of the vocabulary.
  m.padded_vocab = models::GPTConfig::pad_vocab(m.vocab_size, 128 * c.tp);
  MT_CHECK(m.n_embd % m.n_head == 0, "model.n_embd ({}) must be a multiple of model.n_head ({})",
           m.n_embd, m.n_head);
  MT_CHECK(m.n_head % c.tp == 0,
           "train.tp = {}: the model's {} attention heads (model.n_head) cannot be split across {} "
           "tensor-parallel ranks; train.tp must divide model.n_head",
           c.tp, m.n_head, c.tp);
  MT_CHECK(c.seq_len <= m.block_size,
           "train.seq_len ({}) exceeds the model's block size ({}): lower train.seq_len or raise "
           "model.block_size",
           c.seq_len, m.block_size);
  m.validate();
  m.validate_tp(c.tp);
  return m;
}

std::string_view default_corpus() {
  return std::string_view(
      mt_default_corpus_begin,
      static_cast<std::size_t>(mt_default_corpus_end - mt_default_corpus_begin));
}

double measure_bf16_matmul_peak(Device& device) {
  // A GPU needs a larger product to reach its rate (and to time it with the host clock).
  const std::int64_t n = device.is_cpu() ? 1024 : 8192;
  Tensor a = Tensor::empty(Shape{n, n}, DType::kBF16, device);
  Tensor b = Tensor::empty(Shape{n, n}, DType::kBF16, device);
  fill_uniform(a, Philox(1, 1), -1.0f, 1.0f);
  fill_uniform(b, Philox(1, 2), -1.0f, 1.0f);
  Tensor c = Tensor::empty(Shape{n, n}, DType::kBF16, device);
  ops::matmul(c, a, b);  // warm-up: primitive creation, page faults
  device.synchronize();
  // The fastest of at least 5 reps and up to 0.5 s of them: on a machine shared with other
  // work one preempted rep is common, and a low peak shows up as an MFU above 100%.
  double best = std::numeric_limits<double>::infinity();
  const auto start = Clock::now();
  for (int rep = 0; rep < 5 || (rep < 50 && seconds_since(start) < 0.5); ++rep) {
    const auto t0 = Clock::now();
    ops::matmul(c, a, b);
    device.synchronize();
    best = std::min(best, seconds_since(t0));
  }
  return 2.0 * static_cast<double>(n * n * n) / best;
}

namespace {
// The layout is checked before the model: a process count that train.tp does not divide is
// named as such, whatever the model.
const TrainConfig& checked_layout(const TrainConfig& cfg, const comm::Communicator* world) {
  const int ranks = world != nullptr ? world->size() : 1;
  MT_CHECK(ranks % cfg.tp == 0,
           "train.tp = {} needs a multiple of {} ranks (mpirun -np N runs DP = N / {} x TP = {}); "
           "this job has {}",
           cfg.tp, cfg.tp, cfg.tp, cfg.tp, ranks);
  return cfg;
}
}  // namespace

std::string Trainer::dp_backend() const {
  if (comms_.dp.valid()) return "nccl";
  return mesh_.dp_size() > 1 ? "mpi" : "none";
}

std::string Trainer::tp_backend() const {
  if (comms_.tp.valid()) return "nccl";
  return mesh_.tp_size() > 1 ? "mpi" : "none";
}

Trainer::Trainer(const TrainConfig& cfg, comm::Communicator* world, comm::NodeLocal local)
    : cfg_(checked_layout(cfg, world)),
      policy_(PrecisionPolicy::parse(cfg.precision)),
      model_cfg_(model_config(cfg)) {
  set_cpu_threads(cfg_.threads > 0 ? cfg_.threads : default_cpu_threads(local.size));
  if (world != nullptr && world->size() > 1) mesh_ = parallel::Mesh(*world, cfg_.tp);
  verbose_ = is_root();
  gpu_ = open_device(cfg_, local.rank);
  comms_ = open_device_comms(cfg_, world, mesh_, gpu_.get());
  // The run directory is created once the data is known to be good (except for the built-in
  // corpus, which is written there): bad input leaves nothing behind.
  auto create_run_dir = [&] {
    std::error_code ec;
    fs::create_directories(cfg_.run_dir, ec);
    if (ec)
      throw IoError(
          fmt::format("cannot create run directory '{}': {}", cfg_.run_dir, ec.message()));
  };
  std::vector<std::string> train = cfg_.train_files;
  std::string private_corpus;  // ranks other than 0 read the built-in corpus from a temporary
  if (train.empty()) {
    if (is_root()) {
      create_run_dir();
      corpus_path_ = (fs::path(cfg_.run_dir) / "default_corpus.txt").string();
    } else {
      private_corpus = (fs::temp_directory_path() /
                        fmt::format("meshtrain-corpus-{}-{}.txt", ::getpid(), mesh_.world_rank()))
                           .string();
    }
    const std::string& path = is_root() ? corpus_path_ : private_corpus;
    // A resumed run finds the corpus already there: leave the run directory as it is.
    std::error_code ec;
    if (!is_root() || fs::file_size(path, ec) != default_corpus().size() || ec)
      std::ofstream(path, std::ios::binary) << default_corpus();
    train.push_back(path);
  }
  data_ =
      std::make_unique<data::Dataset>(train, cfg_.val_files, data::parse_format(cfg_.data_format),
                                      cfg_.val_fraction, cfg_.seq_len, cfg_.seed);
  if (!private_corpus.empty()) {
    std::error_code ec;
    fs::remove(private_corpus, ec);  // the dataset has it mapped
  }
  MT_CHECK(
      data_->max_token() < model_cfg_.vocab_size,
      "the data holds token id {}, outside the model's vocabulary of {} (model.vocab = \"{}\"){}",
      data_->max_token(), model_cfg_.vocab_size, cfg_.vocab,
      data_->is_text() ? "" : "; token shards need model.vocab = \"gpt2\"");
  if (is_root()) create_run_dir();

  model_ =
      std::make_unique<models::GPT>(model_cfg_, policy_, device(), parallel::TPGroup(tp_comm()));
  model_->init_weights(cfg_.seed);
  // Starting weights from a file (fine-tuning); a resumed run takes the checkpoint's instead.
  if (!cfg_.model_init.empty() && resolve_resume(cfg_).empty())
    load_weights(*model_, cfg_.model_init);
  const std::int64_t n_params = model_->num_parameters();
  world_ = world;
  // comm.backend = "nccl" reduces through NCCL even for DP = 1 (mpirun -np 1 on one GPU runs
  // the NCCL gradient path, ZeRO-1 included).
  const bool reduce = mesh_.dp_size() > 1 || comms_.dp.valid();
  zero_ = reduce && cfg_.zero == 1;
  std::int64_t opt_n = n_params;  // elements of AdamW state on this rank
  if (reduce) {
    parallel::ReducerOptions ro;
    ro.bucket_bytes = dp_bucket_bytes(cfg_, n_params * 4);
    ro.overlap = cfg_.dp_overlap == "on";
    ro.reduce_dtype = cfg_.dp_reduce_dtype == "bf16" ? DType::kBF16 : DType::kF32;
    // ZeRO-1: gradients are reduce-scattered; rank r owns the r-th chunk of every bucket.
    ro.shard = zero_;
    reducer_ = std::make_unique<parallel::GradReducer>(dp_comm(), model_->flat_grads(),
                                                       model_->params(), ro);
    model_->set_grads_ready_hook(
        [r = reducer_.get()](std::int64_t lo, std::int64_t hi) { r->grads_ready(lo, hi); });
  }
  if (zero_) {
    opt_n = reducer_->shard_numel();
    if (policy_.has_master_copy()) {
      // Keep this rank's shard of the fp32 master weights and free the model's whole copy
      // (returned to the system, not kept in the allocator's cache).
      master_shard_ = Tensor::zeros(Shape{opt_n}, DType::kF32, device());
      for (const parallel::FlatRun& r : reducer_->shard_runs()) {
        Tensor dst = master_shard_.slice(r.local, r.length);
        dst.copy_from(model_->flat_master().slice(r.flat, r.length));
      }
      model_->release_master_copy();
      model_->device().empty_cache();
    }
  }
  m_ = Tensor::zeros(Shape{opt_n}, DType::kF32, device());
  v_ = Tensor::zeros(Shape{opt_n}, DType::kF32, device());
  inputs_ = Tensor::empty(Shape{cfg_.batch_size, cfg_.seq_len}, DType::kI32);
  targets_ = Tensor::empty(Shape{cfg_.batch_size, cfg_.seq_len}, DType::kI32);
  schedule_ = LrSchedule{cfg_.schedule,     cfg_.lr,    cfg_.min_lr_ratio,
                         cfg_.warmup_steps, cfg_.steps, cfg_.decay_fraction};

  // Resuming: the checkpoint is read and checked in full before any step runs or any file of
  // the run directory is written.
  if (const std::string dir = resolve_resume(cfg_); !dir.empty()) {
    restore(dir);
    resumed_from_ = dir;
  }

  const std::string effective = to_toml(cfg_);
  peak_flops_ = measure_bf16_matmul_peak(device());
  unigram_entropy_ = data_->unigram_entropy();
  if (!is_root()) return;
  {
    std::ofstream out(fs::path(cfg_.run_dir) / "config.toml");
    out << "# effective configuration of this run (meshtrain " << MESHTRAIN_VERSION << ")\n"
        << effective;
    if (!out) throw IoError(fmt::format("cannot write {}/config.toml", cfg_.run_dir));
  }
  const std::string metrics_path = (fs::path(cfg_.run_dir) / "metrics.jsonl").string();
  // A resumed run continues the metrics of the run it resumes, from its checkpoint's step.
  if (!resumed_from_.empty()) {
    if (const int dropped = drop_metrics_after(metrics_path, start_step_); dropped > 0)
      log::info("{}: dropped {} record(s) after step {} (the steps this run redoes from {})",
                metrics_path, dropped, start_step_, resumed_from_);
  }
  metrics_ = std::fopen(metrics_path.c_str(), resumed_from_.empty() ? "w" : "a");
  if (metrics_ == nullptr) throw IoError(fmt::format("cannot write '{}'", metrics_path));
  if (verbose_) {
    std::printf("meshtrain %s | model %s | %s | %s%s\n", MESHTRAIN_VERSION,
                model_cfg_.str().c_str(), std::string(policy_.name()).c_str(),
                gpu_ ? gpu_->name().c_str() : fmt::format("{} thread(s)", cpu_threads()).c_str(),
                mesh_.distributed()
                    ? fmt::format(" per rank | {} ranks: DP {} x TP {}", mesh_.world_size(),
                                  mesh_.dp_size(), mesh_.tp_size())
                          .c_str()
                    : "");
    if (!comms_.summary.empty()) std::printf("communication: %s\n", comms_.summary.c_str());
    std::printf("data: %lld training tokens, %lld validation tokens%s\n",
                static_cast<long long>(data_->train().tokens()),
                static_cast<long long>(data_->val() ? data_->val()->tokens() : 0),
                corpus_path_.empty() ? "" : " (built-in corpus: Debian's fortune cookies)");
    std::printf("unigram entropy of the training data: %.4f nats per token (the loss to beat)\n",
                unigram_entropy_);
    std::printf("measured bf16 matmul peak: %.1f GFLOP/s (the MFU denominator)\n",
                peak_flops_ / 1e9);
    std::printf("effective config (saved in %s/config.toml):\n%s\n", cfg_.run_dir.c_str(),
                effective.c_str());
    if (!resumed_from_.empty())
      std::printf("resuming from %s at step %d\n", resumed_from_.c_str(), start_step_);
    std::fflush(stdout);
  }
  if (!resumed_from_.empty())
    write_metrics(nlohmann::json{{"step", start_step_}, {"resumed_from", resumed_from_}}.dump());
}

Trainer::~Trainer() {
  if (metrics_ != nullptr) std::fclose(metrics_);
}

void Trainer::write_metrics(const std::string& json_line) {
  if (metrics_ == nullptr) return;  // ranks other than 0
  std::fputs(json_line.c_str(), metrics_);
  std::fputc('\n', metrics_);
  std::fflush(metrics_);
}

StepMetrics Trainer::step(int step) {
  const auto t0 = Clock::now();
  StepMetrics m;
  m.step = step + 1;
  m.total_steps = cfg_.steps;
  m.lr = schedule_.at(step);
  const float scale = policy_.loss_scaling ? scaler_.scale() : 1.0f;
  model_->zero_grads();
  double loss_sum = 0.0;
  for (int micro = 0; micro < cfg_.grad_accum; ++micro) {
    data_->train().batch(static_cast<std::int64_t>(step + data_skip_) * cfg_.grad_accum + micro,
                         mesh_.dp_rank(), mesh_.dp_size(), inputs_, targets_);
    // Only the last micro-step's backward reduces: earlier ones accumulate locally.
    if (reducer_) reducer_->begin_step(micro + 1 == cfg_.grad_accum);
    loss_sum += model_->forward(inputs_, targets_);
    model_->backward(scale / static_cast<float>(cfg_.grad_accum));
  }
  m.loss = static_cast<float>(loss_sum / cfg_.grad_accum);
  if (reducer_) {
    // The global mean loss rides along with the last buckets; the gradients are averaged over
    // DP once finish() returns (ZeRO-1: this rank's shard of them), so the norm below is the
    // global one on every rank.
    // (A host scalar: over the mesh's MPI group, which exists for DP > 1.)
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
      // Every rank's wait, as its max and -min: posted now, read at the end of the step, so
      // the optimizer update hides it.
      wait_spread_ = Tensor::from_floats(
          {static_cast<float>(rs.wait_ms), -static_cast<float>(rs.wait_ms)}, Shape{2}, DType::kF32);
      wait_spread_work_ = mesh_.dp().allreduce(wait_spread_, comm::ReduceOp::kMax);
    }
  }
  if (zero_) {
    const auto tc = Clock::now();
    // The squared norm summed over the DP shards (the padding is zero) and the TP ranks.
    double share = 0;
    for (const parallel::FlatRun& r : reducer_->shard_runs())
      share += grad_norm_share(reducer_->shard_grads().slice(r.local, r.length), r.flat);
    Tensor sq = Tensor::from_floats({static_cast<float>(share)}, Shape{1}, DType::kF32);
    if (mesh_.dp().valid()) mesh_.dp().allreduce(sq, comm::ReduceOp::kSum).wait();
    parallel::TPGroup(mesh_.tp()).allreduce(sq);
    m.grad_norm = std::sqrt(static_cast<double>(sq.data_as<float>()[0])) / scale;
    m.comm_wait_ms += seconds_since(tc) * 1e3;
  } else if (mesh_.tp_size() > 1) {
    Tensor sq = Tensor::from_floats({static_cast<float>(grad_norm_share(model_->flat_grads(), 0))},
                                    Shape{1}, DType::kF32);
    parallel::TPGroup(mesh_.tp()).allreduce(sq);
    m.grad_norm = std::sqrt(static_cast<double>(sq.data_as<float>()[0])) / scale;
  } else {
    m.grad_norm = std::sqrt(ops::sum_of_squares(model_->flat_grads())) / scale;
  }
  const bool finite = std::isfinite(m.loss) && std::isfinite(m.grad_norm);
  if (policy_.loss_scaling) scaler_.update(!finite);
  if (!finite) {
    m.skipped = true;
    ++skipped_;
    ++bad_in_a_row_;
    log::warn("step {}: non-finite {} (loss {}, grad norm {}); update skipped ({} in a row)",
              m.step, std::isfinite(m.loss) ? "gradient" : "loss", m.loss, m.grad_norm,
              bad_in_a_row_);
    MT_CHECK(policy_.loss_scaling || bad_in_a_row_ < cfg_.max_bad_steps,
             "stopping: {} steps in a row had a non-finite loss or gradient (train.max_bad_steps = "
             "{}); lower train.lr or check the data",
             bad_in_a_row_, cfg_.max_bad_steps);
    MT_CHECK(!policy_.loss_scaling || bad_in_a_row_ < std::max(cfg_.max_bad_steps, 30),
             "stopping: {} fp16 steps in a row overflowed even as the loss scale fell to {}",
             bad_in_a_row_, scaler_.scale());
  } else {
    bad_in_a_row_ = 0;
    float clip = 1.0f;
    if (cfg_.grad_clip > 0 && m.grad_norm > cfg_.grad_clip)
      clip = static_cast<float>(cfg_.grad_clip / (m.grad_norm + 1e-6));
    const auto& params = model_->params();
    // This rank updates the flat elements it owns: all of them, or its ZeRO-1 runs, whose
    // gradients, m, v (and master weights, 16-bit policies) sit at the run's shard offset.
    std::vector<parallel::FlatRun> owned{{0, 0, model_->num_parameters()}};
    if (zero_) owned = reducer_->shard_runs();
    const Tensor& grads = zero_ ? reducer_->shard_grads() : model_->flat_grads();
    const bool sharded_master = zero_ && policy_.has_master_copy();
    for (const parallel::FlatRun& run : owned) {
      for (std::size_t i = 0; i < params.size(); ++i) {
        const std::int64_t lo = std::max(params[i].offset, run.flat);
        const std::int64_t hi =
            std::min(params[i].offset + params[i].numel(), run.flat + run.length);
        if (hi <= lo) continue;
        const std::int64_t at = run.local + (lo - run.flat);
        ops::AdamWParams p;
        p.lr = static_cast<float>(m.lr);
        p.beta1 = static_cast<float>(cfg_.beta1);
        p.beta2 = static_cast<float>(cfg_.beta2);
        p.eps = static_cast<float>(cfg_.eps);
        p.weight_decay = params[i].decay ? static_cast<float>(cfg_.weight_decay) : 0.0f;
        p.step = step + 1 - skipped_;
        p.grad_scale = clip / scale;
        Tensor param =
            policy_.has_master_copy() ? model_->flat_params().slice(lo, hi - lo) : Tensor();
        Tensor master = sharded_master ? master_shard_.slice(at, hi - lo)
                                       : model_->flat_master().slice(lo, hi - lo);
        Tensor mi = m_.slice(at, hi - lo);
        Tensor vi = v_.slice(at, hi - lo);
        ops::adamw_update(param, master, grads.slice(at, hi - lo), mi, vi, p);
      }
    }
    if (zero_) {
      // Every rank wrote the parameters it owns in place: gather the others'.
      m.comm_wait_ms += reducer_->all_gather_shards(Tensor(), model_->flat_params());
    }
  }
  if (wait_spread_work_.defined()) {
    wait_spread_work_.wait();
    wait_spread_work_ = comm::Work();
    m.reduce_wait_max_ms = wait_spread_.data_as<float>()[0];
    m.reduce_wait_min_ms = -wait_spread_.data_as<float>()[1];
  }
  device().synchronize();  // a GPU step ends when its queued work does
  m.step_ms = seconds_since(t0) * 1e3;
  const double tokens =
      static_cast<double>(cfg_.batch_size) * cfg_.seq_len * cfg_.grad_accum * mesh_.dp_size();
  m.tokens_per_s = tokens / (m.step_ms / 1e3);
  // Per rank: the global rate over the ranks' summed peak.
  m.mfu = model_cfg_.training_flops_per_token(cfg_.seq_len) * m.tokens_per_s / peak_flops_ /
          mesh_.world_size();
  return m;
}

double Trainer::grad_norm_share(const Tensor& grads, std::int64_t lo) const {
  return parallel::norm_squared_share(grads, lo, model_->params(), mesh_.tp_rank());
}

Tensor Trainer::master_weights() {
  if (model_->holds_master()) return model_->flat_master();
  MT_CHECK(final_master_.defined(),
           "master_weights(): under ZeRO-1 the whole master weights exist only after run()");
  return final_master_;
}

float Trainer::evaluate() {
  const data::Sampler* val = data_->val();
  if (val == nullptr) return std::numeric_limits<float>::quiet_NaN();
  double sum = 0.0;
  for (int i = 0; i < cfg_.eval_batches; ++i) {
    val->batch(i, 0, 1, inputs_, targets_);
    sum += model_->forward(inputs_, targets_);
  }
  return static_cast<float>(sum / cfg_.eval_batches);
}

std::string generate_text(models::GPT& model, int window_len, const std::string& prompt, int tokens,
                          double temperature, int top_k, std::uint64_t seed) {
  const models::GPTConfig& model_cfg = model.config();
  MT_CHECK(window_len >= 1 && window_len <= model_cfg.block_size,
           "generate: window {} must be in [1, {}]", window_len, model_cfg.block_size);
  MT_CHECK(tokens >= 0, "generate: token count {} is negative", tokens);
  const bool bytes = model_cfg.vocab_size == 256;
  std::vector<std::int32_t> ids;
  if (bytes) {
    for (unsigned char ch : prompt) ids.push_back(ch);
    if (ids.empty()) ids.push_back('\n');
  } else {
    ids.push_back(50256);  // GPT-2's end-of-text token starts a fresh document
  }
  const std::size_t prompt_len = ids.size();
  // KV-cached decoding: each new token costs one position's work. When the cache is full,
  // restart it on the last half window of the text so far.
  const std::size_t keep = static_cast<std::size_t>(std::max(1, window_len / 2));
  Philox rng(seed, 0xdecade);
  std::vector<float> probs;
  auto refill = [&](std::size_t from) {
    model.reset_cache();
    std::vector<float> last;
    for (std::size_t i = from; i < ids.size(); ++i) last = model.decode(ids[i]);
    return last;
  };
  std::vector<float> logits =
      refill(ids.size() > static_cast<std::size_t>(window_len) ? ids.size() - window_len : 0);
  for (int n = 0; n < tokens; ++n) {
    std::int32_t next;
    if (temperature <= 0) {
      next = static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) -
                                       logits.begin());
    } else {
      std::vector<std::int32_t> order(logits.size());
      std::iota(order.begin(), order.end(), 0);
      const std::size_t k = top_k > 0 ? std::min<std::size_t>(top_k, order.size()) : order.size();
      std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k), order.end(),
                        [&](int x, int y) { return logits[x] > logits[y]; });
      probs.assign(k, 0.0f);
      const float mx = logits[order[0]];
      double total = 0.0;
      for (std::size_t i = 0; i < k; ++i) {
        probs[i] = std::exp((logits[order[i]] - mx) / static_cast<float>(temperature));
        total += probs[i];
      }
      double u = rng.uniform(static_cast<std::uint64_t>(n)) * total;
      std::size_t pick = k - 1;
      for (std::size_t i = 0; i < k; ++i) {
        u -= probs[i];
        if (u <= 0) {
          pick = i;
          break;
        }
      }
      next = order[pick];
    }
    ids.push_back(next);
    if (n + 1 == tokens) break;
    if (model.cache_length() >= window_len) {
      logits = refill(ids.size() - keep);
    } else {
      logits = model.decode(next);
    }
  }
  std::string out;
  for (std::size_t i = bytes ? 0 : prompt_len; i < ids.size(); ++i) {
    if (bytes) {
      out.push_back(static_cast<char>(ids[i]));
    } else {
      if (!out.empty()) out.push_back(' ');
      out += std::to_string(ids[i]);
    }
  }
  return out;
}

std::string Trainer::generate(const std::string& prompt, int tokens, double temperature, int top_k,
                              std::uint64_t seed) {
  return generate_text(*model_, cfg_.seq_len, prompt, tokens, temperature, top_k, seed);
}

void load_weights(models::GPT& model, const std::string& path) {
  const SafetensorsFile f = load_safetensors(path);
  const models::GPTConfig& mc = model.config();
  const parallel::TPGroup& tp = model.tp();
  for (std::size_t i = 0; i < model.params().size(); ++i) {
    const models::ParamInfo& p = model.params()[i];
    Tensor t = f.at(p.name);
    MT_CHECK(is_floating(t.dtype()), "'{}': tensor '{}' is {}, expected a float dtype", path,
             p.name, dtype_name(t.dtype()));
    // The vocabulary padding depends on the layout (128 x TP rows): the real rows are what count.
    const bool wte = p.name == "wte.weight";
    const bool same =
        t.shape() == p.full_shape ||
        (wte && t.ndim() == 2 && t.dim(0) >= mc.vocab_size && t.dim(1) == p.full_shape[1]);
    MT_CHECK(same,
             "'{}': tensor '{}' has shape {}, the model expects {} (another model's weights?)",
             path, p.name, t.shape().str(), p.full_shape.str());
    if (wte && t.shape() != p.full_shape) {
      Tensor full = Tensor::zeros(p.full_shape, t.dtype());
      full.slice(0, mc.vocab_size).copy_from(t.slice(0, mc.vocab_size));
      t = full;
    }
    Tensor m = model.master(i);
    if (p.shard_dim >= 0 && tp.size() > 1) {
      parallel::copy_shard(m, t, p.shard_dim, p.shard_parts, tp.rank(), tp.size());
    } else {
      m.copy_from(t);
    }
  }
  MT_CHECK(f.tensors.size() == model.params().size(),
           "'{}' holds {} tensors, the model has {} parameters", path, f.tensors.size(),
           model.params().size());
  model.sync_params_from_master();
}

TrainResult Trainer::run() {
  TrainResult r;
  std::vector<float> recent;
  double tokens_total = 0, seconds_total = 0;
  const auto t_start = Clock::now();
  auto print_sample = [&](int at_step) -> std::string {
    // The TP group of world rank 0 decodes together (decode is collective over TP); other DP
    // replicas skip sampling. Rank 0 alone writes and prints.
    if (mesh_.dp_rank() != 0) return {};
    const std::string s = generate(cfg_.prompt, cfg_.sample_tokens, cfg_.temperature, cfg_.top_k,
                                   cfg_.seed + static_cast<std::uint64_t>(at_step));
    write_metrics(nlohmann::json{{"step", at_step}, {"sample", s}}.dump(
        -1, ' ', false, nlohmann::json::error_handler_t::replace));
    if (verbose_) std::printf("---- sample at step %d ----\n%s\n----\n", at_step, s.c_str());
    return s;
  };
  for (int s = start_step_; s < cfg_.steps; ++s) {
    StepMetrics m = step(s);
    if (s == start_step_) r.first_loss = m.loss;
    if (s > start_step_) {
      tokens_total += m.tokens_per_s * m.step_ms / 1e3;
      seconds_total += m.step_ms / 1e3;
    }
    const double elapsed = seconds_since(t_start);
    m.eta_s = elapsed / (s + 1 - start_step_) * (cfg_.steps - s - 1);
    if (!m.skipped) {
      recent.push_back(m.loss);
      if (recent.size() > 10) recent.erase(recent.begin());
    }
    write_metrics(nlohmann::json{
        {"step", m.step},
        {"loss", m.loss},
        {"lr", m.lr},
        {"grad_norm", m.grad_norm},
        {"ms", m.step_ms},
        {"tokens_per_s", m.tokens_per_s},
        {"mfu", m.mfu},
        {"skipped",
         m.skipped}}.dump());
    if (mesh_.distributed() || reducer_) {
      nlohmann::json c{{"step", m.step},
                       {"comm_wait_ms", m.comm_wait_ms},
                       {"comm_hidden", m.comm_hidden},
                       {"comm_ms", m.comm_ms},
                       {"comm_clock", m.comm_device_timed ? "device" : "host"}};
      if (!std::isnan(m.reduce_wait_min_ms)) {
        c["reduce_wait_min_ms"] = m.reduce_wait_min_ms;
        c["reduce_wait_max_ms"] = m.reduce_wait_max_ms;
      }
      write_metrics(c.dump());
    }
    if (verbose_ && (m.step % cfg_.log_every == 0 || m.step == cfg_.steps || m.step == 1)) {
      std::printf(
          "step %*d/%d | loss %.4f | lr %.2e | norm %.3f | %.1f ms | %.0f tok/s | MFU %.1f%% | ETA "
          "%s%s%s\n",
          static_cast<int>(std::to_string(cfg_.steps).size()), m.step, cfg_.steps, m.loss, m.lr,
          m.grad_norm, m.step_ms, m.tokens_per_s, 100.0 * m.mfu, format_duration(m.eta_s).c_str(),
          mesh_.distributed() || reducer_ ? comm_summary(m).c_str() : "",
          m.skipped ? " | SKIPPED" : "");
      std::fflush(stdout);
    }
    if (step_cb_) step_cb_(m);
    if (m.skipped && cfg_.rollback_after > 0 && bad_in_a_row_ >= cfg_.rollback_after &&
        !last_checkpoint_.empty()) {
      // Reload the last checkpoint and draw fresh batches from the step that failed on: the
      // steps since the checkpoint are redone on data the model has not seen (as PaLM did after
      // loss spikes).
      MT_CHECK(rollbacks_ < cfg_.max_rollbacks,
               "stopping: {} non-finite steps in a row again after {} rollbacks "
               "(checkpoint.max_rollbacks = {})",
               bad_in_a_row_, rollbacks_, cfg_.max_rollbacks);
      const int failed_at = m.step;
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
      write_metrics(nlohmann::json{
          {"step", failed_at},
          {"rollback_to", start_step_},
          {"checkpoint", last_checkpoint_},
          {"data_skip_steps",
           data_skip_}}.dump());
      s = start_step_ - 1;
      continue;
    }
    if (cfg_.ckpt_every > 0 && (m.step % cfg_.ckpt_every == 0 || m.step == cfg_.steps))
      save_checkpoint(m.step);
    if (cfg_.eval_every > 0 && m.step % cfg_.eval_every == 0 && m.step != cfg_.steps) {
      const float vl = evaluate();
      if (std::isfinite(vl)) {
        write_metrics(nlohmann::json{{"step", m.step}, {"val_loss", vl}}.dump());
        if (verbose_) std::printf("step %d | validation loss %.4f\n", m.step, vl);
        if (eval_cb_) eval_cb_(EvalMetrics{m.step, vl});
      }
    }
    if (cfg_.sample_every > 0 && m.step % cfg_.sample_every == 0 && m.step != cfg_.steps)
      print_sample(m.step);
  }
  r.steps = cfg_.steps;
  r.skipped_steps = skipped_;
  r.final_loss = recent.empty() ? std::numeric_limits<float>::quiet_NaN()
                                : std::accumulate(recent.begin(), recent.end(), 0.0f) /
                                      static_cast<float>(recent.size());
  r.final_val_loss = evaluate();
  if (std::isfinite(r.final_val_loss)) {
    write_metrics(nlohmann::json{{"step", cfg_.steps}, {"val_loss", r.final_val_loss}}.dump());
    if (verbose_) std::printf("final validation loss %.4f\n", r.final_val_loss);
    if (eval_cb_) eval_cb_(EvalMetrics{cfg_.steps, r.final_val_loss});
  }
  r.tokens_per_s = seconds_total > 0 ? tokens_total / seconds_total : 0;
  r.unigram_entropy = unigram_entropy_;
  {
    // What this rank holds for training (the same on every rank of a layout, but for ZeRO-1's
    // last shard), and the peak resident set size, the largest over every rank.
    auto bytes = [](const Tensor& t) {
      return t.defined() ? static_cast<std::int64_t>(t.nbytes()) : std::int64_t{0};
    };
    const std::int64_t params = bytes(model_->flat_params()), grads = bytes(model_->flat_grads());
    const std::int64_t master = !policy_.has_master_copy() ? 0
                                : model_->holds_master()   ? bytes(model_->flat_master())
                                                           : bytes(master_shard_);
    const std::int64_t adam = bytes(m_) + bytes(v_);
    const std::int64_t zero_buffers = zero_ ? bytes(reducer_->shard_grads()) : 0;
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    const float rss_mib = static_cast<float>(ru.ru_maxrss) / 1024.0f;  // ru_maxrss is in KiB
    // Every rank's peak, by world rank.
    const int n = world_ != nullptr ? world_->size() : 1;
    Tensor all = Tensor::zeros(Shape{n}, DType::kF32);
    if (n > 1) {
      world_->all_gather(Tensor::from_floats({rss_mib}, Shape{1}, DType::kF32), all).wait();
    } else {
      all.data_as<float>()[0] = rss_mib;
    }
    for (int i = 0; i < n; ++i) r.peak_rss_mib.push_back(all.data_as<float>()[i]);
    const float rss_max = *std::max_element(r.peak_rss_mib.begin(), r.peak_rss_mib.end());
    write_metrics(nlohmann::json{{"step", cfg_.steps},
                                 {"memory",
                                  {{"param_bytes", params},
                                   {"grad_bytes", grads},
                                   {"master_bytes", master},
                                   {"adam_bytes", adam},
                                   {"zero_buffer_bytes", zero_buffers},
                                   {"activation_bytes", model_->activation_bytes()},
                                   {"peak_rss_mib_rank0", rss_mib},
                                   {"peak_rss_mib_max", rss_max}}},
                                 {"peak_rss_mib", r.peak_rss_mib}}
                      .dump());
    if (verbose_)
      std::printf(
          "memory per rank: parameters %.2f MiB, gradients %.2f MiB, master %.2f MiB, "
          "AdamW %.2f MiB, activations %.2f MiB; peak RSS %.1f MiB (largest rank)\n",
          params / 1048576.0, grads / 1048576.0, master / 1048576.0, adam / 1048576.0,
          model_->activation_bytes() / 1048576.0, rss_max);
  }
  // Final weights in the Hugging Face GPT-2 names (our [out, in] layout; see models/gpt.hpp).
  if (!model_->holds_master()) {
    // ZeRO-1: each rank holds its shard of the master weights; every rank gathers the whole.
    final_master_ = Tensor::zeros(Shape{model_->num_parameters()}, DType::kF32, device());
    reducer_->all_gather_shards(master_shard_, final_master_);
  }
  // Under TP the TP group of rank 0 gathers every split tensor; the file holds the full model
  // in the TP = 1 layout whatever the layout (wte padded to a multiple of 128 rows only).
  if (mesh_.dp_rank() == 0) {
    const Tensor master = master_weights();
    std::vector<std::pair<std::string, Tensor>> weights;
    const parallel::TPGroup tp(mesh_.tp());
    for (std::size_t i = 0; i < model_->params().size(); ++i) {
      const models::ParamInfo& p = model_->params()[i];
      const Tensor mine = master.slice(p.offset, p.shape.numel()).view(p.shape);
      Tensor full = p.shard_dim < 0 || tp.size() == 1
                        ? mine
                        : parallel::gather_full(mine, p.full_shape, p.shard_dim, p.shard_parts, tp);
      if (static_cast<int>(i) == 0 && p.name == "wte.weight")
        full = full.slice(0, models::GPTConfig::pad_vocab(model_cfg_.vocab_size));
      weights.emplace_back(p.name, full);
    }
    if (is_root())
      save_safetensors((fs::path(cfg_.run_dir) / "model.safetensors").string(), weights,
                       {{"format", "meshtrain"}, {"config", to_toml(cfg_)}});
  }
  if (cfg_.sample_tokens > 0) r.sample = print_sample(cfg_.steps);
  if (comms_.dp.valid()) comms_.dp.finalize();
  if (comms_.tp.valid()) comms_.tp.finalize();
  mesh_.finalize();
  return r;
}

}  // namespace meshtrain::launch
