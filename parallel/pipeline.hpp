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
//   interleaved: Megatron-LM's interleaved 1F1B (Narayanan et al. 2021) over V model chunks
//          per stage (pp.virtual_stages): the model is cut into V x P contiguous chunks and
//          stage s holds chunks s, s + P, ..., s + (V - 1) P (its local chunks 0 .. V - 1), so
//          activations go stage 0 -> ... -> stage P - 1 -> stage 0 (next chunk) -> ... A stage
//          runs V x M virtual micro-batches: in groups of P micro-batches, chunk 0 of the
//          group, then chunk 1, ... (backward: chunk V - 1 first); warm-up (P - s - 1) x 2 +
//          (V - 1) x P forwards (all of them when M = P), then one forward and one backward at a
//          time, then the cool-down. Each stage is idle for about 1/V of 1F1B's bubble: (P - 1) /
//          (V M + P - 1) of the step, for up to (V - 1) P more chunk-sized activations alive.
//          Requires M to be a multiple of P (as Megatron does: the groups of P micro-batches are
//          what keep every stage's chunk order aligned with its neighbours').
// Backward runs micro-batches in order 0, 1, ..., M - 1 under every schedule, per chunk, so each
// stage accumulates gradients in the same order as one rank running the whole model over the
// same M micro-batches (the same bits for every parameter but the tied embedding, whose two
// stages' gradients are summed once at the end).
//
// Point-to-point between stages is a ring under interleaving: stage P - 1's chunk c sends to
// stage 0's chunk c + 1 and stage 0's chunk c + 1 sends its input gradient back to stage P - 1.
// Messages between an ordered pair of stages match in posting order whatever they carry (the
// communicator has no tags), which check_schedule verifies.
//
// Point-to-point actions between two computes form one group, posted at once with one
// Communicator::exchange() (Megatron's batch_isend_irecv: a send and a receive with the same
// neighbour in 1F1B's steady state go together). The executor waits for a group's receives
// before the next compute, and for a send only before its buffer is written again or at the end
// of run(), so a send never holds up this rank's compute.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.hpp"
#include "parallel/trace.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain::parallel {

enum class PipeSchedule { kGPipe, k1F1B, kInterleaved };
// "gpipe", "1f1b", "interleaved". Throws InvalidArgument naming `key` and the choices.
PipeSchedule parse_pipe_schedule(const std::string& name, const std::string& key = "pp.schedule");
const char* pipe_schedule_name(PipeSchedule s);

// What one pipeline stage of a decoder holds: layers [first_layer, last_layer), the embeddings
// (the first stage), and the final norm, the head and the loss (the last stage). The default is
// the whole model (one stage).
//
// Interleaved (V > 1 model chunks per stage): `chunks` lists the stage's layer ranges
// [first, last) in chunk order, all of the same size; first_layer and last_layer are then the
// first chunk's first and the last chunk's end. The embedding runs on chunk 0 and the head on
// chunk V - 1. Empty: one chunk, [first_layer, last_layer).
struct StageRange {
  int first_layer = 0;
  int last_layer = -1;  // -1: every layer from first_layer on
  bool embedding = true;
  bool head = true;
  std::vector<std::pair<int, int>> chunks;
  // Layers the stage holds (every chunk's).
  int count() const;
  int num_chunks() const { return chunks.empty() ? 1 : static_cast<int>(chunks.size()); }
  // Chunk c's layers [first, last) (last_layer must be resolved, not -1).
  std::pair<int, int> chunk(int c) const;
};
// Stage `stage` of `stages` of a model of `layers` layers: contiguous, every stage at least one
// layer, the first layers % stages stages one more than the rest (5 layers on 2 stages: 3 and 2;
// the last stage, which also runs the head and the loss, gets an extra layer only when every
// stage does). Throws InvalidArgument (naming model.n_layer and train.pp) when there are more
// stages than layers.
// virtual_stages V > 1 (interleaved): stage `stage` holds chunks stage, stage + P, ... of the
// V x P equal chunks; the layers must be a multiple of V x P (Megatron's rule; throws
// InvalidArgument naming model.n_layer, train.pp and pp.virtual_stages otherwise).
StageRange stage_range(int layers, int stages, int stage, int virtual_stages = 1);

