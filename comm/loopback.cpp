#include "comm/loopback.hpp"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>

#include "runtime/error.hpp"
#include "runtime/log.hpp"

namespace meshtrain::comm {

namespace detail {
struct LoopbackGroup;

// One per world. Every group of the world shares the mutex and the condition variable: loopback
// is for tests and single-process runs, where simplicity beats lock granularity.
struct LoopbackState {
  std::mutex mu;
  std::condition_variable cv;
  bool aborted = false;
  std::string abort_reason;
};

// One collective (one sequence number) of one group, filled in as ranks arrive.
struct Slot {
  explicit Slot(int n)
      : calls(n), ins(n), outs(n), arrived(n, false), split_groups(n), split_rank(n, -1) {}
  std::vector<Collective> calls;
  std::vector<Tensor> ins, outs;
  std::vector<bool> arrived;
  int n_arrived = 0;
  bool done = false;
  std::string error;  // a mismatch: every rank's work fails with it
  std::vector<std::shared_ptr<LoopbackGroup>> split_groups;
  std::vector<int> split_rank;
};

// One message (a send and its recv: the same sender, receiver and number), filled in as the two
// ranks post. Completes, for both, when both have posted (loopback sends are rendezvous).
struct P2pSlot {
  Collective send_call, recv_call;
  Tensor send, recv;
  bool has_send = false, has_recv = false;
  bool done = false;
  std::string error;  // a mismatch: both works fail with it
};

struct LoopbackGroup {
  std::shared_ptr<detail::LoopbackState> world;
  std::string name;
  std::vector<int> world_ranks;
  // Guarded by world->mu.
  std::map<std::uint64_t, std::shared_ptr<Slot>> slots;
  std::vector<Collective> last_posted;  // per rank; seq 0 = nothing posted yet
  // Point-to-point, guarded by world->mu: messages by (sender, receiver, number) while one side
  // has posted, and what each rank posted toward each other rank, by (from, to).
  struct Posted {
    std::uint64_t sends = 0, recvs = 0;
    std::optional<Collective> last_send, last_recv;
  };
  std::map<std::tuple<int, int, std::uint64_t>, std::shared_ptr<P2pSlot>> messages;
  std::map<std::pair<int, int>, Posted> p2p_posted;

  int size() const { return static_cast<int>(world_ranks.size()); }
};
}  // namespace detail

namespace {

using Clock = std::chrono::steady_clock;
using detail::Slot;
using LoopGroup = detail::LoopbackGroup;

float combine(ReduceOp op, float a, float b) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return a + b;
    case ReduceOp::kMax:
      return std::max(a, b);
    case ReduceOp::kMin:
      return std::min(a, b);
  }
  return a;
}

// acc[i] = reduction over ranks (in rank order, in fp32) of element `offset + i` of every input.
std::vector<float> reduce_inputs(const Slot& s, ReduceOp op, std::int64_t offset, std::int64_t n) {
  std::vector<float> acc(static_cast<std::size_t>(n));
  std::vector<float> tmp(static_cast<std::size_t>(n));
  for (std::size_t r = 0; r < s.ins.size(); ++r) {
    const Tensor& in = s.ins[r];
    const auto* src = static_cast<const std::uint8_t*>(in.data()) + offset * dtype_size(in.dtype());
    convert_host(r == 0 ? acc.data() : tmp.data(), DType::kF32, src, in.dtype(),
                 static_cast<std::size_t>(n));
    if (r == 0) continue;
    for (std::size_t i = 0; i < acc.size(); ++i) acc[i] = combine(op, acc[i], tmp[i]);
  }
  if (op == ReduceOp::kAvg) {
    const float inv = 1.0f / static_cast<float>(s.ins.size());
    for (float& x : acc) x *= inv;
  }
  return acc;
}

