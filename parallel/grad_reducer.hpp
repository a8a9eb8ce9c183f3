// GradReducer: data-parallel gradient averaging, overlapped with backward.
//
// The fp32 gradients stay in the model's flat buffer; the reducer cuts it into buckets of whole
// parameters in reverse parameter order (the order backward finishes them): a small first
// bucket so that communication starts early, then buckets of about `bucket_bytes`. The model's
// backward reports each flat range as its gradients become final (grads_ready); once every
// element of a bucket is final, the bucket's asynchronous allreduce (average over the DP group)
// starts in place. Buckets are posted in the same order on every rank because every rank runs the
// same backward over the same layout.
//
// Progress: MPI's non-blocking collectives advance only inside MPI calls (comm/mpi has no
// progress thread), so every grads_ready call also tests the outstanding buckets: between two
// layers of backward the reduction moves on while the next layer computes.
//
// Gradient accumulation: begin_step(communicate = false) for every micro-step but the last;
// such steps only accumulate locally. finish() waits for every bucket (posting any that were
// never completed by hooks, e.g. with overlap off) before the norm and the optimizer read them.
//
// Thread-safety: one thread (the one running backward). The reducer holds views of the flat
// gradient buffer and a reference to the DP communicator; both must outlive it.
#pragma once

#include <chrono>
#include <cstdint>
#include <utility>
#include <vector>

#include "comm/communicator.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain::parallel {

struct ReducerOptions {
  std::int64_t bucket_bytes = 25LL << 20;       // about 25 MB per bucket (as PyTorch DDP)
  std::int64_t first_bucket_bytes = 1LL << 20;  // the first (last-layer) bucket is small
  // Off: nothing is posted during backward; finish() reduces every bucket (the baseline that
  // overlap is measured against).
  bool overlap = true;
};

// What one optimizer step's reduction cost, in milliseconds.
struct ReducerStats {
  double wait_ms = 0;  // finish() blocked on communication (exposed time)
  double comm_ms = 0;  // from the first bucket's post to the last bucket's completion
  double hidden = 0;   // share of comm_ms not spent waiting in finish(): 1 - wait / comm
  int buckets = 0;
};

class GradReducer {
 public:
  // `grads`: the flat fp32 gradient buffer; `params`: (offset, numel) of every parameter in the
  // flat buffer, in params() order (contiguous, increasing offsets). `dp` may have size 1.
  GradReducer(comm::Communicator& dp, Tensor grads,
              const std::vector<std::pair<std::int64_t, std::int64_t>>& params,
              ReducerOptions options = {});

  // Starts one micro-step's backward. communicate = false: hooks only accumulate (earlier
  // micro-steps of gradient accumulation).
  void begin_step(bool communicate);
  // Flat elements [begin, end) of the gradients are final for this step: starts every bucket
  // that became complete, then tests the buckets in flight (MPI progress).
  void grads_ready(std::int64_t begin, std::int64_t end);
  // Posts what is left, waits for every bucket (CommTimeout on a peer that never arrives) and
  // returns the step's statistics. A no-op after a non-communicating step.
  ReducerStats finish();

  // Bucket i covers flat elements [first, second); bucket 0 holds the last parameters.
  const std::vector<std::pair<std::int64_t, std::int64_t>>& buckets() const { return buckets_; }

 private:
  using Clock = std::chrono::steady_clock;
  void post(std::size_t b);
  void poll();

  comm::Communicator* dp_;
  Tensor grads_;
  ReducerOptions options_;
  std::vector<std::pair<std::int64_t, std::int64_t>> buckets_;
  std::vector<std::int64_t> ready_;  // final elements per bucket this step
  std::vector<comm::Work> works_;    // per bucket; defined once posted
  std::vector<bool> done_;
  std::size_t next_post_ = 0;  // buckets are posted strictly in order 0, 1, ...
  bool communicate_ = false;
  bool first_posted_ = false;
  Clock::time_point first_post_, last_done_;
};

}  // namespace meshtrain::parallel
