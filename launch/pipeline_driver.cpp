#include "launch/pipeline_driver.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>

#include "launch/weights.hpp"
#include "runtime/error.hpp"

namespace meshtrain::launch {

int PipelineDriver::slots_for(parallel::PipeSchedule schedule, int stages, int stage,
                              int micro_batches, int chunks) {
  return parallel::pipe_slots(
      parallel::build_schedule(schedule, stages, stage, micro_batches, chunks));
}

PipelineDriver::PipelineDriver(models::Decoder& model, parallel::Mesh& mesh,
                               comm::Communicator& p2p, parallel::GradReducer* reducer,
                               parallel::PipeSchedule schedule, int micro_batches, int batch,
                               int seq)
    : model_(&model),
      mesh_(&mesh),
      reducer_(reducer),
      actions_(parallel::build_schedule(schedule, mesh.pp_size(), mesh.pp_rank(), micro_batches,
                                        model.stage().num_chunks())),
      micro_batches_(micro_batches),
      batch_(batch),
      seq_(seq),
      slots_(parallel::pipe_slots(actions_)),
      chunks_(model.stage().num_chunks()),
      p2p_(&p2p),
      executor_(p2p, parallel::pipe_slots_per_chunk(actions_), chunks_) {
  for (int s = 0; s < slots_; ++s) {
    tokens_.push_back(Tensor::empty(Shape{batch, seq}, DType::kI32));
    targets_.push_back(Tensor::empty(Shape{batch, seq}, DType::kI32));
  }
  if (const int e = model.embedding_group_param(); e >= 0) {
    const models::ParamInfo& p = model.params()[static_cast<std::size_t>(e)];
    tied_ = {p.offset, p.offset + p.numel()};
  }
  model.set_grads_ready_hook([this](std::int64_t lo, std::int64_t hi) {
    // Only a chunk's last micro-batch's backward makes its gradients final; the earlier ones
    // accumulate locally.
    if (!final_backward_) return;
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

void PipelineDriver::forward(int slot, int micro, int chunk) {
  const auto s = static_cast<std::size_t>(slot);
  sampler_->batch(first_index_ + micro, dp_rank_, dp_size_, tokens_[s], targets_[s]);
  const float loss = model_->forward_micro(slot, tokens_[s], targets_[s], chunk);
  if (model_->stage().head && chunk + 1 == chunks_) loss_sum_ += loss;
}

void PipelineDriver::backward(int slot, int micro, int chunk, const Tensor& output_grad) {
  // Only each chunk's last micro-batch's backward reduces. Chunks finish from the last to the
  // first (parallel/pipeline.hpp), so the ranges still reach the reducer in decreasing offsets;
  // its step begins with the first of them.
  final_backward_ = micro + 1 == micro_batches_;
  if (reducer_ != nullptr && final_backward_ && !reducing_) {
    reducer_->begin_step(true);
    reducing_ = true;
  }
  model_->backward_micro(slot, loss_multiplier_, output_grad, chunk);
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
  reducing_ = false;
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
  // One slot per chunk: nothing is kept for a backward (the executor waits for a slot's send
  // before the next forward overwrites it).
  parallel::PipelineExecutor ex(*p2p_, 1, chunks_);
  ex.run(*this, parallel::build_forward_only(mesh_->pp_size(), mesh_->pp_rank(), batches, chunks_));
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
  // theirs (all posted before any wait) to the first stage, which takes them in each stage's
  // layout order (without the tied copies) and returns them in the whole model's order
  // (interleaved stages hold non-contiguous layers).
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
  std::map<std::string, Tensor> all;
  for (auto& [name, t] : mine) all.emplace(name, std::move(t));
  const models::ModelConfig whole = model.config().unsplit();
  const int chunks = model.stage().num_chunks();
  for (int s = 1; s < mesh.pp_size(); ++s) {
    const parallel::StageRange r =
        parallel::stage_range(whole.n_layer(), mesh.pp_size(), s, chunks);
    std::vector<comm::Work> recvs;
    for (const models::ParamInfo& p : whole.param_layout(1, r)) {
      if (p.tied_copy) continue;
      Tensor& t = all[p.name] = Tensor::empty(p.full_shape, DType::kF32);
      recvs.push_back(pp.recv(t, s));
    }
    comm::wait_all(recvs);
  }
  // The whole model's order (interleaved stages hold layers out of it).
  for (const models::ParamInfo& p : whole.param_layout(1)) {
    auto it = all.find(p.name);
    MT_ASSERT(it != all.end(), "no stage sent '{}'", p.name);
    out.emplace_back(p.name, std::move(it->second));
  }
  return out;
}

void print_pipeline_plan(const TrainConfig& cfg, const models::ModelConfig& m,
                         const PrecisionPolicy& policy, int dp) {
  const parallel::PipeSchedule schedule = parallel::parse_pipe_schedule(cfg.pp_schedule);
  const int p = cfg.pp, micro = cfg.grad_accum, v = cfg.pp_virtual_stages;
  auto mib = [](std::int64_t b) { return static_cast<double>(b) / 1048576.0; };
  std::printf(
      "pipeline: %d stages, %s%s, %d micro-batches of %d x %d per step (train.grad_accum), TP "
      "%d, DP %d\n",
      p, parallel::pipe_schedule_name(schedule),
      v > 1 ? fmt::format(" ({} model chunks per stage)", v).c_str() : "", micro, cfg.batch_size,
      cfg.seq_len, cfg.tp, dp);
  std::printf(
      "  stage  layers   parameters  params+grads  optimizer  in-flight  activations    total\n");
  std::int64_t peak = 0;
  for (int s = 0; s < p; ++s) {
    const parallel::StageRange r = parallel::stage_range(m.n_layer(), p, s, v);
    // Interleaved: (micro-batch, chunk) pairs, each one chunk's activations.
    const int live = parallel::max_in_flight(parallel::build_schedule(schedule, p, s, micro, v));
    const models::MemoryEstimate e =
        models::estimate_stage_memory(m, policy, cfg.batch_size, cfg.seq_len, cfg.tp, dp,
                                      cfg.zero == 1, r, live, cfg.tp_sequence_parallel);
    const std::int64_t params = e.parameters / static_cast<std::int64_t>(dtype_size(policy.param));
    peak = std::max(peak, e.total());
    std::string layers;
    for (int c = 0; c < r.num_chunks(); ++c)
      layers +=
          (c ? "," : "") + (r.chunk(c).second - r.chunk(c).first == 1
                                ? std::to_string(r.chunk(c).first)
                                : fmt::format("{}-{}", r.chunk(c).first, r.chunk(c).second - 1));
    std::printf("  %5d  %-7s  %10.2fM  %9.1f MiB  %5.1f MiB  %9d  %7.1f MiB  %6.1f MiB\n", s,
                layers.c_str(), static_cast<double>(params) / 1e6, mib(e.parameters + e.gradients),
                mib(e.master_weights + e.optimizer_state + e.gradient_shard), live,
                mib(e.activations), mib(e.total()));
  }
  // Interleaving divides each stage's share of the model into V chunks, and the fill and drain
  // run chunk by chunk: about 1/V of 1F1B's bubble.
  const double bubble = static_cast<double>(p - 1) / (v * micro + p - 1);
  const double plain = static_cast<double>(p - 1) / (micro + p - 1);
  std::printf("  peak per rank %.1f MiB; bubble (P - 1) / (%sM + P - 1) = %.1f%%%s%s\n", mib(peak),
              v > 1 ? "V " : "", 100.0 * bubble,
              v > 1 ? fmt::format(" (1f1b: {:.1f}%)", 100.0 * plain).c_str() : "",
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