// Runs the collective once every rank has arrived. Called with world->mu held.
void execute(LoopGroup& g, Slot& s) {
  s.error = first_mismatch(s.calls, g.name);
  if (!s.error.empty()) return;
  const Collective& c = s.calls[0];
  const int n = g.size();
  switch (c.op) {
    case OpType::kAllreduce: {
      // Every input is read before any output is written: in-place calls alias them.
      const auto acc = reduce_inputs(s, c.reduce, 0, c.in_shape.numel());
      for (int r = 0; r < n; ++r) {
        convert_host(s.outs[r].data(), s.outs[r].dtype(), acc.data(), DType::kF32, acc.size());
      }
      break;
    }
    case OpType::kReduceScatter: {
      const std::int64_t m = c.out_numel;
      for (int r = 0; r < n; ++r) {
        const auto acc = reduce_inputs(s, c.reduce, r * m, m);
        convert_host(s.outs[r].data(), s.outs[r].dtype(), acc.data(), DType::kF32, acc.size());
      }
      break;
    }
    case OpType::kAllGather: {
      const std::size_t chunk = s.ins[0].nbytes();
      for (int r = 0; r < n; ++r) {
        auto* dst = static_cast<std::uint8_t*>(s.outs[r].data());
        // An input may be its own rank's chunk of that rank's output: memmove onto itself.
        for (int q = 0; q < n; ++q) std::memmove(dst + q * chunk, s.ins[q].data(), chunk);
      }
      break;
    }
    case OpType::kBroadcast: {
      const Tensor& src = s.ins[c.root];
      for (int r = 0; r < n; ++r) {
        if (r != c.root) std::memcpy(s.outs[r].data(), src.data(), src.nbytes());
      }
      break;
    }
    case OpType::kBarrier:
      break;
    case OpType::kSplit: {
      std::map<int, std::vector<int>> by_color;
      for (int r = 0; r < n; ++r) {
        if (s.calls[r].color >= 0) by_color[s.calls[r].color].push_back(r);
      }
      for (auto& [color, members] : by_color) {
        std::stable_sort(members.begin(), members.end(),
                         [&](int a, int b) { return s.calls[a].key < s.calls[b].key; });
        auto child = std::make_shared<LoopGroup>();
        child->world = g.world;
        child->name = fmt::format("{}/{}", g.name, color);
        for (int m : members) child->world_ranks.push_back(g.world_ranks[m]);
        child->last_posted.resize(members.size());
        for (std::size_t i = 0; i < members.size(); ++i) {
          s.split_groups[members[i]] = child;
          s.split_rank[members[i]] = static_cast<int>(i);
        }
      }
      break;
    }
    case OpType::kSend:
    case OpType::kRecv:
      MT_ASSERT(false, "{} is posted by post_p2p", c.str());
      break;
  }
}

class LoopWork final : public WorkImpl {
 public:
  LoopWork(const Collective& c, Clock::time_point deadline, int rank, double timeout_s,
           std::shared_ptr<LoopGroup> group, std::shared_ptr<Slot> slot)
      : WorkImpl(c, deadline),
        rank_(rank),
        timeout_s_(timeout_s),
        group_(std::move(group)),
        slot_(std::move(slot)) {}

  bool progress() override {
    std::lock_guard lock(group_->world->mu);
    return done_locked();
  }

  bool wait_until(Clock::time_point until) override {
    std::unique_lock lock(group_->world->mu);
    group_->world->cv.wait_until(lock, until,
                                 [&] { return slot_->done || group_->world->aborted; });
    return done_locked();
  }

  std::string describe_timeout() override {
    std::lock_guard lock(group_->world->mu);
    std::vector<int> missing;
    std::vector<std::string> last;
    for (int r = 0; r < group_->size(); ++r) {
      if (slot_->arrived[r]) continue;
      missing.push_back(r);
      const Collective& lp = group_->last_posted[r];
      last.push_back(lp.seq == 0 ? "" : lp.str());
    }
    return timeout_message(collective(), "loopback", group_->name, rank_, group_->world_ranks,
                           timeout_s_, missing, last);
  }

 private:
  bool done_locked() {
    if (group_->world->aborted) throw Error(group_->world->abort_reason);
    if (!slot_->done) return false;
    if (!slot_->error.empty()) throw InvalidArgument(slot_->error);
    return true;
  }

  int rank_;
  double timeout_s_;
  std::shared_ptr<LoopGroup> group_;
  std::shared_ptr<Slot> slot_;
};

// One send or recv: done when the peer has posted the matching op and the data was copied.
class LoopP2pWork final : public WorkImpl {
 public:
  LoopP2pWork(const Collective& c, Clock::time_point deadline, int rank, double timeout_s,
              std::shared_ptr<LoopGroup> group, std::shared_ptr<detail::P2pSlot> slot)
      : WorkImpl(c, deadline),
        rank_(rank),
        timeout_s_(timeout_s),
        group_(std::move(group)),
        slot_(std::move(slot)) {}

  bool progress() override {
    std::lock_guard lock(group_->world->mu);
    return done_locked();
  }

