// The Trainer's side of pipeline parallelism (train.pp > 1): one optimizer step of a decoder
// stage (either family, models::Decoder's stage surface; one or, interleaved, several model
// chunks: the stage's StageRange::chunks) as a schedule of micro-batches (parallel/pipeline.hpp),
// a tied embedding's gradient summed over the embedding group, the loss brought from the last
// stage to every rank, evaluation as a forward-only pipeline, and the whole model's weights
// gathered onto world rank 0 (for model.safetensors and samples).
//
// Collective: every rank of the mesh calls train_step, evaluate and gather_weights together.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "launch/config.hpp"
#include "models/decoder.hpp"
#include "parallel/grad_reducer.hpp"
#include "parallel/mesh.hpp"
#include "parallel/pipeline.hpp"
#include "runtime/data.hpp"

namespace meshtrain::launch {

struct PipeStepResult {
  float loss = 0;  // the mean loss over the micro-batches, on every stage
  parallel::PipeStats stats;
};

class PipelineDriver : private parallel::PipelineStage {
 public:
  // model: this rank's stage, built with at least slots_for(...) activation slots; reducer: the
  // DP reducer of its gradients, or null. The model's grads-ready hook is set here (ranges go
  // to the reducer; the one that holds the tied embedding or its copy,
  // Decoder::embedding_group_param, waits until the embedding group has summed it).
  // p2p: the communicator that carries activations and gradients between stages (the mesh's
  // PP group, or an NCCL one over the same ranks); host scalars use the mesh's PP group.
  PipelineDriver(models::Decoder& model, parallel::Mesh& mesh, comm::Communicator& p2p,
                 parallel::GradReducer* reducer, parallel::PipeSchedule schedule, int micro_batches,
                 int batch, int seq);

  // One step's forward and backward over the micro-batches that `sampler` gives for
  // (first_index + m, DP rank): gradients accumulated (x loss_multiplier / micro_batches) and,
  // with a reducer, their reduction started; returns the mean loss on every stage.
  PipeStepResult train_step(const data::Sampler& sampler, std::int64_t first_index,
                            float loss_scale);
  // The mean loss of `batches` validation batches (indices 0.., not split over DP), forward
  // only, on every stage.
  float evaluate(const data::Sampler& sampler, int batches);

  int slots() const { return slots_; }
  // The activation slots stage `stage` of `stages` needs for `micro_batches` under `schedule`
  // with `chunks` model chunks per stage: what to build its Decoder with.
  static int slots_for(parallel::PipeSchedule schedule, int stages, int stage, int micro_batches,
                       int chunks = 1);
  // The last train_step's statistics.
  const parallel::PipeStats& last_stats() const { return last_; }
  void set_trace(parallel::Trace* trace) { executor_.set_trace(trace); }

 private:
  Tensor stage_input(int slot) override;
  Tensor stage_output(int slot) override;
  void forward(int slot, int micro, int chunk) override;
  void backward(int slot, int micro, int chunk, const Tensor& output_grad) override;
  Tensor input_grad() override;

  models::Decoder* model_;
  parallel::Mesh* mesh_;
  parallel::GradReducer* reducer_;
  std::vector<parallel::PipeAction> actions_;
  int micro_batches_, batch_, seq_, slots_, chunks_;
  comm::Communicator* p2p_;
  parallel::PipelineExecutor executor_;
  // Per slot: the micro-batch's tokens and targets (kept until its backward).
  std::vector<Tensor> tokens_, targets_;
  // What forward reads from: the sampler, the first index and the DP split of this call.
  const data::Sampler* sampler_ = nullptr;
  std::int64_t first_index_ = 0;
  int dp_rank_ = 0, dp_size_ = 1;
  bool training_ = false;
  float loss_multiplier_ = 1;
  double loss_sum_ = 0;
  // The backward running is its chunk's last micro-batch's (its gradients are final); the
  // reducer's step has begun (at the first such backward).
  bool final_backward_ = false, reducing_ = false;
  // The flat elements of Decoder::embedding_group_param ({0, 0}: none), and the hook's range
  // that holds them, held back until the embedding group has summed them.
  std::pair<std::int64_t, std::int64_t> tied_{0, 0}, held_{0, 0};
  parallel::PipeStats last_;
};

// Every parameter's full tensor (TP = 1 layout, the vocabulary padded to 128 rows,
// model.safetensors' names and order) gathered from every stage onto world rank 0; empty on every
// other rank. `weights`: this rank's flat fp32 master weights. Collective over the mesh (DP rank
// 0's ranks communicate; the others return at once).
std::vector<std::pair<std::string, Tensor>> gather_pipeline_weights(const models::Decoder& model,
                                                                    const Tensor& weights,
                                                                    parallel::Mesh& mesh);

// `meshtrain plan --pp P`: memory per stage (parameters, gradients, optimizer, the activations of
// the schedule's peak in-flight micro-batches) and the bubble fraction, printed to stdout.
void print_pipeline_plan(const TrainConfig& cfg, const models::ModelConfig& m,
                         const PrecisionPolicy& policy, int dp);

// A whole model (TP = 1, one stage) on this rank from gathered weights (as
// gather_pipeline_weights returns them), for sampling.
std::unique_ptr<models::Decoder> whole_model(
    const models::ModelConfig& cfg, const PrecisionPolicy& policy,
    const std::vector<std::pair<std::string, Tensor>>& weights);

}  // namespace meshtrain::launch
