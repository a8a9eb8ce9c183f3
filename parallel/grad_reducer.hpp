// GradReducer: data-parallel gradient averaging, overlapped with backward; optionally sharded
// (ZeRO-1) and optionally reduced in bf16.
//
// The fp32 gradients stay in the model's flat buffer; the reducer cuts it into buckets in
// reverse parameter order (the order backward finishes them): a small first bucket so that
// communication starts early, then buckets of about `bucket_bytes`. The model's backward reports
// each flat range as its gradients become final (grads_ready); once every element of a bucket is
// final, the bucket's asynchronous reduction (average over the DP group) starts. Buckets are
// posted in the same order on every rank because every rank runs the same backward over the same
// layout.
//
// Plain DP (shard = false): each bucket is allreduced in place; buckets are cut at parameter
// boundaries. ZeRO-1 (shard = true): each bucket is reduce-scattered, and rank r keeps the r-th
// of dp equal chunks of every bucket (as Megatron-LM's distributed optimizer does): buckets are
// cut at multiples of dp elements, so only the first bucket (the one holding the end of the
// buffer) may need padding, through a small staging buffer. shard_runs() says which flat
// elements this rank owns and where they sit in its shard; all_gather_shards() rebuilds a whole
// flat buffer (the 16-bit parameters after the optimizer, or the fp32 master weights) from every
// rank's shard.
//
// bf16 reduction (reduce_dtype = kBF16): a bucket is converted to bf16 when posted, reduced in
// bf16 on the wire (summed in fp32 at every step, comm/mpi.hpp), and widened back when it
// completes: half the bytes, with bf16 rounding of the averaged gradients.
//
// Progress: the MPI backend's progress thread advances the buckets while backward computes
// (comm/mpi/progress.hpp); every grads_ready call also tests the buckets in flight, which is all
// the progress there is when that thread is off (MESHTRAIN_COMM_PROGRESS=caller).
//
// Timing (ReducerStats), from the moments the backend saw each bucket complete
// (comm::Work::completed_at; the progress thread records them as they happen): buckets travel
// one after another, so bucket b occupies the link from max(its post, bucket b-1's completion)
// to its completion. comm_ms sums these busy intervals; hidden is the share of them that lay
// before finish() was called, i.e. behind backward; wait_ms is what finish() blocked. With
// overlap off every bucket is posted in finish(): hidden is 0 and wait_ms the whole cost.
// (A span such as "first post to last completion" would count idle link time as hidden.)
//
// On a device timeline (the NCCL backend: Communicator::mark_compute is not null) the host
// clock says nothing useful: the host queues backward long before the GPU runs it. There the
// same three figures come from CUDA timing events: a mark on the compute stream when the step's
// backward starts (begin_step) and when it has all been queued (finish), and each bucket's
// start and end on the communication stream. comm_ms sums the buckets' device spans (they run
// one after another on one stream), hidden is the share of them before the end of backward on
// the device, and wait_ms is how long after the end of backward the last bucket ended: the
// exposed communication the compute stream waits for.

// Gradient accumulation: begin_step(communicate = false) for every micro-step but the last;
// such steps only accumulate locally. finish() waits for every bucket (posting any that were
// never completed by hooks, e.g. with overlap off) before the norm and the optimizer read them.
//
// Thread-safety: one thread (the one running backward). The reducer holds views of the flat
// gradient buffer and a reference to the DP communicator; both must outlive it.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "comm/communicator.hpp"
#include "parallel/flat_layout.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain::parallel {

// The bucket size for `grad_bytes` of fp32 gradients when none is given (dp.bucket_mb = 0): an
// eighth of them, at least 1 MiB and at most 25 MiB (PyTorch DDP's fixed size). What stays
// exposed after backward is the bucket holding the first layer and the embeddings, final only
// when backward ends: with a fixed 25 MiB it is most of a small model (gpt-small's 43 MB of
// gradients made three buckets, the last 17 MB), so only a large model overlapped well. Over a
// 10 Gbit/s link, on a quiet machine, gpt-small left 2.4 ms of a 41.5 ms reduction exposed with
// the automatic 5.2 MiB (0.9 ms at 4 MiB) against 13.4 ms with 25 MiB; on shared memory both
// scaled 1 -> 2 ranks at 94% (bench/results/dp.md). Large models keep 25 MiB.
std::int64_t auto_bucket_bytes(std::int64_t grad_bytes);

