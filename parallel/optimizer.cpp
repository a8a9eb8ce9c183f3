#include "parallel/optimizer.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "parallel/tensor_parallel.hpp"
#include "runtime/error.hpp"
#include "runtime/ops.hpp"

namespace meshtrain::parallel {
namespace {
using Clock = std::chrono::steady_clock;
}  // namespace

DistributedAdamW::DistributedAdamW(std::span<const ParamSlot> layout, Tensor params, Tensor grads,
                                   Tensor weights, const AdamWOptions& options, Mesh& mesh,
                                   GradReducer* zero)
    : layout_(layout.begin(), layout.end()),
      numel_(flat_numel(layout, "DistributedAdamW")),
      params_(std::move(params)),
      grads_(std::move(grads)),
      options_(options),
      mesh_(&mesh),
      zero_(zero) {
  MT_CHECK(params_.defined() && is_floating(params_.dtype()) && params_.numel() == numel_,
           "DistributedAdamW: the parameters must be one float buffer of the layout's {} "
           "elements, got {}",
           numel_, params_.defined() ? params_.str() : std::string("(none)"));
  MT_CHECK(grads_.defined() && grads_.dtype() == DType::kF32 && grads_.numel() == numel_,
           "DistributedAdamW: the gradients must be one fp32 buffer of {} elements, got {}", numel_,
           grads_.defined() ? grads_.str() : std::string("(none)"));
  MT_CHECK(weights.defined() && weights.dtype() == DType::kF32 && weights.numel() == numel_,
           "DistributedAdamW: the initial weights must be fp32 with {} elements, got {}", numel_,
           weights.defined() ? weights.str() : std::string("(none)"));
  MT_CHECK(zero_ == nullptr || zero_->options().shard,
           "DistributedAdamW: ZeRO-1 needs a GradReducer with shard = true");
  Device& device = params_.device();
  separate_master_ = params_.dtype() != DType::kF32;
  sharded_master_ = zero_ != nullptr && separate_master_;
  std::int64_t state = numel_;
  if (zero_ != nullptr) {
    owned_ = zero_->shard_runs();
    state = zero_->shard_numel();
  } else {
    owned_ = {FlatRun{0, 0, numel_}};
  }
  if (!separate_master_) {
    master_ = params_;  // fp32: the parameters are the master weights
  } else if (sharded_master_) {
    master_ = Tensor::zeros(Shape{state}, DType::kF32, device);
  } else if (&weights.device() == &device) {
    master_ = weights;  // held as it is: no second whole copy
  } else {
    master_ = Tensor::zeros(Shape{numel_}, DType::kF32, device);
  }
  set_weights(weights);
  m_ = Tensor::zeros(Shape{state}, DType::kF32, device);
  v_ = Tensor::zeros(Shape{state}, DType::kF32, device);
}

void DistributedAdamW::set_weights(const Tensor& weights) {
  if (sharded_master_) {
    for (const FlatRun& r : owned_)
      master_.slice(r.local, r.length).copy_from(weights.slice(r.flat, r.length));
  } else if (master_.data() != weights.data()) {
    master_.copy_from(weights);
  }
  // The 16-bit parameters: the master weights' rounding, as step() writes them.
  if (separate_master_) params_.copy_from(sharded_master_ ? weights : master_);
}

GradNorm DistributedAdamW::grad_norm(float loss_scale) {
  const auto t0 = Clock::now();
  const Tensor& grads = zero_ != nullptr ? zero_->shard_grads() : grads_;
  double share = 0;
  for (const FlatRun& r : owned_)
    share += norm_squared_share(grads.slice(r.local, r.length), r.flat, layout_, mesh_->tp_rank(),
                                mesh_->tp_size());
  GradNorm out;
  if (zero_ != nullptr || mesh_->tp_size() > 1 || mesh_->pp_size() > 1) {
    // The shares of the other DP ranks (ZeRO-1: the padding is zero) and TP ranks.
    Tensor sq = Tensor::from_floats({static_cast<float>(share)}, Shape{1}, DType::kF32);
    if (zero_ != nullptr && mesh_->dp().valid())
      mesh_->dp().allreduce(sq, comm::ReduceOp::kSum).wait();
    TPGroup(mesh_->tp()).allreduce(sq);
    // Each pipeline stage holds other parameters (a tied copy is not counted).
    if (mesh_->pp_size() > 1) mesh_->pp().allreduce(sq, comm::ReduceOp::kSum).wait();
    share = static_cast<double>(sq.data_as<float>()[0]);
    if (zero_ != nullptr)
      out.wait_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  }
  out.norm = std::sqrt(share) / loss_scale;
  return out;
}

double DistributedAdamW::step(double lr, int t, double grad_norm, float loss_scale) {
  float clip = 1.0f;
  if (options_.grad_clip > 0 && grad_norm > options_.grad_clip)
    clip = static_cast<float>(options_.grad_clip / (grad_norm + 1e-6));
  ops::AdamWParams p;
  p.lr = static_cast<float>(lr);
  p.beta1 = static_cast<float>(options_.beta1);
  p.beta2 = static_cast<float>(options_.beta2);
  p.eps = static_cast<float>(options_.eps);
  p.step = t;
  p.grad_scale = clip / loss_scale;
  const Tensor& grads = zero_ != nullptr ? zero_->shard_grads() : grads_;
  for (const FlatRun& r : owned_) {
    for (const ParamSlot& s : layout_) {
      const std::int64_t lo = std::max(s.offset, r.flat);
      const std::int64_t hi = std::min(s.offset + s.numel(), r.flat + r.length);
      if (hi <= lo) continue;
      const std::int64_t at = r.local + (lo - r.flat), n = hi - lo;
      p.weight_decay = s.decay ? static_cast<float>(options_.weight_decay) : 0.0f;
      Tensor param = separate_master_ ? params_.slice(lo, n) : Tensor();
      Tensor master = master_.slice(sharded_master_ ? at : lo, n);
      Tensor m = m_.slice(at, n), v = v_.slice(at, n);
      ops::adamw_update(param, master, grads.slice(at, n), m, v, p);
    }
  }
  // Every rank wrote the parameters it owns in place: gather the others'.
  if (zero_ != nullptr) return zero_->all_gather_shards(Tensor(), params_);
  return 0;
}

const Tensor& DistributedAdamW::master() const {
  MT_CHECK(!sharded_master_,
           "DistributedAdamW::master(): under ZeRO-1 this rank holds only its shard of the "
           "master weights; gather_master() assembles them");
  return master_;
}

Tensor DistributedAdamW::gather_master() {
  if (!sharded_master_) return master_;
  Tensor whole = Tensor::zeros(Shape{numel_}, DType::kF32, master_.device());
  zero_->all_gather_shards(master_, whole);
  return whole;
}

std::int64_t DistributedAdamW::master_bytes() const {
  return separate_master_ ? static_cast<std::int64_t>(master_.nbytes()) : 0;
}

std::int64_t DistributedAdamW::moment_bytes() const {
  return static_cast<std::int64_t>(m_.nbytes() + v_.nbytes());
}

std::vector<FlatState> DistributedAdamW::checkpoint_state() const {
  // Under ZeRO-1 every element is written by its owner, from the runs it holds.
  const std::vector<FlatRun> runs = zero_ != nullptr ? owned_ : std::vector<FlatRun>{};
  return {FlatState{"master", master_, sharded_master_ ? runs : std::vector<FlatRun>{}},
          FlatState{"adam_m", m_, runs}, FlatState{"adam_v", v_, runs}};
}

std::vector<FlatRun> DistributedAdamW::checkpoint_writes() const {
  return zero_ != nullptr ? owned_ : std::vector<FlatRun>{};
}

void DistributedAdamW::load_checkpoint(const std::string& dir) {
  read_checkpoint(dir);
  finish_load();
}

void DistributedAdamW::read_checkpoint(const std::string& dir) {
  // Straight into the buffers this rank holds: the master weights (the fp32 parameters
  // themselves under fp32; under ZeRO-1 with a 16-bit policy only this rank's runs), and m and v
  // where this rank updates. A resume then needs no memory beyond a fresh run's.
  const std::vector<FlatRun> runs = zero_ != nullptr ? owned_ : std::vector<FlatRun>{};
  const std::vector<FlatRun> master_runs = sharded_master_ ? runs : std::vector<FlatRun>{};
  if (master_.is_cpu()) {
    parallel::load_checkpoint(
        dir, layout_,
        {{"master", master_, master_runs}, {"adam_m", m_, runs}, {"adam_v", v_, runs}},
        mesh_->tp_rank(), mesh_->tp_size(), mesh_->pp_size() > 1);
    return;
  }
  // On a GPU, through host buffers of the same sizes, given back to the system afterwards.
  {
    Tensor master = Tensor::empty(master_.shape(), DType::kF32);
    Tensor m = Tensor::empty(m_.shape(), DType::kF32), v = Tensor::empty(v_.shape(), DType::kF32);
    parallel::load_checkpoint(
        dir, layout_, {{"master", master, master_runs}, {"adam_m", m, runs}, {"adam_v", v, runs}},
        mesh_->tp_rank(), mesh_->tp_size(), mesh_->pp_size() > 1);
    master_.copy_from(master);
    m_.copy_from(m);
    v_.copy_from(v);
    master_.device().synchronize();
  }
  cpu_device().empty_cache();
}

void DistributedAdamW::finish_load() {
  if (!separate_master_) return;  // fp32: the parameters are the master weights, loaded
  if (!sharded_master_) {
    params_.copy_from(master_);
    return;
  }
  // Each rank rounds the runs it owns, as step() does, and the parameters are all-gathered.
  for (const FlatRun& r : owned_)
    params_.slice(r.flat, r.length).copy_from(master_.slice(r.local, r.length));
  zero_->all_gather_shards(Tensor(), params_);
}

}  // namespace meshtrain::parallel
