#include "launch/pipeline_driver.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

#include "launch/weights.hpp"
#include "runtime/error.hpp"

namespace meshtrain::launch {

int PipelineDriver::slots_for(parallel::PipeSchedule schedule, int stages, int stage,
                              int micro_batches) {
  return parallel::max_in_flight(parallel::build_schedule(schedule, stages, stage, micro_batches));
}

PipelineDriver::PipelineDriver(models::Decoder& model, parallel::Mesh& mesh,
                               comm::Communicator& p2p, parallel::GradReducer* reducer,
                               parallel::PipeSchedule schedule, int micro_batches, int batch,
                               int seq)
    : model_(&model),
      mesh_(&mesh),
      reducer_(reducer),
      actions_(parallel::build_schedule(schedule, mesh.pp_size(), mesh.pp_rank(), micro_batches)),
      micro_batches_(micro_batches),
      batch_(batch),
      seq_(seq),
      slots_(parallel::max_in_flight(actions_)),
      p2p_(&p2p),
      executor_(p2p, slots_) {
  for (int s = 0; s < slots_; ++s) {
    tokens_.push_back(Tensor::empty(Shape{batch, seq}, DType::kI32));
    targets_.push_back(Tensor::empty(Shape{batch, seq}, DType::kI32));
  }
  if (const int e = model.embedding_group_param(); e >= 0) {
    const models::ParamInfo& p = model.params()[static_cast<std::size_t>(e)];
    tied_ = {p.offset, p.offset + p.numel()};
  }
  model.set_grads_ready_hook([this](std::int64_t lo, std::int64_t hi) {
    // The tied embedding's gradient (the first stage's original, the last stage's copy) is
    // final only once the embedding group has summed it, after every stage has run its
    // schedule: the range that holds it waits.
    if (lo < tied_.second && tied_.first < hi) {
      held_ = {lo, hi};
      return;
    }
    if (reducer_ != nullptr) reducer_->grads_ready(lo, hi);
  });
}

Tensor PipelineDriver::stage_input(int slot) {
  return model_->stage_input(slot, batch_, seq_);
}

Tensor PipelineDriver::stage_output(int slot) {
  return model_->stage_output(slot);
}

void PipelineDriver::forward(int slot, int micro) {
  const auto s = static_cast<std::size_t>(slot);
  sampler_->batch(first_index_ + micro, dp_rank_, dp_size_, tokens_[s], targets_[s]);
  const float loss = model_->forward_micro(slot, tokens_[s], targets_[s]);
  if (model_->stage().head) loss_sum_ += loss;
}

void PipelineDriver::backward(int slot, int micro, const Tensor& output_grad) {
  // Only the last micro-batch's backward reduces: the earlier ones accumulate locally.
  if (reducer_ != nullptr) reducer_->begin_step(micro + 1 == micro_batches_);
  model_->backward_micro(slot, loss_multiplier_, output_grad);
}

Tensor PipelineDriver::input_grad() {
  return model_->input_grad();
}

PipeStepResult PipelineDriver::train_step(const data::Sampler& sampler, std::int64_t first_index,
                                          float loss_scale) {
  model_->zero_grads();
  sampler_ = &sampler;
  first_index_ = first_index;
  dp_rank_ = mesh_->dp_rank();
  dp_size_ = mesh_->dp_size();
  training_ = true;
  loss_multiplier_ = loss_scale / static_cast<float>(micro_batches_);
  loss_sum_ = 0;
  held_ = {0, 0};
  PipeStepResult r;
  r.stats = executor_.run(*this, actions_);
  // The tied embedding: the first stage's gradient and the last stage's copy's are summed, so
  // that both copies take the same update (an untied model's embedding group has nothing to
  // sum: both ends know it from the config). Every stage has posted all its sends by now.
  if (mesh_->embedding().valid() && tied_.second > tied_.first) {
    mesh_->embedding()
        .allreduce(model_->flat_grads().slice(tied_.first, tied_.second - tied_.first),
                   comm::ReduceOp::kSum)
        .wait();
  }
  if (reducer_ != nullptr && held_.second > held_.first)
    reducer_->grads_ready(held_.first, held_.second);
  // The loss lives on the last stage: summed over PP (the others add 0).
  Tensor loss = Tensor::from_floats(
      {model_->stage().head ? static_cast<float>(loss_sum_ / micro_batches_) : 0.0f}, Shape{1},
      DType::kF32);
  mesh_->pp().allreduce(loss, comm::ReduceOp::kSum).wait();
  r.loss = loss.data_as<float>()[0];
  training_ = false;
  last_ = r.stats;
  return r;
}

float PipelineDriver::evaluate(const data::Sampler& sampler, int batches) {
  sampler_ = &sampler;
  first_index_ = 0;
  dp_rank_ = 0;
  dp_size_ = 1;
  loss_sum_ = 0;
  // One slot: nothing is kept for a backward (the executor waits for a slot's send before the
  // next forward overwrites it).
  parallel::PipelineExecutor ex(*p2p_, 1);
  ex.run(*this, parallel::build_forward_only(mesh_->pp_size(), mesh_->pp_rank(), batches));
  Tensor loss =
      Tensor::from_floats({model_->stage().head ? static_cast<float>(loss_sum_ / batches) : 0.0f},
                          Shape{1}, DType::kF32);
  mesh_->pp().allreduce(loss, comm::ReduceOp::kSum).wait();
  return loss.data_as<float>()[0];
}

std::vector<std::pair<std::string, Tensor>> gather_pipeline_weights(const models::Decoder& model,
                                                                    const Tensor& weights,
                                                                    parallel::Mesh& mesh) {
  std::vector<std::pair<std::string, Tensor>> out;
  if (mesh.dp_rank() != 0) return out;
  auto mine = gather_weights(model, weights, parallel::TPGroup(mesh.tp()));
  if (mesh.tp_rank() != 0) return out;
  // Every stage's TP rank 0 of DP replica 0 holds its stage's full tensors: the others send
  // theirs (all posted before any wait) to the first stage, which takes them in stage order.
  // Stage by stage, without the tied copies, is the whole model's order in both families.
  comm::Communicator& pp = mesh.pp();
  const int stage = mesh.pp_rank();
  std::vector<comm::Work> sends;
  if (stage > 0) {
    MT_ASSERT(mine.size() == model.params().size(), "{} gathered tensors for {} parameters",
              mine.size(), model.params().size());
    for (std::size_t i = 0; i < mine.size(); ++i) {
      if (model.params()[i].tied_copy) continue;
      sends.push_back(pp.send(mine[i].second, 0));
    }
    comm::wait_all(sends);
    return out;
  }
  out = std::move(mine);
  const models::ModelConfig whole = model.config().unsplit();
  for (int s = 1; s < mesh.pp_size(); ++s) {
    const parallel::StageRange r = parallel::stage_range(whole.n_layer(), mesh.pp_size(), s);
    std::vector<comm::Work> recvs;
    std::vector<std::pair<std::string, Tensor>> got;
    for (const models::ParamInfo& p : whole.param_layout(1, r)) {
      if (p.tied_copy) continue;
      got.emplace_back(p.name, Tensor::empty(p.full_shape, DType::kF32));
      recvs.push_back(pp.recv(got.back().second, s));
    }
    comm::wait_all(recvs);
    for (auto& g : got) out.push_back(std::move(g));
  }
  return out;
}

void print_pipeline_plan(const TrainConfig& cfg, const models::ModelConfig& m,
                         const PrecisionPolicy& policy, int dp) {
  const parallel::PipeSchedule schedule = parallel::parse_pipe_schedule(cfg.pp_schedule);
  const int p = cfg.pp, micro = cfg.grad_accum;
  auto mib = [](std::int64_t b) { return static_cast<double>(b) / 1048576.0; };
  std::printf(
      "pipeline: %d stages, %s, %d micro-batches of %d x %d per step (train.grad_accum), TP %d, "
      "DP %d\n",
      p, parallel::pipe_schedule_name(schedule), micro, cfg.batch_size, cfg.seq_len, cfg.tp, dp);
  std::printf(
      "  stage  layers   parameters  params+grads  optimizer  in-flight  activations    total\n");
  std::int64_t peak = 0;
  for (int s = 0; s < p; ++s) {
    const parallel::StageRange r = parallel::stage_range(m.n_layer(), p, s);
    const int live = parallel::max_in_flight(parallel::build_schedule(schedule, p, s, micro));
    const models::MemoryEstimate e =
        models::estimate_stage_memory(m, policy, cfg.batch_size, cfg.seq_len, cfg.tp, dp,
                                      cfg.zero == 1, r, live, cfg.tp_sequence_parallel);
    const std::int64_t params = e.parameters / static_cast<std::int64_t>(dtype_size(policy.param));
    peak = std::max(peak, e.total());
    std::printf("  %5d  %2d-%-4d  %10.2fM  %9.1f MiB  %5.1f MiB  %9d  %7.1f MiB  %6.1f MiB\n", s,
                r.first_layer, r.last_layer - 1, static_cast<double>(params) / 1e6,
                mib(e.parameters + e.gradients),
                mib(e.master_weights + e.optimizer_state + e.gradient_shard), live,
                mib(e.activations), mib(e.total()));
  }
  const double bubble = static_cast<double>(p - 1) / (micro + p - 1);
  std::printf("  peak per rank %.1f MiB; bubble (P - 1) / (M + P - 1) = %.1f%%%s\n", mib(peak),
              100.0 * bubble,
              micro < p ? " (fewer micro-batches than stages: raise train.grad_accum)" : "");
}

std::unique_ptr<models::Decoder> whole_model(
    const models::ModelConfig& cfg, const PrecisionPolicy& policy,
    const std::vector<std::pair<std::string, Tensor>>& weights) {
  auto model = std::make_unique<models::Decoder>(cfg.unsplit(), policy);
  MT_ASSERT(weights.size() == model->params().size(), "{} gathered tensors for {} parameters",
            weights.size(), model->params().size());
  Tensor flat = Tensor::empty(Shape{model->num_parameters()}, DType::kF32);
  for (std::size_t i = 0; i < weights.size(); ++i) {
    const models::ParamInfo& p = model->params()[i];
    MT_ASSERT(weights[i].first == p.name && weights[i].second.numel() == p.numel(),
              "gathered '{}' where '{}' belongs", weights[i].first, p.name);
    parallel::slot_view(flat, p).copy_from(weights[i].second);
  }
  model->set_weights(flat);
  return model;
}

}  // namespace meshtrain::launch
