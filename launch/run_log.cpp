#include "launch/run_log.hpp"

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "runtime/config.hpp"
#include "runtime/error.hpp"
#include "runtime/file_io.hpp"
#include "runtime/log.hpp"
#include "runtime/ops.hpp"
#include "runtime/rng.hpp"

namespace meshtrain::launch {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;
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

std::string reduce_summary(const StepMetrics& m);

// The progress line's communication part: this rank's wait and, with DP > 1, the reduction's
// least and most wait over the ranks (a wide spread is a straggler, not the network).
std::string comm_summary(const StepMetrics& m) {
  // Under PP: rank 0's (the first stage's) wait on its neighbour and its bubble share.
  const std::string pipe = std::isnan(m.pipe_wait_ms)
                               ? std::string()
                               : fmt::format(" | pipeline wait {:.1f} ms, compute {:.1f} ms",
                                             m.pipe_wait_ms, m.pipe_compute_ms);
  return pipe + reduce_summary(m);
}

std::string reduce_summary(const StepMetrics& m) {
  if (std::isnan(m.reduce_wait_min_ms))
    return fmt::format(" | comm wait {:.1f} ms, {:.0f}% hidden", m.comm_wait_ms,
                       100.0 * m.comm_hidden);
  return fmt::format(" | comm wait {:.1f} ms (ranks {:.1f}-{:.1f}), {:.0f}% hidden", m.comm_wait_ms,
                     m.reduce_wait_min_ms, m.reduce_wait_max_ms, 100.0 * m.comm_hidden);
}

// Drops the records after `step` (and a line torn by a kill) from metrics.jsonl, rewriting it
// atomically, so a kill leaves the old file or the new one. Returns the number dropped.
int drop_metrics_after(const std::string& path, int step) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return 0;  // no metrics yet (resumed into another run directory)
  std::string kept, line;
  int dropped = 0;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const Json r = Json::parse(line, nullptr, /*allow_exceptions=*/false);
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
  if (dropped > 0) write_file_atomic(path, kept);
  return dropped;
}

}  // namespace

RunLog::~RunLog() = default;

void RunLog::open(const TrainConfig& cfg, const std::string& resumed_from, int start_step) {
  if (!root_) return;
  write_file_atomic((fs::path(cfg.run_dir) / "config.toml").string(),
                    fmt::format("# effective configuration of this run (meshtrain {})\n{}",
                                MESHTRAIN_VERSION, to_toml(cfg)));
  const std::string path = (fs::path(cfg.run_dir) / "metrics.jsonl").string();
  if (!resumed_from.empty()) {
    if (const int dropped = drop_metrics_after(path, start_step); dropped > 0)
      log::info("{}: dropped {} record(s) after step {} (the steps this run redoes from {})", path,
                dropped, start_step, resumed_from);
  }
  metrics_ = open_file(path, O_WRONLY | O_CREAT | O_APPEND | (resumed_from.empty() ? O_TRUNC : 0));
  metrics_path_ = path;
  if (!resumed_from.empty())
    record(Json{{"step", start_step}, {"resumed_from", resumed_from}}.dump());
}

void RunLog::banner(const Banner& b, const TrainConfig& cfg, const std::string& resumed_from,
                    int start_step) {
  if (!verbose_) return;
  std::printf("meshtrain %s | model %s | %s | %s%s\n", MESHTRAIN_VERSION, b.model.c_str(),
              b.precision.c_str(), b.device.c_str(), b.layout.c_str());
  if (!b.comm.empty()) std::printf("communication: %s\n", b.comm.c_str());
  std::printf("data: %lld training tokens, %lld validation tokens%s\n",
              static_cast<long long>(b.train_tokens), static_cast<long long>(b.val_tokens),
              b.builtin_corpus ? " (built-in corpus: Debian's fortune cookies)" : "");
  std::printf("unigram entropy of the training data: %.4f nats per token (the loss to beat)\n",
              b.unigram_entropy);
  std::printf("measured bf16 matmul peak: %.1f GFLOP/s (the MFU denominator)\n",
              b.peak_flops / 1e9);
  std::printf("effective config (saved in %s/config.toml):\n%s\n", cfg.run_dir.c_str(),
              b.effective_config.c_str());
  if (!resumed_from.empty())
    std::printf("resuming from %s at step %d\n", resumed_from.c_str(), start_step);
  std::fflush(stdout);
}

void RunLog::record(const std::string& json_line) {
  if (!metrics_.valid()) return;  // ranks other than 0
  // One write(2) per record: no user-space buffer to lose, and a failure (ENOSPC, EIO) is seen
  // at the record that hit it.
  // A write that fails part-way (a disk filling up) is cut back, so the file never ends in a
  // torn line.
  const std::string line = json_line + '\n';
  const off_t end = ::lseek(metrics_.get(), 0, SEEK_END);
  try {
    write_all(metrics_.get(), metrics_path_, line.data(), line.size());
  } catch (const IoError&) {
    if (end >= 0 && ::ftruncate(metrics_.get(), end) != 0)
      log::warn("could not cut the torn last record of '{}'", metrics_path_);
    throw;
  }
}