  bool wait_until(Clock::time_point until) override {
    std::unique_lock lock(group_->world->mu);
    group_->world->cv.wait_until(lock, until,
                                 [&] { return slot_->done || group_->world->aborted; });
    return done_locked();
  }

  std::string describe_timeout() override {
    std::lock_guard lock(group_->world->mu);
    const Collective& c = collective();
    // The peer has not posted the matching op: it would have completed this one at once.
    PeerP2p peer;
    if (const auto it = group_->p2p_posted.find({c.peer, rank_}); it != group_->p2p_posted.end()) {
      peer.sends = it->second.sends;
      peer.recvs = it->second.recvs;
      peer.last = c.op == OpType::kRecv ? it->second.last_send : it->second.last_recv;
    }
    return p2p_timeout_message(c, "loopback", group_->name, rank_, group_->world_ranks, timeout_s_,
                               peer);
  }

 private:
  bool done_locked() {
    if (group_->world->aborted) throw Error(group_->world->abort_reason);
    if (!slot_->done) return false;
    if (!slot_->error.empty()) throw InvalidArgument(slot_->error);
    return true;
  }

  int rank_;
  double timeout_s_;
  std::shared_ptr<LoopGroup> group_;
  std::shared_ptr<detail::P2pSlot> slot_;
};

class LoopBackend final : public Backend {
 public:
  LoopBackend(std::shared_ptr<LoopGroup> group, int rank, CommOptions options)
      : Backend(GroupInfo{rank, group->size(), group->name, group->world_ranks}),
        group_(std::move(group)),
        rank_(rank),
        options_(options) {}

  std::string_view kind() const override { return "loopback"; }
  bool accepts(const Device& device) const override { return device.is_cpu(); }

  std::shared_ptr<WorkImpl> post(const Collective& c, const Tensor& in,
                                 const Tensor& out) override {
    auto slot = arrive(c, in, out);
    auto work = std::make_shared<LoopWork>(c, Clock::now() + options_.timeout(), rank_,
                                           options_.timeout_s, group_, slot);
    if (options_.debug) {
      // As the MPI backend does in debug mode: nothing starts until every rank's call is known,
      // and a mismatch is thrown by the call itself on every rank.
      std::unique_lock lock(group_->world->mu);
      const bool all = group_->world->cv.wait_until(lock, work->deadline(), [&] {
        return slot->n_arrived == size() || group_->world->aborted;
      });
      lock.unlock();
      if (!all) throw CommTimeout(work->describe_timeout());
      work->progress();  // throws the mismatch or the abort
    }
    return work;
  }

  std::unique_ptr<Backend> split(const Collective& c) override {
    auto slot = arrive(c, Tensor(), Tensor());
    LoopWork work(c, Clock::now() + options_.timeout(), rank_, options_.timeout_s, group_, slot);
    if (!work.wait_until(work.deadline())) throw CommTimeout(work.describe_timeout());
    std::lock_guard lock(group_->world->mu);
    if (!slot->split_groups[rank_]) return nullptr;
    return std::make_unique<LoopBackend>(slot->split_groups[rank_], slot->split_rank[rank_],
                                         options_);
  }

  std::vector<std::shared_ptr<WorkImpl>> post_p2p(const std::vector<P2pCall>& calls) override {
    auto& w = *group_->world;
    std::vector<std::shared_ptr<WorkImpl>> works;
    const auto deadline = Clock::now() + options_.timeout();
    std::lock_guard lock(w.mu);
    if (w.aborted) throw Error(w.abort_reason);
    for (const P2pCall& call : calls) {
      const Collective& c = call.c;
      const bool is_send = c.op == OpType::kSend;
      const int from = is_send ? rank_ : c.peer;
      const int to = is_send ? c.peer : rank_;
      auto& slot = group_->messages[{from, to, c.seq}];
      if (!slot) slot = std::make_shared<detail::P2pSlot>();
      MT_ASSERT(!(is_send ? slot->has_send : slot->has_recv),
                "rank {} posted {} twice on group '{}'", rank_, c.str(), group_->name);
      (is_send ? slot->send_call : slot->recv_call) = c;
      (is_send ? slot->send : slot->recv) = call.tensor;
      (is_send ? slot->has_send : slot->has_recv) = true;
      auto& mine = group_->p2p_posted[{rank_, c.peer}];
      (is_send ? mine.sends : mine.recvs) = c.seq;
      (is_send ? mine.last_send : mine.last_recv) = c;
      works.push_back(
          std::make_shared<LoopP2pWork>(c, deadline, rank_, options_.timeout_s, group_, slot));
      if (slot->has_send && slot->has_recv) {
        deliver(*slot);
        group_->messages.erase({from, to, c.seq});
        w.cv.notify_all();
      }
    }
    return works;
  }

