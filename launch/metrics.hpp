// What a training run reports: per optimizer step, per evaluation, and at the end.
#pragma once

#include <limits>
#include <string>
#include <vector>

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
  // Pipeline parallelism (NaN without it): milliseconds this rank waited on its neighbour stages
  // (receives before a compute that needs them, sends before their buffer is reused), and its
  // forward and backward compute time, in the step's schedule; the rest of the phase is bubble.
  double pipe_wait_ms = std::numeric_limits<double>::quiet_NaN();
  double pipe_compute_ms = std::numeric_limits<double>::quiet_NaN();
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
  // val_loss in bits per byte of text (val_loss / ln 2 / bytes per token), comparable across
  // tokenizers and the byte vocabulary; NaN when the data's bytes per token are unknown (token
  // shards). Bytes per token: the training text's, as tokenized (separators count as tokens).
  double val_bits_per_byte = std::numeric_limits<double>::quiet_NaN();
};

struct TrainResult {
  int steps = 0;
  float first_loss = 0;
  float final_loss = 0;      // mean over the last 10 steps
  float final_val_loss = 0;  // NaN without validation data
  double final_val_bits_per_byte = std::numeric_limits<double>::quiet_NaN();
  int skipped_steps = 0;
  double tokens_per_s = 0;     // mean over the run, excluding the first step
  double unigram_entropy = 0;  // of the training data, in nats: the loss to beat
  std::string sample;          // text generated at the end
  // Peak resident memory of every rank (getrusage), in MiB, by world rank.
  std::vector<double> peak_rss_mib;
  // A run stopped early by a signal (launch/preemption.hpp): the signal (0: it ran to
  // train.steps; steps then counts the steps done) and the checkpoint of its last step ("" when
  // none was written).
  int stop_signal = 0;
  std::string stop_checkpoint;
};

}  // namespace meshtrain::launch
