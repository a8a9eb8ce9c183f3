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

// The peer of a point-to-point action of stage s, or -1 for a compute.
int peer_of(const PipeAction& a, int s) {
  switch (a.kind) {
    case PipeAction::kSendForward:
    case PipeAction::kRecvBackward:
      return s + 1;
    case PipeAction::kRecvForward:
    case PipeAction::kSendBackward:
      return s - 1;
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
  MT_FAIL("{} = \"{}\": unknown pipeline schedule; expected \"gpipe\" or \"1f1b\"", key, name);
}

const char* pipe_schedule_name(PipeSchedule s) {
  return s == PipeSchedule::kGPipe ? "gpipe" : "1f1b";
}

StageRange stage_range(int layers, int stages, int stage) {
  MT_CHECK(stages >= 1 && stage >= 0 && stage < stages, "stage {} is outside [0, {})", stage,
           stages);
  MT_CHECK(layers >= stages,
           "a model of {} layers (model.n_layer) cannot be split into {} pipeline stages "
           "(train.pp = {}): every stage needs at least one layer",
           layers, stages, stages);
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
  return names[a.kind] + std::to_string(a.micro);
}

std::vector<PipeAction> build_schedule(PipeSchedule schedule, int stages, int stage,
                                       int micro_batches) {
  check_shape(stages, stage, micro_batches);
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

std::vector<PipeAction> build_forward_only(int stages, int stage, int micro_batches) {
  check_shape(stages, stage, micro_batches);
  std::vector<PipeAction> out;
  for (int m = 0; m < micro_batches; ++m) {
    if (stage > 0) out.push_back({PipeAction::kRecvForward, m});
    out.push_back({PipeAction::kForward, m});
    if (stage + 1 < stages) out.push_back({PipeAction::kSendForward, m});
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

std::string check_schedule(const std::vector<std::vector<PipeAction>>& per_stage) {
  const int stages = static_cast<int>(per_stage.size());
  if (stages == 0) return "no stages";
  // Each stage: its computes and point-to-point in a consistent order.
  int micro = -1;
  for (int s = 0; s < stages; ++s) {
    const auto& acts = per_stage[static_cast<std::size_t>(s)];
    std::map<std::pair<int, int>, int> at;  // (kind, micro) -> index
    int forwards = 0, backwards = 0;
    for (int i = 0; i < static_cast<int>(acts.size()); ++i) {
      const PipeAction& a = acts[static_cast<std::size_t>(i)];
      if (!at.emplace(std::make_pair(static_cast<int>(a.kind), a.micro), i).second)
        return fmt::format("stage {}: {} appears twice", s, to_string(a));
      const int peer = peer_of(a, s);
      if (!a.compute() && (peer < 0 || peer >= stages))
        return fmt::format("stage {}: {} has no peer stage", s, to_string(a));
      forwards += a.kind == PipeAction::kForward;
      backwards += a.kind == PipeAction::kBackward;
    }
    if (micro < 0) micro = forwards;
    if (forwards != micro || (backwards != 0 && backwards != micro))
      return fmt::format("stage {}: {} forwards and {} backwards, expected {} each", s, forwards,
                         backwards, micro);
    auto idx = [&](PipeAction::Kind k, int m) {
      auto it = at.find({static_cast<int>(k), m});
      return it == at.end() ? -1 : it->second;
    };
    for (int m = 0; m < micro; ++m) {
      const int f = idx(PipeAction::kForward, m), b = idx(PipeAction::kBackward, m);
      if (f < 0) return fmt::format("stage {}: no forward of micro-batch {}", s, m);
      if (backwards > 0 && (b < 0 || b < f))
        return fmt::format("stage {}: backward of micro-batch {} missing or before its forward", s,
                           m);
      const int rf = idx(PipeAction::kRecvForward, m), sf = idx(PipeAction::kSendForward, m);
      if ((s > 0) != (rf >= 0) || (rf >= 0 && rf > f))
        return fmt::format("stage {}: receive of micro-batch {}'s activations misplaced", s, m);
      if ((s + 1 < stages) != (sf >= 0) || (sf >= 0 && sf < f))
        return fmt::format("stage {}: send of micro-batch {}'s activations misplaced", s, m);
      if (backwards > 0) {
        const int rb = idx(PipeAction::kRecvBackward, m), sb = idx(PipeAction::kSendBackward, m);
        if ((s + 1 < stages) != (rb >= 0) || (rb >= 0 && rb > b))
          return fmt::format("stage {}: receive of micro-batch {}'s gradient misplaced", s, m);
        if ((s > 0) != (sb >= 0) || (sb >= 0 && sb < b))
          return fmt::format("stage {}: send of micro-batch {}'s gradient misplaced", s, m);
      }
    }
  }
  // FIFO matching per (sender, receiver): the k-th send is received by the k-th receive, which
  // must be of the same micro-batch and kind.
  std::map<std::pair<int, int>, std::vector<PipeAction>> sends, recvs;
  for (int s = 0; s < stages; ++s)
    for (const PipeAction& a : per_stage[static_cast<std::size_t>(s)]) {
      if (a.compute()) continue;
      const int p = peer_of(a, s);
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
      if (fwd != rfwd || list[k].micro != r[k].micro)
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
            const int p = peer_of(acts[j], s);
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

PipelineExecutor::PipelineExecutor(comm::Communicator& pp, int slots) : pp_(&pp), slots_(slots) {
  MT_CHECK(slots >= 1, "PipelineExecutor: slots must be at least 1, got {}", slots);
  grad_in_.resize(static_cast<std::size_t>(slots));
  grad_out_.resize(static_cast<std::size_t>(slots));
}

PipeStats PipelineExecutor::run(PipelineStage& stage, const std::vector<PipeAction>& actions) {
  const int rank = pp_->valid() ? pp_->rank() : 0;
  const int stages = pp_->valid() ? pp_->size() : 1;
  MT_ASSERT(max_in_flight(actions) <= slots_, "schedule needs {} slots, the stage has {}",
            max_in_flight(actions), slots_);
  PipeStats st;
  // Sends in flight per slot: the buffer they read is not written until they complete.
  std::vector<comm::Work> act_sent(static_cast<std::size_t>(slots_)),
      grad_sent(static_cast<std::size_t>(slots_));
  auto slot_of = [&](int micro) { return micro % slots_; };
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
  auto traced = [&](const char* what, int micro, Clock::time_point t0) {
    if (tracing) trace_->complete(what + std::to_string(micro), Trace::kCompute, t0, Clock::now());
  };
  for (std::size_t i = 0; i < actions.size();) {
    const PipeAction& a = actions[i];
    const int slot = slot_of(a.micro);
    const auto us = static_cast<std::size_t>(slot);
    if (a.kind == PipeAction::kForward) {
      wait(act_sent[us], act_name[us]);
      const auto t0 = Clock::now();
      stage.forward(slot, a.micro);
      st.compute_ms += ms_since(t0);
      traced("F", a.micro, t0);
      ++i;
      continue;
    }
    if (a.kind == PipeAction::kBackward) {
      const bool last = rank + 1 == stages;
      const auto t0 = Clock::now();
      stage.backward(slot, a.micro, last ? Tensor() : grad_in_[us]);
      if (rank > 0) {
        wait(grad_sent[us], grad_name[us]);
        const Tensor g = stage.input_grad();
        if (!grad_out_[us].defined())
          grad_out_[us] = Tensor::empty(g.shape(), g.dtype(), g.device());
        grad_out_[us].copy_from(g);
      }
      st.compute_ms += ms_since(t0);
      traced("B", a.micro, t0);
      ++i;
      continue;
    }
    // A group: the point-to-point actions up to the next compute, posted as one exchange.
    std::vector<comm::P2pOp> ops;
    std::vector<std::pair<PipeAction, int>> what;  // action, slot
    for (; i < actions.size() && !actions[i].compute(); ++i) {
      const PipeAction& p = actions[i];
      const int ps = slot_of(p.micro);
      const auto ups = static_cast<std::size_t>(ps);
      switch (p.kind) {
        case PipeAction::kRecvForward:
          ops.push_back(comm::P2pOp::recv(stage.stage_input(ps), rank - 1));
          break;
        case PipeAction::kSendForward:
          ops.push_back(comm::P2pOp::send(stage.stage_output(ps), rank + 1));
          break;
        case PipeAction::kRecvBackward: {
          if (!grad_in_[ups].defined()) {
            const Tensor o = stage.stage_output(ps);
            grad_in_[ups] = Tensor::empty(o.shape(), o.dtype(), o.device());
          }
          ops.push_back(comm::P2pOp::recv(grad_in_[ups], rank + 1));
          break;
        }
        case PipeAction::kSendBackward:
          MT_ASSERT(grad_out_[ups].defined(), "send of a gradient before its backward");
          ops.push_back(comm::P2pOp::send(grad_out_[ups], rank - 1));
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
        if (tracing) act_name[ups] = fmt::format("send F{} -> stage {}", p.micro, rank + 1);
      } else if (p.kind == PipeAction::kSendBackward) {
        st.bytes_sent += static_cast<std::int64_t>(grad_out_[ups].nbytes());
        grad_sent[ups] = works[k];
        if (tracing) grad_name[ups] = fmt::format("send B{} -> stage {}", p.micro, rank - 1);
      }
    }
    // Receives are waited for before the next compute, which may need them.
    for (std::size_t k = 0; k < works.size(); ++k) {
      const PipeAction& p = what[k].first;
      if (is_send(p)) continue;
      const bool fwd = p.kind == PipeAction::kRecvForward;
      wait(works[k], tracing ? fmt::format("recv {}{} <- stage {}", fwd ? "F" : "B", p.micro,
                                           fwd ? rank - 1 : rank + 1)
                             : std::string());
    }
  }
  for (std::size_t s = 0; s < act_sent.size(); ++s) wait(act_sent[s], act_name[s]);
  for (std::size_t s = 0; s < grad_sent.size(); ++s) wait(grad_sent[s], grad_name[s]);
  return st;
}

}  // namespace meshtrain::parallel