struct PipeAction {
  enum Kind { kForward, kBackward, kSendForward, kRecvForward, kSendBackward, kRecvBackward };
  Kind kind = kForward;
  int micro = 0;
  int chunk = 0;  // the stage's model chunk (interleaved; 0 otherwise)
  bool compute() const { return kind == kForward || kind == kBackward; }
  bool operator==(const PipeAction&) const = default;
};
// "F3", "B0", "sendF3", "recvB0", ...; with a chunk other than 0: "F3.c1", "sendB0.c2".
std::string to_string(const PipeAction& a);

// Stage `stage`'s actions for one step of `micro_batches` micro-batches over `stages` stages.
// Stage 0's chunk 0 has no RecvForward/SendBackward, the last stage's last chunk no
// SendForward/RecvBackward. virtual_stages: chunks per stage, 1 but for kInterleaved, which
// needs at least 2 and micro_batches a multiple of stages (InvalidArgument otherwise).
std::vector<PipeAction> build_schedule(PipeSchedule schedule, int stages, int stage,
                                       int micro_batches, int virtual_stages = 1);
// Forward only (evaluation): RecvForward, Forward, SendForward per micro-batch (and chunk, in
// groups of `stages` micro-batches as the interleaved schedule runs them).
std::vector<PipeAction> build_forward_only(int stages, int stage, int micro_batches,
                                           int virtual_stages = 1);

// The most micro-batches whose activations a stage holds at once under `actions` (forwards
// begun minus backwards done; a forward-only list counts 1: nothing is kept for backward).
// Interleaved: counted in (micro-batch, chunk) pairs, each one chunk's activations.
int max_in_flight(const std::vector<PipeAction>& actions);
// The activation slots a stage needs to run `actions`: chunks x W, where W is the most
// micro-batches of one chunk alive at once (max_in_flight for one chunk). (micro, chunk) runs in
// slot pipe_slot(micro, chunk, W): a chunk's live micro-batches are consecutive (forwards and
// backwards each run in micro-batch order), so micro % W never collides.
int pipe_slots(const std::vector<PipeAction>& actions);
int pipe_slots_per_chunk(const std::vector<PipeAction>& actions);
inline int pipe_slot(int micro, int chunk, int per_chunk) {
  return chunk * per_chunk + micro % per_chunk;
}

// Checks a schedule (one action list per stage) without communicating: every (micro-batch,
// chunk) is run forward then backward once per stage (or forward only), chunk by chunk in
// micro-batch order, every send has the receive that
// FIFO matching per (pair, direction) gives it, with the same micro-batch, and the stages run
// to the end when each group of point-to-point actions completes only once every peer op it
// holds has been posted (the strictest rendezvous: no buffering). Returns "" or what is wrong.
std::string check_schedule(const std::vector<std::vector<PipeAction>>& per_stage);

// What a model stage implements for the executor. Slots: the executor runs micro-batch m of
// chunk c in activation slot pipe_slot(m, c, W); a slot's activations live from its forward to
// its backward and belong to one chunk.
class PipelineStage {
 public:
  virtual ~PipelineStage() = default;
  // The buffer that micro-batch activations for `slot` are received into (not the first
  // stage); the forward of that slot reads it.
  virtual Tensor stage_input(int slot) = 0;
  // The activations this stage's forward of `slot` produced (not the last stage), read by the
  // send until it completes: not written before the next forward of the slot.
  virtual Tensor stage_output(int slot) = 0;
  virtual void forward(int slot, int micro, int chunk) = 0;
  // output_grad: the gradient of stage_output(slot) (undefined on the last stage's last chunk,
  // which starts from its loss).
  virtual void backward(int slot, int micro, int chunk, const Tensor& output_grad) = 0;
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
  // pp: the PP group (size = stages). slots_per_chunk: W of pipe_slot (>= the schedule's
  // pipe_slots_per_chunk); chunks: the stage's model chunks.
  PipelineExecutor(comm::Communicator& pp, int slots_per_chunk, int chunks = 1);
  PipeStats run(PipelineStage& stage, const std::vector<PipeAction>& actions);
  // Records each forward and backward ("F3", "B3"; "F3.c1" for chunk 1) and each send and receive
  // (from posting to completion: "send F3 -> stage 2") into `trace` while it is active; null: none.
  void set_trace(Trace* trace) { trace_ = trace; }

 private:
  Trace* trace_ = nullptr;
  comm::Communicator* pp_;
  int per_chunk_, chunks_, slots_;
  std::vector<Tensor> grad_in_, grad_out_;  // per slot: received output gradients, sent input ones
};

}  // namespace meshtrain::parallel
