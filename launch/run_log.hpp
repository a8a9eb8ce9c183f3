// The run directory as a job writes it, and what it prints: RUN_DIR/config.toml (the effective
// config), RUN_DIR/metrics.jsonl (one JSON object per line: steps, communication, evaluations,
// samples, checkpoints, rollbacks, the memory report), the start-up banner and the progress
// line. World rank 0 alone writes and prints; on the other ranks a RunLog does nothing.
//
// metrics.jsonl records, each with "step": {loss, lr, grad_norm, ms, tokens_per_s, mfu,
// skipped}; {comm_wait_ms, comm_hidden, comm_ms, comm_clock[, reduce_wait_min_ms,
// reduce_wait_max_ms]} with DP or TP; {val_loss}; {sample}; {checkpoint, checkpoint_ms};
// {rollback_to, checkpoint, data_skip_steps}; {resumed_from}; {stopped (the signal), checkpoint
// (null: none)}; {memory, peak_rss_mib, threads_by_rank} at the end.
// To add a metric: a field of StepMetrics (launch/metrics.hpp), filled in Trainer::step, and
// written in RunLog::step.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "launch/config.hpp"
#include "launch/metrics.hpp"
#include "runtime/device.hpp"
#include "runtime/file_io.hpp"

namespace meshtrain::launch {

// What the start-up banner says.
struct Banner {
  std::string model, precision;
  std::string device;  // the GPU's name, or "N thread(s)"
  std::string layout;  // " per rank | N ranks: DP d x TP t", or "" for one process
  std::string comm;    // launch/backends.hpp's DeviceComms::summary
  std::int64_t train_tokens = 0, val_tokens = 0;
  bool builtin_corpus = false;
  double unigram_entropy = 0, peak_flops = 0;
  std::string effective_config;
};

// What one rank holds for training, in bytes, and every rank's peak resident set size.
struct MemoryReport {
  std::int64_t params = 0, grads = 0, master = 0, adam = 0, zero_buffers = 0, activations = 0;
  std::vector<double> peak_rss_mib;  // by world rank
  std::vector<int> threads;          // CPU threads of every rank, by world rank
};

class RunLog {
 public:
  // root: this rank writes the run directory and prints (verbose by default).
  explicit RunLog(bool root = false) : root_(root), verbose_(root) {}
  ~RunLog();
  RunLog(const RunLog&) = delete;
  RunLog& operator=(const RunLog&) = delete;

  void set_verbose(bool v) { verbose_ = v && root_; }
  bool verbose() const { return verbose_; }

  // Writes RUN_DIR/config.toml (durably: a temporary renamed over it) and opens
  // RUN_DIR/metrics.jsonl: a fresh run starts it anew; a run resumed from a checkpoint at
  // start_step continues it, dropping the records after start_step (the steps it redoes) and a
  // line torn by a kill, so that it holds one history. Every record is one checked write(2):
  // a failed write (a full disk, a read-only file system) throws IoError naming the file and
  // the errno text, and the run stops there rather than losing its metrics silently.
  void open(const TrainConfig& cfg, const std::string& resumed_from, int start_step);
  void banner(const Banner& b, const TrainConfig& cfg, const std::string& resumed_from,
              int start_step);

  // A step's records, and its progress line every log_every steps (and the first and last).
  void step(const StepMetrics& m, int log_every, bool comm);
  // bits_per_byte: EvalMetrics::val_bits_per_byte (written when finite).
  void eval(int step, float val_loss, bool final, double bits_per_byte);
  void sample(int step, const std::string& text);
  void checkpoint(int step, const std::string& dir, double ms);
  void rollback(int failed_at, int to, const std::string& dir, int data_skip);
  // The run stopped early after `step` on `signal` ("SIGTERM"); dir: its checkpoint, or "".
  void stopped(int step, const std::string& signal, const std::string& dir);
  void memory(int step, const MemoryReport& m);

 private:
  void record(const std::string& json_line);

  bool root_, verbose_;
  std::string metrics_path_;
  Fd metrics_;  // O_APPEND: each record lands whole at the end
};

// Creates the run directory (and its parents). Throws IoError naming it.
void create_run_dir(const std::string& dir);
// The peak resident set size of every rank, in MiB, by world rank. Collective over `world`
// (null: this process alone).
std::vector<double> gather_peak_rss_mib(comm::Communicator* world);
// One number from every rank, by world rank. Collective over `world` (null: this process alone).
std::vector<double> gather_per_rank(comm::Communicator* world, float mine);
// Measures this process's bf16 matmul rate in FLOP/s (a few 1024^3 products): the denominator
// of MFU.
double measure_bf16_matmul_peak(Device& device = cpu_device());

}  // namespace meshtrain::launch
