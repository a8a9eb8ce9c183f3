#include "parallel/pipeline.hpp"

#include <algorithm>
#include <chrono>
#include <map>
#include <string_view>
#include <thread>
#include <tuple>
#include <utility>

#include "runtime/error.hpp"
#include "runtime/log.hpp"

namespace meshtrain::parallel {
namespace {

using Clock = std::chrono::steady_clock;

// See PipelineExecutor::run's wait: the liveness check takes 3-5 s after a timeout.
constexpr int kNeighbourGraceS = 7;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

void check_shape(int stages, int stage, int micro_batches) {
  MT_CHECK(stages >= 1, "pipeline schedule: stages must be at least 1, got {}", stages);
  MT_CHECK(stage >= 0 && stage < stages, "pipeline schedule: stage {} is outside [0, {})", stage,
           stages);
  MT_CHECK(micro_batches >= 1, "pipeline schedule: micro-batches must be at least 1, got {}",
           micro_batches);
}

// The peer of a point-to-point action of stage s of `stages`, or -1 for a compute. A ring: under
// interleaving the last stage's chunk c feeds the first stage's chunk c + 1 (whether an action
// may exist at all is check_schedule's business).
int peer_of(const PipeAction& a, int s, int stages) {
  switch (a.kind) {
    case PipeAction::kSendForward:
    case PipeAction::kRecvBackward:
      return (s + 1) % stages;
    case PipeAction::kRecvForward:
    case PipeAction::kSendBackward:
      return (s - 1 + stages) % stages;
    default:
      return -1;
  }
}

bool is_send(const PipeAction& a) {
  return a.kind == PipeAction::kSendForward || a.kind == PipeAction::kSendBackward;
}

}  // namespace

PipeSchedule parse_pipe_schedule(const std::string& name, const std::string& key) {
  if (name == "gpipe") return PipeSchedule::kGPipe;
  if (name == "1f1b") return PipeSchedule::k1F1B;
  if (name == "interleaved") return PipeSchedule::kInterleaved;
  MT_FAIL(
      "{} = \"{}\": unknown pipeline schedule; expected \"gpipe\", \"1f1b\" or "
      "\"interleaved\"",
      key, name);
}

const char* pipe_schedule_name(PipeSchedule s) {
  switch (s) {
    case PipeSchedule::kGPipe:
      return "gpipe";
    case PipeSchedule::k1F1B:
      return "1f1b";
    default:
      return "interleaved";
  }
}

int StageRange::count() const {
  if (chunks.empty()) return last_layer - first_layer;
  int n = 0;
  for (const auto& [lo, hi] : chunks) n += hi - lo;
  return n;
}

std::pair<int, int> StageRange::chunk(int c) const {
  MT_ASSERT(c >= 0 && c < num_chunks(), "chunk {} of a stage of {} chunks", c, num_chunks());
  return chunks.empty() ? std::make_pair(first_layer, last_layer)
                        : chunks[static_cast<std::size_t>(c)];
}

StageRange stage_range(int layers, int stages, int stage, int virtual_stages) {
  MT_CHECK(stages >= 1 && stage >= 0 && stage < stages, "stage {} is outside [0, {})", stage,
           stages);
  MT_CHECK(layers >= stages,
           "a model of {} layers (model.n_layer) cannot be split into {} pipeline stages "
           "(train.pp = {}): every stage needs at least one layer",
           layers, stages, stages);
  MT_CHECK(virtual_stages >= 1, "pp.virtual_stages must be at least 1, got {}", virtual_stages);
  if (virtual_stages > 1) {
    const int n_chunks = virtual_stages * stages;
    MT_CHECK(layers % n_chunks == 0,
             "a model of {} layers (model.n_layer) cannot be cut into pp.virtual_stages x "
             "train.pp = {} x {} = {} equal model chunks: the layers must be a multiple of {}",
             layers, virtual_stages, stages, n_chunks, n_chunks);
    const int size = layers / n_chunks;
    StageRange r;
    for (int c = 0; c < virtual_stages; ++c) {
      const int first = (c * stages + stage) * size;
      r.chunks.emplace_back(first, first + size);
    }
    r.first_layer = r.chunks.front().first;
    r.last_layer = r.chunks.back().second;
    r.embedding = stage == 0;
    r.head = stage == stages - 1;
    return r;
  }
  const int base = layers / stages, extra = layers % stages;
  StageRange r;
  r.first_layer = stage * base + std::min(stage, extra);
  r.last_layer = r.first_layer + base + (stage < extra ? 1 : 0);
  r.embedding = stage == 0;
  r.head = stage == stages - 1;
  return r;
}

std::string to_string(const PipeAction& a) {
  static const char* names[] = {"F", "B", "sendF", "recvF", "sendB", "recvB"};
  return names[a.kind] + std::to_string(a.micro) +
         (a.chunk != 0 ? ".c" + std::to_string(a.chunk) : std::string());
}

namespace {

// Megatron-LM's forward_backward_pipelining_with_interleaving, as action lists. Virtual
// micro-batch k (0 .. V M - 1) is micro-batch (k / (P V)) P + k % P of chunk (k % (P V)) / P
// (backward: chunk V - 1 - that), so each group of P micro-batches runs through chunk 0, then
// chunk 1, ... Point-to-point actions are grouped as Megatron's batched calls are: after each
// warm-up forward, its send with the next forward's receive (and, after the last, the first
// backward's receive); in the steady state one forward and one backward, then both sends and
// both receives; in the cool-down each backward's send with the next one's receive.
std::vector<PipeAction> build_interleaved(int stages, int stage, int micro_batches, int chunks) {
  const int p = stages, v = chunks, n = micro_batches * chunks;
  const bool first = stage == 0, last = stage == stages - 1;
  auto chunk_of = [&](int k, bool forward) {
    const int c = (k % (p * v)) / p;
    return forward ? c : v - 1 - c;
  };
  auto micro_of = [&](int k) { return (k / (p * v)) * p + k % p; };
  std::vector<PipeAction> out;
  // Stage 0's chunk 0 reads tokens and the last stage's last chunk ends in the loss: neither
  // receives nor sends past the ends of the model.
  auto push = [&](PipeAction::Kind kind, int k, bool forward) {
    const int c = chunk_of(k, forward);
    const bool model_first = first && c == 0, model_last = last && c == v - 1;
    const bool skip =
        (kind == PipeAction::kRecvForward || kind == PipeAction::kSendBackward)   ? model_first
        : (kind == PipeAction::kSendForward || kind == PipeAction::kRecvBackward) ? model_last
                                                                                  : false;
    if (!skip) out.push_back(PipeAction{kind, micro_of(k), c});
  };
  // Megatron's warm-up: all forwards when M = P, else 2 (P - s - 1) + (V - 1) P.
  const int warmup = micro_batches == p ? n : std::min(n, (p - stage - 1) * 2 + (v - 1) * p);
  const int steady = n - warmup;
  push(PipeAction::kRecvForward, 0, true);
  for (int k = 0; k < warmup; ++k) {
    push(PipeAction::kForward, k, true);
    push(PipeAction::kSendForward, k, true);
    if (k + 1 < n) push(PipeAction::kRecvForward, k + 1, true);
    if (k + 1 == warmup) push(PipeAction::kRecvBackward, 0, false);
  }
  for (int j = 0; j < steady; ++j) {
    const int f = warmup + j;
    push(PipeAction::kForward, f, true);
    push(PipeAction::kBackward, j, false);
    push(PipeAction::kSendForward, f, true);
    push(PipeAction::kSendBackward, j, false);
    if (f + 1 < n) push(PipeAction::kRecvForward, f + 1, true);
    if (j + 1 < n) push(PipeAction::kRecvBackward, j + 1, false);
  }
  for (int k = steady; k < n; ++k) {
    push(PipeAction::kBackward, k, false);
    push(PipeAction::kSendBackward, k, false);
    if (k + 1 < n) push(PipeAction::kRecvBackward, k + 1, false);
  }
  return out;
}

}  // namespace

std::vector<PipeAction> build_schedule(PipeSchedule schedule, int stages, int stage,
                                       int micro_batches, int virtual_stages) {
  check_shape(stages, stage, micro_batches);
  if (schedule == PipeSchedule::kInterleaved) {
    MT_CHECK(virtual_stages >= 2,
             "the interleaved pipeline schedule needs pp.virtual_stages >= 2 model chunks per "
             "stage, got {}",
             virtual_stages);
    MT_CHECK(micro_batches % stages == 0,
             "the interleaved pipeline schedule runs micro-batches in groups of train.pp = {}: "
             "train.grad_accum = {} must be a multiple of {}",
             stages, micro_batches, stages);
    return build_interleaved(stages, stage, micro_batches, virtual_stages);
  }
  MT_CHECK(virtual_stages == 1,
           "pp.virtual_stages = {}: model chunks per stage need pp.schedule = \"interleaved\", "
           "not \"{}\"",
           virtual_stages, pipe_schedule_name(schedule));
  const bool first = stage == 0, last = stage == stages - 1;
  const int m_count = micro_batches;
  std::vector<PipeAction> out;
  auto add = [&](PipeAction::Kind k, int m, bool when = true) {
    if (when) out.push_back(PipeAction{k, m});
  };
  auto fwd = [&](int m) {
    add(PipeAction::kRecvForward, m, !first);
    add(PipeAction::kForward, m);
    add(PipeAction::kSendForward, m, !last);
  };
  auto bwd = [&](int m) {
    add(PipeAction::kRecvBackward, m, !last);
    add(PipeAction::kBackward, m);
    add(PipeAction::kSendBackward, m, !first);
  };
  if (schedule == PipeSchedule::kGPipe) {
    for (int m = 0; m < m_count; ++m) fwd(m);
    for (int m = 0; m < m_count; ++m) bwd(m);
    return out;
  }
  // 1F1B (Megatron's forward_backward_pipelining_without_interleaving): warm-up forwards, then
  // one forward and one backward at a time, then the cool-down backwards.
  const int warmup = std::min(stages - stage - 1, m_count);
  const int steady = m_count - warmup;
  for (int m = 0; m < warmup; ++m) fwd(m);
  if (steady > 0) add(PipeAction::kRecvForward, warmup, !first);
  for (int j = 0; j < steady; ++j) {
    const int f = warmup + j;
    add(PipeAction::kForward, f);
    // send_forward_recv_backward: one group.
    add(PipeAction::kSendForward, f, !last);
    add(PipeAction::kRecvBackward, j, !last);
    add(PipeAction::kBackward, j);
    // send_backward_recv_forward (the last steady step: send_backward alone).
    add(PipeAction::kSendBackward, j, !first);
    if (j + 1 < steady) add(PipeAction::kRecvForward, f + 1, !first);
  }
  for (int m = steady; m < m_count; ++m) bwd(m);
  return out;
}

std::vector<PipeAction> build_forward_only(int stages, int stage, int micro_batches,
                                           int virtual_stages) {
  check_shape(stages, stage, micro_batches);
  MT_CHECK(virtual_stages >= 1, "pp.virtual_stages must be at least 1, got {}", virtual_stages);
  std::vector<PipeAction> out;
  // Groups of P micro-batches (the last may be smaller), each through chunk 0, then chunk 1, ...:
  // every stage sees the same order, so the ring's messages match and the pipeline fills.
  for (int g = 0; g < micro_batches; g += stages) {
    const int end = std::min(micro_batches, g + stages);
    for (int c = 0; c < virtual_stages; ++c)
      for (int m = g; m < end; ++m) {
        if (stage > 0 || c > 0) out.push_back({PipeAction::kRecvForward, m, c});
        out.push_back({PipeAction::kForward, m, c});
        if (stage + 1 < stages || c + 1 < virtual_stages)
          out.push_back({PipeAction::kSendForward, m, c});
      }
  }
  return out;
}

int max_in_flight(const std::vector<PipeAction>& actions) {
  int live = 0, peak = 0;
  bool any_backward = false;
  for (const PipeAction& a : actions) {
    if (a.kind == PipeAction::kForward) peak = std::max(peak, ++live);
    if (a.kind == PipeAction::kBackward) {
      --live;
      any_backward = true;
    }
  }
  return any_backward ? peak : std::min(peak, 1);
}

int pipe_slots_per_chunk(const std::vector<PipeAction>& actions) {
  std::map<int, int> live;
  int peak = 0;
  bool any_backward = false;
  for (const PipeAction& a : actions) {
    if (a.kind == PipeAction::kForward) peak = std::max(peak, ++live[a.chunk]);
    if (a.kind == PipeAction::kBackward) {
      --live[a.chunk];
      any_backward = true;
    }
  }
  return any_backward ? peak : std::min(peak, 1);
}

int pipe_slots(const std::vector<PipeAction>& actions) {
  int chunks = 1;
  for (const PipeAction& a : actions) chunks = std::max(chunks, a.chunk + 1);
  return chunks * pipe_slots_per_chunk(actions);
}

std::string check_schedule(const std::vector<std::vector<PipeAction>>& per_stage) {
  const int stages = static_cast<int>(per_stage.size());
  if (stages == 0) return "no stages";
  int chunks = 1;
  for (const auto& acts : per_stage)
    for (const PipeAction& a : acts) {
      if (a.chunk < 0) return fmt::format("{} has a negative chunk", to_string(a));
      chunks = std::max(chunks, a.chunk + 1);
    }
  // Each stage: its computes and point-to-point in a consistent order, for every (micro-batch,
  // chunk). Stage 0's chunk 0 starts the model, the last stage's last chunk ends it.
  int micro = -1;
  for (int s = 0; s < stages; ++s) {
    const auto& acts = per_stage[static_cast<std::size_t>(s)];
    std::map<std::tuple<int, int, int>, int> at;  // (kind, micro, chunk) -> index
    int forwards = 0, backwards = 0;
    // Per chunk: the last micro-batch run forward and backward (each must run in order).
    std::map<int, int> last_f, last_b;
    for (int i = 0; i < static_cast<int>(acts.size()); ++i) {
      const PipeAction& a = acts[static_cast<std::size_t>(i)];
      if (!at.emplace(std::make_tuple(static_cast<int>(a.kind), a.micro, a.chunk), i).second)
        return fmt::format("stage {}: {} appears twice", s, to_string(a));
      const int peer = peer_of(a, s, stages);
      if (!a.compute() && peer == s)
        return fmt::format("stage {}: {} has no peer stage", s, to_string(a));
      if (a.kind == PipeAction::kForward || a.kind == PipeAction::kBackward) {
        auto& prev = a.kind == PipeAction::kForward ? last_f : last_b;
        auto it = prev.find(a.chunk);
        if (it != prev.end() && it->second > a.micro)
          return fmt::format("stage {}: {} runs after micro-batch {} of its chunk", s, to_string(a),
                             it->second);
        prev[a.chunk] = a.micro;
      }
      forwards += a.kind == PipeAction::kForward;
      backwards += a.kind == PipeAction::kBackward;
    }
    if (micro < 0) micro = forwards / chunks;
    if (forwards != micro * chunks || (backwards != 0 && backwards != micro * chunks))
      return fmt::format("stage {}: {} forwards and {} backwards, expected {} each", s, forwards,
                         backwards, micro * chunks);
    auto idx = [&](PipeAction::Kind k, int m, int c) {
      auto it = at.find({static_cast<int>(k), m, c});
      return it == at.end() ? -1 : it->second;
    };
    for (int c = 0; c < chunks; ++c) {
      const bool starts = s == 0 && c == 0, ends = s + 1 == stages && c + 1 == chunks;
      const std::string where = chunks > 1 ? fmt::format(" (chunk {})", c) : std::string();
      for (int m = 0; m < micro; ++m) {
        const int f = idx(PipeAction::kForward, m, c), b = idx(PipeAction::kBackward, m, c);
        if (f < 0) return fmt::format("stage {}: no forward of micro-batch {}{}", s, m, where);
        if (backwards > 0 && (b < 0 || b < f))
          return fmt::format("stage {}: backward of micro-batch {}{} missing or before its forward",
                             s, m, where);
        const int rf = idx(PipeAction::kRecvForward, m, c),
                  sf = idx(PipeAction::kSendForward, m, c);
        if (starts == (rf >= 0) || (rf >= 0 && rf > f))
          return fmt::format("stage {}: receive of micro-batch {}'s activations{} misplaced", s, m,
                             where);
        if (ends == (sf >= 0) || (sf >= 0 && sf < f))
          return fmt::format("stage {}: send of micro-batch {}'s activations{} misplaced", s, m,
                             where);
        if (backwards > 0) {
          const int rb = idx(PipeAction::kRecvBackward, m, c),
                    sb = idx(PipeAction::kSendBackward, m, c);
          if (ends == (rb >= 0) || (rb >= 0 && rb > b))
            return fmt::format("stage {}: receive of micro-batch {}'s gradient{} misplaced", s, m,
                               where);
          if (starts == (sb >= 0) || (sb >= 0 && sb < b))
            return fmt::format("stage {}: send of micro-batch {}'s gradient{} misplaced", s, m,
                               where);
        }
      }
    }
  }
  // FIFO matching per (sender, receiver), whatever the messages carry: the k-th send is received
  // by the k-th receive, which must be of the same kind and micro-batch and of the chunk the
  // ring gives (the last stage's chunk c feeds stage 0's chunk c + 1; stage 0's chunk c + 1
  // returns its gradient to the last stage's chunk c).
  std::map<std::pair<int, int>, std::vector<PipeAction>> sends, recvs;
  for (int s = 0; s < stages; ++s)
    for (const PipeAction& a : per_stage[static_cast<std::size_t>(s)]) {
      if (a.compute()) continue;
      const int p = peer_of(a, s, stages);
      if (is_send(a)) {
        sends[{s, p}].push_back(a);
      } else {
        recvs[{p, s}].push_back(a);
      }
    }
  for (const auto& [pair, list] : sends) {
    const auto& r = recvs[pair];
    if (r.size() != list.size())
      return fmt::format("stage {} sends {} messages to stage {}, which receives {}", pair.first,
                         list.size(), pair.second, r.size());
    for (std::size_t k = 0; k < list.size(); ++k) {
      const bool fwd = list[k].kind == PipeAction::kSendForward;
      const bool rfwd = r[k].kind == PipeAction::kRecvForward;
      int chunk = list[k].chunk;
      if (fwd && pair.first == stages - 1) ++chunk;
      if (!fwd && pair.first == 0) --chunk;
      if (fwd != rfwd || list[k].micro != r[k].micro || r[k].chunk != chunk)
        return fmt::format("stage {}'s send #{} to stage {} is {} but is received as {}",
                           pair.first, k, pair.second, to_string(list[k]), to_string(r[k]));
    }
  }
  for (const auto& [pair, list] : recvs)
    if (!list.empty() && sends[pair].size() != list.size())
      return fmt::format("stage {} receives {} messages from stage {}, which sends {}", pair.second,
                         list.size(), pair.first, sends[pair].size());
  // Run every stage under strict rendezvous: a group of point-to-point actions (those between
  // two computes) completes once the peer has posted the matching op of each of them.
  std::map<std::pair<int, int>, int> posted_sends, posted_recvs;  // (from, to) -> count
  std::vector<std::size_t> pc(static_cast<std::size_t>(stages), 0);
  // Per stage: the current group's ops, as (from, to, index, is_send), once posted.
  std::vector<std::vector<std::tuple<int, int, int, bool>>> group(static_cast<std::size_t>(stages));
  std::vector<bool> in_group(static_cast<std::size_t>(stages), false);
  for (bool progress = true; progress;) {
    progress = false;
    for (int s = 0; s < stages; ++s) {
      const auto& acts = per_stage[static_cast<std::size_t>(s)];
      std::size_t& i = pc[static_cast<std::size_t>(s)];
      while (i < acts.size()) {
        if (acts[i].compute()) {
          ++i;
          progress = true;
          continue;
        }
        auto& g = group[static_cast<std::size_t>(s)];
        if (!in_group[static_cast<std::size_t>(s)]) {
          g.clear();
          for (std::size_t j = i; j < acts.size() && !acts[j].compute(); ++j) {
            const int p = peer_of(acts[j], s, stages);
            if (is_send(acts[j])) {
              g.emplace_back(s, p, posted_sends[{s, p}]++, true);
            } else {
              g.emplace_back(p, s, posted_recvs[{p, s}]++, false);
            }
          }
          in_group[static_cast<std::size_t>(s)] = true;
          progress = true;
        }
        bool done = true;
        for (const auto& [from, to, k, send] : g)
          done = done && (send ? posted_recvs[{from, to}] > k : posted_sends[{from, to}] > k);
        if (!done) break;
        i += g.size();
        in_group[static_cast<std::size_t>(s)] = false;
        progress = true;
      }
    }
  }
  for (int s = 0; s < stages; ++s) {
    const auto& acts = per_stage[static_cast<std::size_t>(s)];
    if (pc[static_cast<std::size_t>(s)] < acts.size())
      return fmt::format("deadlock: stage {} waits forever at action {} ({})", s,
                         pc[static_cast<std::size_t>(s)],
                         to_string(acts[pc[static_cast<std::size_t>(s)]]));
  }
  return "";
}

PipelineExecutor::PipelineExecutor(comm::Communicator& pp, int slots_per_chunk, int chunks)
    : pp_(&pp), per_chunk_(slots_per_chunk), chunks_(chunks), slots_(slots_per_chunk * chunks) {
  MT_CHECK(slots_per_chunk >= 1 && chunks >= 1,
           "PipelineExecutor: slots per chunk and chunks must be at least 1, got {} and {}",
           slots_per_chunk, chunks);
  grad_in_.resize(static_cast<std::size_t>(slots_));
  grad_out_.resize(static_cast<std::size_t>(slots_));
}

PipeStats PipelineExecutor::run(PipelineStage& stage, const std::vector<PipeAction>& actions) {
  const int rank = pp_->valid() ? pp_->rank() : 0;
  const int stages = pp_->valid() ? pp_->size() : 1;
  MT_ASSERT(pipe_slots_per_chunk(actions) <= per_chunk_ && pipe_slots(actions) <= slots_,
            "schedule needs {} slots per chunk ({} in all), the stage has {} ({})",
            pipe_slots_per_chunk(actions), pipe_slots(actions), per_chunk_, slots_);
  // A ring under interleaving (see peer_of): the last stage's chunk c feeds stage 0's c + 1.
  const int next = (rank + 1) % stages, prev = (rank - 1 + stages) % stages;
  PipeStats st;
  // Sends in flight per slot: the buffer they read is not written until they complete.
  std::vector<comm::Work> act_sent(static_cast<std::size_t>(slots_)),
      grad_sent(static_cast<std::size_t>(slots_));
  auto slot_of = [&](const PipeAction& a) { return pipe_slot(a.micro, a.chunk, per_chunk_); };
  const bool tracing = trace_ != nullptr && trace_->active();
  // Per in-flight send: its trace name.
  std::vector<std::string> act_name(static_cast<std::size_t>(slots_)),
      grad_name(static_cast<std::size_t>(slots_));
  auto wait = [&](comm::Work& w, const std::string& name = {}) {
    if (!w.defined()) return;
    const auto t0 = Clock::now();
    try {
      w.wait();
    } catch (const CommTimeout& e) {
      // A neighbour that is alive but never sent is itself waiting on a stage further along
      // (a pipeline stalls from the fault outward, and the stage nearest the start posted
      // first, so it times out first). Give the stage next to the fault, whose own liveness
      // check names the lost rank, the time to report and end the job before this one does.
      if (std::string_view(e.what()).find("it is alive") != std::string_view::npos) {
        log::warn("pipeline stage {}: {}; waiting {} s for the stage next to the fault to name it",
                  rank, e.what(), kNeighbourGraceS);
        std::this_thread::sleep_for(std::chrono::seconds(kNeighbourGraceS));
      }
      throw;
    }
    st.wait_ms += ms_since(t0);
    if (tracing && !name.empty())
      trace_->complete(name, Trace::kP2p, w.posted_at(), w.completed_at().value_or(Clock::now()));
    w = comm::Work();
  };
  // "F3", "B3"; "F3.c1" for chunk 1 (to_string's names for the computes).
  auto traced = [&](const PipeAction& a, Clock::time_point t0) {
    if (tracing) trace_->complete(to_string(a), Trace::kCompute, t0, Clock::now());
  };
  auto chunk_suffix = [](const PipeAction& a) {
    return a.chunk != 0 ? ".c" + std::to_string(a.chunk) : std::string();
  };
  for (std::size_t i = 0; i < actions.size();) {
    const PipeAction& a = actions[i];
    const int slot = slot_of(a);
    const auto us = static_cast<std::size_t>(slot);
    if (a.kind == PipeAction::kForward) {
      wait(act_sent[us], act_name[us]);
      const auto t0 = Clock::now();
      stage.forward(slot, a.micro, a.chunk);
      st.compute_ms += ms_since(t0);
      traced(a, t0);
      ++i;
      continue;
    }
    if (a.kind == PipeAction::kBackward) {
      const bool last = rank + 1 == stages && a.chunk + 1 == chunks_;
      const auto t0 = Clock::now();
      stage.backward(slot, a.micro, a.chunk, last ? Tensor() : grad_in_[us]);
      if (rank > 0 || a.chunk > 0) {
        wait(grad_sent[us], grad_name[us]);
        const Tensor g = stage.input_grad();
        if (!grad_out_[us].defined())
          grad_out_[us] = Tensor::empty(g.shape(), g.dtype(), g.device());
        grad_out_[us].copy_from(g);
      }
      st.compute_ms += ms_since(t0);
      traced(a, t0);
      ++i;
      continue;
    }
    // A group: the point-to-point actions up to the next compute, posted as one exchange.
    std::vector<comm::P2pOp> ops;
    std::vector<std::pair<PipeAction, int>> what;  // action, slot
    for (; i < actions.size() && !actions[i].compute(); ++i) {
      const PipeAction& p = actions[i];
      const int ps = slot_of(p);
      const auto ups = static_cast<std::size_t>(ps);
      switch (p.kind) {
        case PipeAction::kRecvForward:
          ops.push_back(comm::P2pOp::recv(stage.stage_input(ps), prev));
          break;
        case PipeAction::kSendForward:
          ops.push_back(comm::P2pOp::send(stage.stage_output(ps), next));
          break;
        case PipeAction::kRecvBackward: {
          if (!grad_in_[ups].defined()) {
            const Tensor o = stage.stage_output(ps);
            grad_in_[ups] = Tensor::empty(o.shape(), o.dtype(), o.device());
          }
          ops.push_back(comm::P2pOp::recv(grad_in_[ups], next));
          break;
        }
        case PipeAction::kSendBackward:
          MT_ASSERT(grad_out_[ups].defined(), "send of a gradient before its backward");
          ops.push_back(comm::P2pOp::send(grad_out_[ups], prev));
          break;
        default:
          MT_ASSERT(false, "unreachable");
      }
      what.emplace_back(p, ps);
    }
    std::vector<comm::Work> works = pp_->exchange(std::move(ops));
    MT_ASSERT(works.size() == what.size(), "exchange returned {} works for {} ops", works.size(),
              what.size());
    for (std::size_t k = 0; k < works.size(); ++k) {
      const auto [p, ps] = what[k];
      const auto ups = static_cast<std::size_t>(ps);
      if (p.kind == PipeAction::kSendForward) {
        st.bytes_sent += static_cast<std::int64_t>(stage.stage_output(ps).nbytes());
        act_sent[ups] = works[k];
        if (tracing)
          act_name[ups] = fmt::format("send F{}{} -> stage {}", p.micro, chunk_suffix(p), next);
      } else if (p.kind == PipeAction::kSendBackward) {
        st.bytes_sent += static_cast<std::int64_t>(grad_out_[ups].nbytes());
        grad_sent[ups] = works[k];
        if (tracing)
          grad_name[ups] = fmt::format("send B{}{} -> stage {}", p.micro, chunk_suffix(p), prev);
      }
    }
    // Receives are waited for before the next compute, which may need them.
    for (std::size_t k = 0; k < works.size(); ++k) {
      const PipeAction& p = what[k].first;
      if (is_send(p)) continue;
      const bool fwd = p.kind == PipeAction::kRecvForward;
      wait(works[k], tracing ? fmt::format("recv {}{}{} <- stage {}", fwd ? "F" : "B", p.micro,
                                           chunk_suffix(p), fwd ? prev : next)
                             : std::string());
    }
  }
  for (std::size_t s = 0; s < act_sent.size(); ++s) wait(act_sent[s], act_name[s]);
  for (std::size_t s = 0; s < grad_sent.size(); ++s) wait(grad_sent[s], grad_name[s]);
  return st;
}

}  // namespace meshtrain::parallel
