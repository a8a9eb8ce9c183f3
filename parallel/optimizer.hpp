// DistributedAdamW: the optimizer of a model trained across a DP x TP mesh. It owns everything
// an update needs beyond the model's own buffers: the fp32 master weights, the AdamW moments m
// and v, and under ZeRO-1 only this rank's shard of each; and it does every step between the
// gradient reduction and the next forward: the global gradient norm, clipping, the update, the
// 16-bit cast of the parameters and, under ZeRO-1, their all-gather.
//
//   parallel::DistributedAdamW opt(model.params(), model.flat_params(), model.flat_grads(),
//                                  weights, options, mesh, zero_reducer);
//   ... forward, backward, reducer.finish() ...
//   const parallel::GradNorm norm = opt.grad_norm(loss_scale);
//   if (std::isfinite(norm.norm)) opt.step(lr, t, norm.norm, loss_scale);
//
// Master weights: under the fp32 policy the model's parameters are the master weights (updated
// in place); under bf16 and fp16 the optimizer holds them in fp32 and writes the parameters as
// their rounding after every update. ZeRO-1 (a GradReducer with shard = true): this rank updates
// only the flat runs it owns (GradReducer::shard_runs()), from its shard of the averaged
// gradients, with m, v and (16-bit) master weights held for those runs alone; then every rank's
// parameters are all-gathered.
//
// The gradient norm is the global one on every rank, each element counted once: split
// parameters on every TP rank (each holds other elements), replicated ones on TP rank 0 only
// (norm_squared_share), ZeRO-1 shards summed over DP, pipeline stages summed over PP (a tied
// copy of a parameter another stage holds is not counted). The shares are summed in fp64 on a rank
// and cross ranks as fp32.
//
// The update runs ops::adamw_update over this rank's runs, one call per parameter (each has its
// own weight decay), in flat order, so that the arithmetic is the same whatever the layout:
// ZeRO-1 updates every element with the same operations as the replicated optimizer.
//
// Collective: grad_norm(), step() under ZeRO-1, gather_master() and load_checkpoint() under
// TP or ZeRO-1 are called by every rank of the mesh in the same order. Thread-safety: one thread.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "parallel/checkpoint.hpp"
#include "parallel/flat_layout.hpp"
#include "parallel/grad_reducer.hpp"
#include "parallel/mesh.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain::parallel {

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0;  // decoupled, on the parameters whose slot says decay
  double grad_clip = 0;     // the global gradient norm is clipped to this; 0: no clipping
};

struct GradNorm {
  // The global norm of the gradient (divided by the loss scale), before clipping. Non-finite
  // when any gradient element is.
  double norm = 0;
  // Milliseconds this rank spent on it under ZeRO-1, where it waits for the other DP ranks'
  // shares (part of the step's communication wait); 0 otherwise.
  double wait_ms = 0;
};

class DistributedAdamW {
 public:
  // layout: the model's parameters in its flat buffers (tiling them). params: the model's
  // compute parameters, the whole flat buffer (fp32, bf16 or fp16). grads: its fp32 flat
  // gradients, averaged over DP (read when not sharded). weights: fp32, the whole flat master
  // weights to start from, on any device; the parameters are written from them, and the
  // optimizer keeps the tensor as its master copy where it holds a whole one. mesh: its host
  // groups sum the norm's shares (and its TP rank picks the replicated parameters this rank
  // counts). zero: the ZeRO-1 reducer (shard = true) whose shard this rank updates, or null.
  // The buffers, the mesh and the reducer must outlive the optimizer.
  DistributedAdamW(std::span<const ParamSlot> layout, Tensor params, Tensor grads, Tensor weights,
                   const AdamWOptions& options, Mesh& mesh, GradReducer* zero = nullptr);

  // The global gradient norm (see the top). Collective over the mesh under TP or ZeRO-1.
  GradNorm grad_norm(float loss_scale);
  // One AdamW update of this rank's elements with learning rate lr and bias-correction step t
  // (1-based: the updates applied so far, this one included), the gradient multiplied by
  // clip / loss_scale where clip brings grad_norm down to options.grad_clip. Then the 16-bit
  // parameters are the rounding of the master weights; under ZeRO-1 every rank's are
  // all-gathered (collective over DP). Returns the milliseconds that all-gather took (0 when
  // not sharded).
  double step(double lr, int t, double grad_norm, float loss_scale);

  // Whether this rank holds the whole fp32 master weights (always, but for ZeRO-1 under a
  // 16-bit policy, where it holds its shard).
  bool holds_whole_master() const { return !sharded_master_; }
  // The whole master weights (the parameters themselves under fp32). Throws under ZeRO-1 with
  // a 16-bit policy, where only gather_master() gives them.
  const Tensor& master() const;
  // The whole master weights on every rank: master(), or under ZeRO-1 with a 16-bit policy
  // every rank's shard all-gathered into a new tensor (collective over DP).
  Tensor gather_master();

  // Elements of m (and of v) this rank holds: every parameter's, or its ZeRO-1 shard's.
  std::int64_t state_numel() const { return m_.numel(); }
  // Bytes of fp32 master weights held apart from the parameters (0 under fp32), and of m and v.
  std::int64_t master_bytes() const;
  std::int64_t moment_bytes() const;

  // Checkpoints (parallel/checkpoint.hpp). The state this rank holds ("master", "adam_m",
  // "adam_v"), and the flat runs it writes: under ZeRO-1 those it owns, else none (the default
  // split over DP).
  std::vector<FlatState> checkpoint_state() const;
  std::vector<FlatRun> checkpoint_writes() const;
  // Loads the master weights and moments of a checkpoint saved under any layout, then writes
  // the parameters from the master weights: read_checkpoint, then finish_load.
  void load_checkpoint(const std::string& dir);
  // The two halves of a load, so that the ranks can agree that every read succeeded before the
  // collective half. read_checkpoint: this rank's master weights (or their ZeRO-1 shard) and
  // moments, read and checked block by block straight into the optimizer's buffers (on a GPU,
  // through host buffers of the same size, freed after), so that a resume peaks no higher than
  // a fresh run; no communication. The manifest, the tensors' shapes and the load plan are
  // checked before any byte is written; a block that fails its checksum throws with the state
  // partly loaded, and then the optimizer must not step until a load succeeds.
  // finish_load: the 16-bit parameters from the master weights; under ZeRO-1 with a 16-bit
  // policy each rank writes the runs it owns and they are all-gathered (collective over DP).
  void read_checkpoint(const std::string& dir);
  void finish_load();

 private:
  // Writes the master weights (whole, or this rank's runs) and the parameters from `weights`
  // (fp32, whole, any device).
  void set_weights(const Tensor& weights);

  std::vector<ParamSlot> layout_;
  std::int64_t numel_ = 0;
  Tensor params_, grads_;
  AdamWOptions options_;
  Mesh* mesh_;
  GradReducer* zero_;
  // The flat runs this rank updates: everything ({0, 0, n}), or its ZeRO-1 shard's runs, whose
  // gradients, m and v (and, when sharded_master_, master weights) sit at run.local.
  std::vector<FlatRun> owned_;
  bool separate_master_ = false;  // 16-bit parameters: the master weights are fp32 apart
  bool sharded_master_ = false;   // and, under ZeRO-1, only this rank's runs of them
  Tensor master_;                 // whole (indexed by flat), or the shard (by run.local)
  Tensor m_, v_;
};

}  // namespace meshtrain::parallel