struct ReducerOptions {
  std::int64_t bucket_bytes = 25LL << 20;       // about 25 MB per bucket (as PyTorch DDP)
  std::int64_t first_bucket_bytes = 1LL << 20;  // the first (last-layer) bucket is small
  // Off: nothing is posted during backward; finish() reduces every bucket (the baseline that
  // overlap is measured against).
  bool overlap = true;
  // kF32 or kBF16: the dtype gradients travel and are summed in (bf16: summed in fp32 per step).
  DType reduce_dtype = DType::kF32;
  // ZeRO-1: reduce-scatter into this rank's shard instead of allreducing every gradient.
  bool shard = false;
};

// What one optimizer step's reduction cost, in milliseconds.
struct ReducerStats {
  double wait_ms = 0;  // finish() blocked on communication (exposed time)
  double comm_ms = 0;  // the buckets' summed busy time (see above)
  double hidden = 0;   // share of comm_ms that ran before finish(), behind backward
  int buckets = 0;
  bool device_timed = false;  // measured on the device timeline (see above)
};

class GradReducer {
 public:
  // `grads`: the flat fp32 gradient buffer; `params`: the parameters' layout in it (tiling it,
  // in order). Buckets are cut at parameter boundaries (without sharding). `dp` may have size 1.
  GradReducer(comm::Communicator& dp, Tensor grads, std::span<const ParamSlot> params,
              ReducerOptions options = {});

  // Starts one micro-step's backward. communicate = false: hooks only accumulate (earlier
  // micro-steps of gradient accumulation).
  void begin_step(bool communicate);
  // Flat elements [begin, end) of the gradients are final for this step: starts every bucket
  // that became complete, then tests the buckets in flight.
  void grads_ready(std::int64_t begin, std::int64_t end);
  // Posts what is left, waits for every bucket (CommTimeout on a peer that never arrives) and
  // returns the step's statistics. A no-op after a non-communicating step. Afterwards the
  // averaged gradients are in the flat buffer (plain DP) or in shard_grads() (ZeRO-1).
  ReducerStats finish();

  // Bucket i covers flat elements [first, second); bucket 0 holds the last parameters.
  const std::vector<std::pair<std::int64_t, std::int64_t>>& buckets() const { return buckets_; }
  const ReducerOptions& options() const { return options_; }

  // Sharding only. Elements in this rank's shard (the same on every rank: padding included).
  std::int64_t shard_numel() const { return shard_numel_; }
  // The flat elements this rank owns: run.local is where they sit in the shard, in increasing
  // order.
  const std::vector<FlatRun>& shard_runs() const { return runs_; }
  // This rank's averaged fp32 gradients after finish(), shard_numel() elements (padding zero).
  const Tensor& shard_grads() const { return grad_shard_; }
  // Collective over the DP group: `flat` (numel = the gradient buffer's, any dtype) receives
  // every rank's owned runs, each read from `shard` (shard_numel() elements, same dtype) on its
  // owner. `shard` may be undefined when flat already holds this rank's runs (in place).
  // Blocks until done. Returns the milliseconds it communicated: the device span of the
  // all-gathers on a device timeline, else the host time blocked.
  double all_gather_shards(const Tensor& shard, Tensor& flat);

 private:
  using Clock = std::chrono::steady_clock;
  void post(std::size_t b);
  void complete(std::size_t b);
  void poll();
  std::int64_t chunk(std::size_t b) const;  // sharding: elements of bucket b per rank

  comm::Communicator* dp_;
  Tensor grads_;
  ReducerOptions options_;
  std::vector<std::pair<std::int64_t, std::int64_t>> buckets_;
  std::vector<std::int64_t> ready_;  // final elements per bucket this step
  std::vector<comm::Work> works_;    // per bucket; defined once posted
  std::vector<bool> done_;
  std::size_t next_post_ = 0;  // buckets are posted strictly in order 0, 1, ...
  bool communicate_ = false;
  std::vector<Clock::time_point> posted_at_, done_at_;  // per bucket, this step
  // Device timeline (null for host backends): the compute stream when this step's backward
  // began.
  std::shared_ptr<comm::DeviceMark> origin_;
  // bf16 reduction: the staging copy of every bucket (sharded: padded buckets, then the
  // shard's chunks).
  Tensor wire_, wire_shard_;
  // Sharding.
  std::int64_t shard_numel_ = 0;
  std::vector<std::int64_t> shard_offset_;  // per bucket: where its chunk sits in the shard
  std::vector<FlatRun> runs_;
  Tensor grad_shard_;
  Tensor pad_;  // fp32 staging for the one bucket whose length is not a multiple of dp
};

}  // namespace meshtrain::parallel