  void finalize() override {}
  // Slots hold their tensors until the last rank arrives: nothing needs leaking.
  bool abandon() noexcept override { return false; }

  void abort(int code) noexcept override {
    auto& w = *group_->world;
    std::lock_guard lock(w.mu);
    if (!w.aborted) {
      w.aborted = true;
      w.abort_reason =
          fmt::format("the loopback world was aborted by rank {} of group '{}' (code {})", rank_,
                      group_->name, code);
      log::error("{}", w.abort_reason);
    }
    w.cv.notify_all();
  }

 private:
  std::shared_ptr<Slot> arrive(const Collective& c, const Tensor& in, const Tensor& out) {
    auto& w = *group_->world;
    std::lock_guard lock(w.mu);
    if (w.aborted) throw Error(w.abort_reason);
    auto& slot = group_->slots[c.seq];
    if (!slot) slot = std::make_shared<Slot>(size());
    MT_ASSERT(!slot->arrived[rank_], "rank {} posted sequence number {} twice on group '{}'", rank_,
              c.seq, group_->name);
    slot->calls[rank_] = c;
    slot->ins[rank_] = in;
    slot->outs[rank_] = out;
    slot->arrived[rank_] = true;
    group_->last_posted[rank_] = c;
    auto result = slot;
    if (++slot->n_arrived == size()) {
      execute(*group_, *slot);
      slot->done = true;
      // Inputs and outputs are released here; the works keep the slot for its status only.
      slot->ins.assign(slot->ins.size(), Tensor());
      slot->outs.assign(slot->outs.size(), Tensor());
      group_->slots.erase(c.seq);
      w.cv.notify_all();
    }
    return result;
  }

  // Copies a message once both sides have posted, or records why it cannot be: loopback compares
  // dtype and shape always (not only the byte counts), as it checks collectives' signatures.
  // Called with world->mu held.
  void deliver(detail::P2pSlot& s) {
    s.error = p2p_mismatch(s.recv_call, s.send_call, group_->name);
    if (s.error.empty() && s.send.nbytes() > 0)
      std::memmove(s.recv.data(), s.send.data(), s.send.nbytes());
    s.done = true;
    s.send = Tensor();
    s.recv = Tensor();
  }

  std::shared_ptr<LoopGroup> group_;
  int rank_;
  CommOptions options_;
};

}  // namespace

LoopbackWorld::LoopbackWorld(int size, CommOptions options)
    : size_(size),
      options_(options),
      state_(std::make_shared<detail::LoopbackState>()),
      taken_(static_cast<std::size_t>(std::max(size, 0)), false) {
  MT_CHECK(size >= 1, "a loopback world needs at least 1 rank, got {}", size);
}

LoopbackWorld::~LoopbackWorld() = default;
LoopbackWorld::LoopbackWorld(LoopbackWorld&&) noexcept = default;
LoopbackWorld& LoopbackWorld::operator=(LoopbackWorld&&) noexcept = default;

Communicator LoopbackWorld::take(int rank) {
  MT_CHECK(rank >= 0 && rank < size_, "loopback rank {} out of range [0, {})", rank, size_);
  MT_CHECK(!taken_[rank], "the loopback communicator of rank {} was already taken", rank);
  if (!world_group_) {
    auto g = std::make_shared<LoopGroup>();
    g->world = state_;
    g->name = "world";
    for (int r = 0; r < size_; ++r) g->world_ranks.push_back(r);
    g->last_posted.resize(size_);
    world_group_ = g;
  }
  taken_[rank] = true;
  return Communicator(std::make_unique<LoopBackend>(world_group_, rank, options_), options_);
}

void LoopbackWorld::run(const std::function<void(Communicator&)>& fn) {
  std::vector<Communicator> comms;
  for (int r = 0; r < size_; ++r) comms.push_back(take(r));
  std::mutex mu;
  std::exception_ptr first;
  std::vector<std::thread> threads;
  for (int r = 0; r < size_; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(comms[r]);
        comms[r].finalize();
      } catch (...) {
        {
          std::lock_guard lock(mu);
          if (!first) first = std::current_exception();
        }
        // The other ranks may be waiting for this one: fail them now rather than at the timeout.
        comms[r].abort(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  comms.clear();
  if (first) std::rethrow_exception(first);
}

}  // namespace meshtrain::comm