void RunLog::step(const StepMetrics& m, int log_every, bool comm) {
  record(Json{{"step", m.step},
              {"loss", m.loss},
              {"lr", m.lr},
              {"grad_norm", m.grad_norm},
              {"ms", m.step_ms},
              {"tokens_per_s", m.tokens_per_s},
              {"mfu", m.mfu},
              {"skipped", m.skipped}}
             .dump());
  if (comm) {
    Json c{{"step", m.step},
           {"comm_wait_ms", m.comm_wait_ms},
           {"comm_hidden", m.comm_hidden},
           {"comm_ms", m.comm_ms},
           {"comm_clock", m.comm_device_timed ? "device" : "host"}};
    if (!std::isnan(m.pipe_wait_ms)) {
      c["pipe_wait_ms"] = m.pipe_wait_ms;
      c["pipe_compute_ms"] = m.pipe_compute_ms;
    }
    if (!std::isnan(m.reduce_wait_min_ms)) {
      c["reduce_wait_min_ms"] = m.reduce_wait_min_ms;
      c["reduce_wait_max_ms"] = m.reduce_wait_max_ms;
    }
    record(c.dump());
  }
  if (!verbose_ || !(m.step % log_every == 0 || m.step == m.total_steps || m.step == 1)) return;
  std::printf(
      "step %*d/%d | loss %.4f | lr %.2e | norm %.3f | %.1f ms | %.0f tok/s | MFU %.1f%% | ETA "
      "%s%s%s\n",
      static_cast<int>(std::to_string(m.total_steps).size()), m.step, m.total_steps, m.loss, m.lr,
      m.grad_norm, m.step_ms, m.tokens_per_s, 100.0 * m.mfu, format_duration(m.eta_s).c_str(),
      comm ? comm_summary(m).c_str() : "", m.skipped ? " | SKIPPED" : "");
  std::fflush(stdout);
}

void RunLog::eval(int step, float val_loss, bool final, double bits_per_byte) {
  Json j{{"step", step}, {"val_loss", val_loss}};
  const bool bpb = std::isfinite(bits_per_byte);
  if (bpb) j["val_bits_per_byte"] = bits_per_byte;
  record(j.dump());
  if (!verbose_) return;
  const std::string extra = bpb ? fmt::format(" ({:.3f} bits per byte)", bits_per_byte) : "";
  if (final)
    std::printf("final validation loss %.4f%s\n", val_loss, extra.c_str());
  else
    std::printf("step %d | validation loss %.4f%s\n", step, val_loss, extra.c_str());
}

void RunLog::sample(int step, const std::string& text) {
  record(
      Json{{"step", step}, {"sample", text}}.dump(-1, ' ', false, Json::error_handler_t::replace));
  if (verbose_) std::printf("---- sample at step %d ----\n%s\n----\n", step, text.c_str());
}

void RunLog::checkpoint(int step, const std::string& dir, double ms) {
  record(Json{{"step", step}, {"checkpoint", dir}, {"checkpoint_ms", ms}}.dump());
  if (!verbose_) return;
  std::printf("step %d | checkpoint %s (%.0f ms)\n", step, dir.c_str(), ms);
  std::fflush(stdout);
}

void RunLog::rollback(int failed_at, int to, const std::string& dir, int data_skip) {
  record(Json{
      {"step", failed_at}, {"rollback_to", to}, {"checkpoint", dir}, {"data_skip_steps", data_skip}}
             .dump());
}

void RunLog::stopped(int step, const std::string& signal, const std::string& dir) {
  record(Json{
      {"step", step}, {"stopped", signal}, {"checkpoint", dir.empty() ? Json(nullptr) : Json(dir)}}
             .dump());
}

void RunLog::memory(int step, const MemoryReport& m) {
  const double rss_mine = m.peak_rss_mib.empty() ? 0.0 : m.peak_rss_mib.front();
  const double rss_max = m.peak_rss_mib.empty()
                             ? 0.0
                             : *std::max_element(m.peak_rss_mib.begin(), m.peak_rss_mib.end());
  record(Json{{"step", step},
              {"memory",
               {{"param_bytes", m.params},
                {"grad_bytes", m.grads},
                {"master_bytes", m.master},
                {"adam_bytes", m.adam},
                {"zero_buffer_bytes", m.zero_buffers},
                {"activation_bytes", m.activations},
                {"peak_rss_mib_rank0", rss_mine},
                {"peak_rss_mib_max", rss_max}}},
              {"peak_rss_mib", m.peak_rss_mib},
              {"threads_by_rank", m.threads}}
             .dump());
  if (!verbose_) return;
  std::printf(
      "memory per rank: parameters %.2f MiB, gradients %.2f MiB, master %.2f MiB, "
      "AdamW %.2f MiB, activations %.2f MiB; peak RSS %.1f MiB (largest rank)\n",
      m.params / 1048576.0, m.grads / 1048576.0, m.master / 1048576.0, m.adam / 1048576.0,
      m.activations / 1048576.0, rss_max);
}

void create_run_dir(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec)
    throw IoError(fmt::format("cannot create run directory '{}': {} (errno {})", dir, ec.message(),
                              ec.value()));
  MT_CHECK(fs::is_directory(dir, ec), "run.dir '{}' exists and is not a directory", dir);
}

std::vector<double> gather_peak_rss_mib(comm::Communicator* world) {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return gather_per_rank(world, static_cast<float>(ru.ru_maxrss) / 1024.0f);  // ru_maxrss: KiB
}

std::vector<double> gather_per_rank(comm::Communicator* world, float mine) {
  const int n = world != nullptr ? world->size() : 1;
  Tensor all = Tensor::zeros(Shape{n}, DType::kF32);
  if (n > 1) {
    world->all_gather(Tensor::from_floats({mine}, Shape{1}, DType::kF32), all).wait();
  } else {
    all.data_as<float>()[0] = mine;
  }
  std::vector<double> out;
  for (int i = 0; i < n; ++i) out.push_back(all.data_as<float>()[i]);
  return out;
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

}  // namespace meshtrain::launch
