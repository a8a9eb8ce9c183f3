// Pipeline parallelism: the stage split, the schedules and the one executor that runs them.
//
// A model split into P stages (contiguous layer ranges, parallel::stage_range) runs each
// optimizer step as M micro-batches (train.grad_accum). A schedule is a pure function of
// (schedule, P, stage, M): each rank's ordered list of actions, compute (forward or backward of
// one micro-batch) and point-to-point (send or receive activations or gradients of one
// micro-batch). It is checked without any communication (check_schedule: every send has its
// receive in FIFO order per pair, no deadlock under the strictest matching, the in-flight bound),
// and executed by PipelineExecutor, which posts the point-to-point actions over the mesh's PP
// group as comm/README.md's deadlock rule asks.
//
// Schedules (Megatron-LM's names):
//   gpipe: every forward, then every backward (M micro-batches of activations alive).
//   1f1b:  stage s runs min(P - s - 1, M) warm-up forwards, then alternates one forward and one
//          backward, then the cool-down backwards: at most P - s micro-batches alive (the last
//          stage: one), which is what bounds 1F1B's activation memory at P micro-batches.
// Backward runs micro-batches in order 0, 1, ..., M - 1 under both, so each stage accumulates
// gradients in the same order as one rank running the whole model over the same M
// micro-batches (the same bits for every parameter but the tied embedding, whose two stages'
// gradients are summed once at the end).
//
// Point-to-point actions between two computes form one group, posted at once with one
// Communicator::exchange() (Megatron's batch_isend_irecv: a send and a receive with the same
// neighbour in 1F1B's steady state go together). The executor waits for a group's receives
// before the next compute, and for a send only before its buffer is written again or at the end
// of run(), so a send never holds up this rank's compute.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "parallel/trace.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain::parallel {

enum class PipeSchedule { kGPipe, k1F1B };
// "gpipe", "1f1b". Throws InvalidArgument naming `key` and the choices.
PipeSchedule parse_pipe_schedule(const std::string& name, const std::string& key = "pp.schedule");
const char* pipe_schedule_name(PipeSchedule s);

// What one pipeline stage of a decoder holds: layers [first_layer, last_layer), the embeddings
// (the first stage), and the final norm, the head and the loss (the last stage). The default is
// the whole model (one stage).
struct StageRange {
  int first_layer = 0;
  int last_layer = -1;  // -1: every layer from first_layer on
  bool embedding = true;
  bool head = true;
  int count() const { return last_layer - first_layer; }
};
// Stage `stage` of `stages` of a model of `layers` layers: contiguous, every stage at least one
// layer, the first layers % stages stages one more than the rest (5 layers on 2 stages: 3 and 2;
// the last stage, which also runs the head and the loss, gets an extra layer only when every
// stage does). Throws InvalidArgument (naming model.n_layer and train.pp) when there are more
// stages than layers.
StageRange stage_range(int layers, int stages, int stage);

struct PipeAction {
  enum Kind { kForward, kBackward, kSendForward, kRecvForward, kSendBackward, kRecvBackward };
  Kind kind = kForward;
  int micro = 0;
  bool compute() const { return kind == kForward || kind == kBackward; }
  bool operator==(const PipeAction&) const = default;
};
std::string to_string(const PipeAction& a);  // "F3", "B0", "sendF3", "recvB0", ...

// Stage `stage`'s actions for one step of `micro_batches` micro-batches over `stages` stages.
// Stage 0 has no RecvForward/SendBackward, the last stage no SendForward/RecvBackward.
std::vector<PipeAction> build_schedule(PipeSchedule schedule, int stages, int stage,
                                       int micro_batches);
// Forward only (evaluation): RecvForward, Forward, SendForward per micro-batch.
std::vector<PipeAction> build_forward_only(int stages, int stage, int micro_batches);

// The most micro-batches whose activations a stage holds at once under `actions` (forwards
// begun minus backwards done; a forward-only list counts 1: nothing is kept for backward).
int max_in_flight(const std::vector<PipeAction>& actions);

// Checks a schedule (one action list per stage) without communicating: every micro-batch is
// run forward then backward once per stage (or forward only), every send has the receive that
// FIFO matching per (pair, direction) gives it, with the same micro-batch, and the stages run
// to the end when each group of point-to-point actions completes only once every peer op it
// holds has been posted (the strictest rendezvous: no buffering). Returns "" or what is wrong.
std::string check_schedule(const std::vector<std::vector<PipeAction>>& per_stage);

// What a model stage implements for the executor. Slots: the executor runs micro-batch m in
// activation slot m % slots(); a slot's activations live from its forward to its backward.
class PipelineStage {
 public:
  virtual ~PipelineStage() = default;
  // The buffer that micro-batch activations for `slot` are received into (not the first
  // stage); the forward of that slot reads it.
  virtual Tensor stage_input(int slot) = 0;
  // The activations this stage's forward of `slot` produced (not the last stage), read by the
  // send until it completes: not written before the next forward of the slot.
  virtual Tensor stage_output(int slot) = 0;
  virtual void forward(int slot, int micro) = 0;
  // output_grad: the gradient of stage_output(slot) (undefined on the last stage, which starts
  // from its loss).
  virtual void backward(int slot, int micro, const Tensor& output_grad) = 0;
  // After backward (not the first stage): the gradient of stage_input(slot); valid until the
  // next backward.
  virtual Tensor input_grad() = 0;
};

// Per step: milliseconds this rank spent computing and waiting for its neighbours.
struct PipeStats {
  double compute_ms = 0, wait_ms = 0;
  std::int64_t bytes_sent = 0;
};

// Runs action lists over `pp` (the mesh's PP group; its rank is the stage). Collective over the
// PP group: every stage runs its list of the same schedule. Timeouts are the communicator's: a
// stage that never sends is named ("recv #3 from rank 2, pipeline stage 2"). When a receive
// times out on a neighbour that is alive (so itself waiting on a stage further along), the
// CommTimeout is rethrown only after 7 s, so that the stage next to a lost rank, whose liveness
// check names it as lost, reports and ends the job first.
class PipelineExecutor {
 public:
  // pp: the PP group (size = stages). slots: activation slots the stage has (>= the schedule's
  // max_in_flight).
  PipelineExecutor(comm::Communicator& pp, int slots);
  PipeStats run(PipelineStage& stage, const std::vector<PipeAction>& actions);
  // Records each forward and backward ("F3", "B3") and each send and receive (from posting to
  // completion: "send F3 -> stage 2") into `trace` while it is active; null: none.
  void set_trace(Trace* trace) { trace_ = trace; }

 private:
  Trace* trace_ = nullptr;
  comm::Communicator* pp_;
  int slots_;
  std::vector<Tensor> grad_in_, grad_out_;  // per slot: received output gradients, sent input ones
};

}  // namespace meshtrain::parallel
