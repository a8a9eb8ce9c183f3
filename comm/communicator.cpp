#include "comm/communicator.hpp"

#include <algorithm>
#include <mutex>
#include <thread>
#include <utility>

#include "runtime/error.hpp"
#include "runtime/log.hpp"
#include "runtime/settings.hpp"

namespace meshtrain::comm {

namespace detail {
// Shared by a communicator and its Work handles: the first failure makes the group unusable.
struct GroupHealth {
  std::mutex mu;
  bool failed = false;
  bool timed_out = false;
  std::string first_error;

  void mark(const std::string& what, bool timeout) {
    std::lock_guard lock(mu);
    if (failed) return;
    failed = true;
    timed_out = timeout;
    first_error = what;
  }
  bool is_failed() {
    std::lock_guard lock(mu);
    return failed;
  }
};
}  // namespace detail

std::string_view reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kAvg:
      return "avg";
    case ReduceOp::kMax:
      return "max";
    case ReduceOp::kMin:
      return "min";
  }
  return "?";
}

std::string_view op_name(OpType op) {
  switch (op) {
    case OpType::kAllreduce:
      return "allreduce";
    case OpType::kReduceScatter:
      return "reduce_scatter";
    case OpType::kAllGather:
      return "all_gather";
    case OpType::kBroadcast:
      return "broadcast";
    case OpType::kBarrier:
      return "barrier";
    case OpType::kSplit:
      return "split";
    case OpType::kSend:
      return "send";
    case OpType::kRecv:
      return "recv";
  }
  return "?";
}

std::string Collective::str() const {
  const std::string head = fmt::format("{} #{}", op_name(op), seq);
  const std::string buf = fmt::format("{}{}", dtype_name(dtype), in_shape.str());
  switch (op) {
    case OpType::kAllreduce:
      return fmt::format("{} ({}, {})", head, reduce_op_name(reduce), buf);
    case OpType::kReduceScatter:
      return fmt::format("{} ({}, {} -> {} elements)", head, reduce_op_name(reduce), buf,
                         out_numel);
    case OpType::kAllGather:
      return fmt::format("{} ({} -> {} elements)", head, buf, out_numel);
    case OpType::kBroadcast:
      return fmt::format("{} (root {}, {})", head, root, buf);
    case OpType::kBarrier:
      return head;
    case OpType::kSplit:
      return fmt::format("{} (color {}, key {})", head, color, key);
    case OpType::kSend:
    case OpType::kRecv:
      return fmt::format("{} {} rank {}{} ({})", head, op == OpType::kSend ? "to" : "from", peer,
                         label.empty() ? "" : ", " + label, buf);
  }
  return head;
}

bool Collective::same_call(const Collective& o) const {
  if (op != o.op || seq != o.seq) return false;
  switch (op) {
    case OpType::kBarrier:
    case OpType::kSplit:
      return true;
    case OpType::kAllreduce:
    case OpType::kReduceScatter:
      return reduce == o.reduce && dtype == o.dtype && in_shape == o.in_shape &&
             out_numel == o.out_numel;
    case OpType::kAllGather:
      return dtype == o.dtype && in_shape == o.in_shape && out_numel == o.out_numel;
    case OpType::kBroadcast:
      return root == o.root && dtype == o.dtype && in_shape == o.in_shape;
    case OpType::kSend:
    case OpType::kRecv:
      return peer == o.peer && dtype == o.dtype && in_shape == o.in_shape;
  }
  return false;
}

std::string first_mismatch(const std::vector<Collective>& calls, std::string_view group) {
  for (std::size_t r = 1; r < calls.size(); ++r) {
    if (!calls[r].same_call(calls[0])) {
      return fmt::format(
          "collective mismatch on group '{}': rank {} called {}, but rank 0 called {} (every rank "
          "must issue the same collectives in the same order with the same dtype and shape)",
          group, r, calls[r].str(), calls[0].str());
    }
  }
  return "";
}

std::string p2p_mismatch(const Collective& recv, const Collective& send, std::string_view group) {
  if (recv.dtype == send.dtype && recv.in_shape == send.in_shape) return "";
  return fmt::format(
      "point-to-point mismatch on group '{}': {} was matched by rank {}'s send #{} of {}{} (a send "
      "and its recv must have the same dtype and shape)",
      group, recv.str(), recv.peer, send.seq, dtype_name(send.dtype), send.in_shape.str());
}

namespace {

// "rank 3", or "rank 3 (world rank 7)" when the group is not the world.
std::string group_rank_name(int r, const std::vector<int>& world_ranks) {
  std::string out = fmt::format("rank {}", r);
  if (r >= 0 && r < static_cast<int>(world_ranks.size()) && world_ranks[r] != r)
    out += fmt::format(" (world rank {})", world_ranks[r]);
  return out;
}

std::string stall_words(double seconds) {
  return fmt::format(
      "did not run for {:.1f} s (stopped, e.g. by SIGSTOP, or starved of CPU) and answered a "
      "liveness check only after it resumed",
      seconds);
}

}  // namespace

std::string p2p_timeout_message(const Collective& c, std::string_view kind, std::string_view group,
                                int rank, const std::vector<int>& world_ranks, double timeout_s,
                                const std::optional<PeerP2p>& peer,
                                const std::optional<LivenessReport>& liveness) {
  const std::string head = fmt::format(
      "{} on group '{}' ({}, {} ranks, this is {}) did not complete within {} s", c.str(), group,
      kind, world_ranks.size(), group_rank_name(rank, world_ranks), timeout_s);
  std::string them = fmt::format("rank {}", c.peer);
  {
    std::vector<std::string> details;
    if (c.peer >= 0 && c.peer < static_cast<int>(world_ranks.size()) &&
        world_ranks[c.peer] != c.peer)
      details.push_back(fmt::format("world rank {}", world_ranks[c.peer]));
    if (!c.label.empty()) details.push_back(c.label);
    if (details.size() == 1) them += fmt::format(" ({})", details[0]);
    if (details.size() == 2) them += fmt::format(" ({}, {})", details[0], details[1]);
  }
  const bool is_send = c.op == OpType::kSend;
  const std::string want =
      fmt::format("{} #{} {} this rank", is_send ? "recv" : "send", c.seq, is_send ? "from" : "to");
  auto describe = [](const Collective& x) {
    return fmt::format("{} #{} ({}{})", op_name(x.op), x.seq, dtype_name(x.dtype),
                       x.in_shape.str());
  };
  // What the liveness check said of the peer: "" (no check), or words after "it".
  bool lost = false;
  double stalled = 0;
  if (liveness) {
    lost = std::find(liveness->lost.begin(), liveness->lost.end(), c.peer) != liveness->lost.end();
    for (const auto& [g, seconds] : liveness->stalled)
      if (g == c.peer) stalled = seconds;
  }
  const std::string lost_words =
      liveness
          ? fmt::format(
                "did not answer a liveness check within {} s: lost (exited, killed or stopped)",
                liveness->window_s)
          : std::string();
  std::string reason;
  if (peer && peer->matching) {
    const Collective& m = *peer->matching;
    if (m.dtype != c.dtype || m.in_shape != c.in_shape) {
      reason = fmt::format(
          "{} posted the matching {} as {}{}, but this {} is {}{}: a send and its recv must have "
          "the same dtype and shape",
          them, want, dtype_name(m.dtype), m.in_shape.str(), op_name(c.op), dtype_name(c.dtype),
          c.in_shape.str());
    } else {
      reason =
          fmt::format("{} posted the matching {}, but the transfer did not complete", them, want);
    }
    if (lost) {
      reason += "; then it " + lost_words;
    } else if (stalled > 0) {
      reason += "; then it " + stall_words(stalled);
    } else if (liveness) {
      reason +=
          "; it is alive (it answered a liveness check): the transfer is not being progressed (a "
          "rank stuck inside an MPI call, or on NCCL an earlier op on the peer's stream that "
          "cannot complete: see the deadlock rule in comm/README.md)";
    }
  } else {
    if (peer) {
      const std::uint64_t posted = is_send ? peer->recvs : peer->sends;
      reason = fmt::format("{} never posted the matching {} (it posted {} {} {} this rank{})", them,
                           want, posted, is_send ? "recvs" : "sends", is_send ? "from" : "to",
                           peer->last ? ", the last " + describe(*peer->last) : std::string());
    } else {
      reason = fmt::format("{} did not complete the matching {}", them, want);
    }
    if (lost) {
      reason += "; it " + lost_words;
    } else if (stalled > 0) {
      reason += "; it " + stall_words(stalled);
    } else if (liveness) {
      reason += fmt::format(
          "; it is alive (it answered a liveness check) but has not posted the {}: it is waiting "
          "or computing elsewhere (two ranks posting their ops in orders that do not match, see "
          "the deadlock rule in comm/README.md)",
          is_send ? "recv" : "send");
    }
  }
  return fmt::format("{}: {}. End the job with abort().", head, reason);
}

std::string timeout_message(const Collective& c, std::string_view kind, std::string_view group,
                            int rank, const std::vector<int>& world_ranks, double timeout_s,
                            const std::vector<int>& missing,
                            const std::vector<std::string>& last_seen,
                            const std::optional<LivenessReport>& liveness) {
  std::string head = fmt::format(
      "{} on group '{}' ({}, {} ranks, this is rank {}) did not complete "
      "within {} s",
      c.str(), group, kind, world_ranks.size(), rank, timeout_s);
  auto rank_name = [&](int r) {
    std::string out = fmt::format("rank {}", r);
    if (r >= 0 && r < static_cast<int>(world_ranks.size()) && world_ranks[r] != r)
      out += fmt::format(" (world rank {})", world_ranks[r]);
    return out;
  };
  auto is_lost = [&](int r) {
    return liveness &&
           std::find(liveness->lost.begin(), liveness->lost.end(), r) != liveness->lost.end();
  };
  // Seconds rank r had not run before it answered (0: it ran, or no check).
  auto stalled_for = [&](int r) {
    if (!liveness) return 0.0;
    for (const auto& [g, seconds] : liveness->stalled)
      if (g == r) return seconds;
    return 0.0;
  };
  const std::string no_answer =
      liveness ? fmt::format("did not answer a liveness check within {} s", liveness->window_s)
               : std::string();
  auto stall_words = [](double seconds) {
    return fmt::format(
        "did not run for {:.1f} s (stopped, e.g. by SIGSTOP, or starved of CPU) and answered a "
        "liveness check only after it resumed",
        seconds);
  };
  // Ranks that posted the collective but are gone, or did not run.
  std::vector<int> lost_arrived;
  std::vector<std::string> stalled_arrived;
  if (liveness) {
    for (int r : liveness->lost) {
      if (std::find(missing.begin(), missing.end(), r) == missing.end()) lost_arrived.push_back(r);
    }
    for (const auto& [r, seconds] : liveness->stalled) {
      if (std::find(missing.begin(), missing.end(), r) == missing.end())
        stalled_arrived.push_back(
            fmt::format("{} posted it, then {}", rank_name(r), stall_words(seconds)));
    }
  }
  std::string lost_text;
  for (int r : lost_arrived) lost_text += (lost_text.empty() ? "" : ", ") + rank_name(r);
  std::string stalled_text;
  for (const std::string& s : stalled_arrived)
    stalled_text += (stalled_text.empty() ? "" : "; ") + s;
  if (missing.empty()) {
    if (!liveness) {
      return head +
             ", although every rank arrived: a rank posted it but stopped progressing it, "
             "or the transport is stuck. End the job with abort().";
    }
    if (lost_arrived.empty() && stalled_arrived.empty()) {
      return head +
             ", although every rank arrived and every rank answered a liveness check: a rank's "
             "collective is not being progressed (a rank stuck inside an MPI call, or "
             "MESHTRAIN_COMM_PROGRESS=caller and a rank that stopped waiting), or the transport "
             "is stuck. End the job with abort().";
    }
    if (lost_arrived.empty())
      return fmt::format("{}: stalled: {}. End the job with abort().", head, stalled_text);
    return fmt::format(
        "{}: lost {}: {} posted it, then {} (the process exited, was killed or is stopped){}. End "
        "the job with abort().",
        head, lost_text, lost_arrived.size() == 1 ? "it" : "they", no_answer,
        stalled_text.empty() ? "" : "; stalled: " + stalled_text);
  }
  std::string who;
  for (std::size_t i = 0; i < missing.size(); ++i) {
    const int r = missing[i];
    if (!who.empty()) who += "; ";
    who += rank_name(r);
    who += i < last_seen.size() && !last_seen[i].empty()
               ? fmt::format(", last seen at {}", last_seen[i])
               : std::string(", never seen on this group");
    if (liveness) {
      if (is_lost(r)) {
        who += fmt::format(", {}: lost (exited, killed or stopped)", no_answer);
      } else if (const double s = stalled_for(r); s > 0) {
        who += ", " + stall_words(s);
      } else {
        who += ", alive (it answered a liveness check)";
      }
    }
  }
  std::string msg = fmt::format(
      "{}: {} never arrived [{}]. Every rank must issue the same collectives in "
      "the same order; a rank that is stuck, crashed or skipped a collective holds "
      "up the others.",
      head, missing.size() == 1 ? "1 rank" : fmt::format("{} ranks", missing.size()), who);
  if (!lost_arrived.empty())
    msg += fmt::format(" Also lost: {}, which posted it, then {}.", lost_text, no_answer);
  if (!stalled_arrived.empty()) msg += fmt::format(" Also stalled: {}.", stalled_text);
  return msg + " End the job with abort().";
}

CommOptions CommOptions::from_settings() {
  CommOptions o;
  o.timeout_s = settings().comm_timeout_s;
  o.debug = settings().comm_debug;
  return o;
}

std::chrono::steady_clock::duration CommOptions::timeout() const {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(timeout_s));
}

bool WorkImpl::wait_until(Clock::time_point until) {
  // Spin first, then yield the core. Spinning for a while matters: on a machine shared with
  // other work a yield gives the core away for a whole time slice, which cost 10-20% of
  // bandwidth on 2-4 MB allreduces. Yielding afterwards matters too: with more ranks than cores
  // (tests oversubscribe) a waiter that never yields starves the peers it waits for.
  constexpr auto kSpin = std::chrono::milliseconds(1);
  const auto start = Clock::now();
  for (;;) {
    if (progress()) return true;
    const auto now = Clock::now();
    if (now >= until) return false;
    if (now - start > kSpin) std::this_thread::yield();
  }
}

std::optional<WorkImpl::Clock::time_point> WorkImpl::completed_at() const {
  const Clock::rep t = completed_.load(std::memory_order_acquire);
  if (t == 0) return std::nullopt;
  return Clock::time_point(Clock::duration(t));
}

void WorkImpl::mark_completed(Clock::time_point t) noexcept {
  Clock::rep expected = 0;
  const Clock::rep v = std::max<Clock::rep>(t.time_since_epoch().count(), 1);
  completed_.compare_exchange_strong(expected, v, std::memory_order_acq_rel);
}

Work::Work(std::shared_ptr<WorkImpl> impl, std::shared_ptr<detail::GroupHealth> health)
    : impl_(std::move(impl)), health_(std::move(health)) {}

const Collective& Work::collective() const {
  MT_CHECK(defined(), "collective() of an empty Work handle");
  return impl_->collective();
}

std::chrono::steady_clock::time_point Work::posted_at() const {
  MT_CHECK(defined(), "posted_at() of an empty Work handle");
  return impl_->posted_at();
}

std::optional<std::chrono::steady_clock::time_point> Work::completed_at() const {
  MT_CHECK(defined(), "completed_at() of an empty Work handle");
  return impl_->completed_at();
}

std::shared_ptr<DeviceMark> Work::device_start() const {
  MT_CHECK(defined(), "device_start() of an empty Work handle");
  return impl_->device_start();
}

std::shared_ptr<DeviceMark> Work::device_end() const {
  MT_CHECK(defined(), "device_end() of an empty Work handle");
  return impl_->device_end();
}

void Work::fail_timeout() {
  const std::string msg = impl_->describe_timeout();
  impl_->on_timeout();
  log::error("{}", msg);
  health_->mark(msg, true);
  throw CommTimeout(msg);
}

bool Work::test() {
  MT_CHECK(defined(), "test() on an empty Work handle");
  try {
    if (impl_->progress()) {
      impl_->mark_completed();
      return true;
    }
  } catch (const std::exception& e) {
    health_->mark(e.what(), false);
    throw;
  }
  if (WorkImpl::Clock::now() >= impl_->deadline()) fail_timeout();
  return false;
}

void Work::wait() {
  MT_CHECK(defined(), "wait() on an empty Work handle");
  bool done = false;
  try {
    done = impl_->wait_until(impl_->deadline()) || impl_->progress();
  } catch (const std::exception& e) {
    health_->mark(e.what(), false);
    throw;
  }
  if (!done) fail_timeout();
  impl_->mark_completed();
}

void wait_all(std::vector<Work>& works) {
  for (Work& w : works) w.wait();
}

Communicator::Communicator(std::unique_ptr<Backend> backend, CommOptions options)
    : backend_(std::move(backend)),
      options_(options),
      health_(std::make_shared<detail::GroupHealth>()) {
  MT_CHECK(options_.timeout_s > 0, "communicator timeout must be > 0 seconds, got {}",
           options_.timeout_s);
}

Communicator::Communicator(Communicator&& o) noexcept
    : backend_(std::move(o.backend_)),
      options_(o.options_),
      next_seq_(o.next_seq_),
      outstanding_(std::move(o.outstanding_)),
      health_(std::move(o.health_)),
      sends_posted_(std::move(o.sends_posted_)),
      recvs_posted_(std::move(o.recvs_posted_)),
      peer_labels_(std::move(o.peer_labels_)) {}

Communicator& Communicator::operator=(Communicator&& o) noexcept {
  if (this != &o) {
    Communicator old(std::move(*this));  // finalizes (or abandons) what this held
    backend_ = std::move(o.backend_);
    options_ = o.options_;
    next_seq_ = o.next_seq_;
    outstanding_ = std::move(o.outstanding_);
    health_ = std::move(o.health_);
    sends_posted_ = std::move(o.sends_posted_);
    recvs_posted_ = std::move(o.recvs_posted_);
    peer_labels_ = std::move(o.peer_labels_);
  }
  return *this;
}

Communicator::~Communicator() {
  if (!backend_) return;
  if (health_->is_failed()) {
    // Waiting here could block for a whole timeout during unwinding; the job is ending anyway.
    log::warn("communicator '{}' destroyed after a failure: abandoning it", backend_->name());
    abandon_group();
    return;
  }
  try {
    finalize();
  } catch (const std::exception& e) {
    log::error("communicator '{}': finalize in the destructor failed: {}", backend_->name(),
               e.what());
    abandon_group();
  }
}

void Communicator::abandon_group() noexcept {
  if (!backend_) return;
  if (backend_->abandon()) {
    // Operations that never completed may still write into their buffers, and the vendor
    // library may still reference the group: both are leaked on purpose rather than freed under
    // its feet. This only happens on the way to abort().
    new std::vector<Work>(std::move(outstanding_));
    (void)backend_.release();
    return;
  }
  outstanding_.clear();
  backend_.reset();
}

int Communicator::rank() const {
  MT_CHECK(valid(), "rank() of a communicator that is not valid (split with a negative color?)");
  return backend_->rank();
}

int Communicator::size() const {
  MT_CHECK(valid(), "size() of a communicator that is not valid (split with a negative color?)");
  return backend_->size();
}

const std::string& Communicator::name() const {
  MT_CHECK(valid(), "name() of a communicator that is not valid (split with a negative color?)");
  return backend_->name();
}

Backend& Communicator::backend() {
  MT_CHECK(valid(), "backend() of a communicator that is not valid");
  return *backend_;
}

std::shared_ptr<DeviceMark> Communicator::mark_compute() {
  MT_CHECK(valid(), "mark_compute() of a communicator that is not valid");
  return backend_->mark_compute();
}

void Communicator::check_usable() const {
  MT_CHECK(valid(),
           "collective on a communicator that is not valid (finalized, moved from, or "
           "split with a negative color)");
  std::lock_guard lock(health_->mu);
  if (!health_->failed) return;
  const std::string msg = fmt::format(
      "communicator '{}' is unusable after an earlier failure; end the job with abort(). The "
      "failure: {}",
      backend_->name(), health_->first_error);
  if (health_->timed_out) throw CommTimeout(msg);
  throw Error(msg);
}

void Communicator::prune() {
  std::erase_if(outstanding_, [](Work& w) {
    try {
      return w.impl_->progress();
    } catch (const std::exception&) {
      return false;  // reported to whoever waits on it
    }
  });
}

namespace {

void check_tensor(const Tensor& t, const Backend& b, std::string_view what, OpType op,
                  bool reduction) {
  MT_CHECK(t.defined(), "{} on group '{}': the {} tensor is undefined", op_name(op), b.name(),
           what);
  MT_CHECK(b.accepts(t.device()),
           "{} on group '{}': the {} tensor {} is on a device the {} "
           "backend cannot use",
           op_name(op), b.name(), what, t.str(), b.kind());
  if (reduction) {
    MT_CHECK(is_floating(t.dtype()),
             "{} on group '{}': {} tensor {}: reductions need fp32, bf16 "
             "or fp16",
             op_name(op), b.name(), what, t.str());
  }
}

bool overlaps(const Tensor& a, const Tensor& b) {
  const auto* pa = static_cast<const std::uint8_t*>(a.data());
  const auto* pb = static_cast<const std::uint8_t*>(b.data());
  return pa < pb + b.nbytes() && pb < pa + a.nbytes();
}

}  // namespace

Work Communicator::post(Collective c, const Tensor& in, const Tensor& out) {
  check_usable();
  prune();
  c.seq = next_seq_;
  // The number is spent even if the backend throws (a mismatch, an MPI error): every rank
  // throws at the same collective, so the numbering stays aligned across ranks.
  ++next_seq_;
  std::shared_ptr<WorkImpl> impl;
  try {
    impl = backend_->post(c, in, out);
  } catch (const CommTimeout& e) {
    health_->mark(e.what(), true);
    throw;
  } catch (const InvalidArgument&) {
    throw;  // a mismatch found before anything was started: the group stays usable
  } catch (const std::exception& e) {
    health_->mark(e.what(), false);
    throw;
  }
  Work w(std::move(impl), health_);
  outstanding_.push_back(w);
  return w;
}

Work Communicator::allreduce(const Tensor& tensor, ReduceOp op) {
  return allreduce(tensor, tensor, op);
}

Work Communicator::allreduce(const Tensor& in, const Tensor& out, ReduceOp op) {
  check_usable();
  check_tensor(in, *backend_, "input", OpType::kAllreduce, true);
  check_tensor(out, *backend_, "output", OpType::kAllreduce, true);
  MT_CHECK(in.dtype() == out.dtype() && in.numel() == out.numel(),
           "allreduce on group '{}': input {} and output {} must have the same dtype and number "
           "of elements",
           name(), in.str(), out.str());
  MT_CHECK(in.data() == out.data() || !overlaps(in, out),
           "allreduce on group '{}': input {} and output {} overlap without being the same buffer",
           name(), in.str(), out.str());
  Collective c;
  c.op = OpType::kAllreduce;
  c.reduce = op;
  c.dtype = in.dtype();
  c.in_shape = in.shape();
  c.out_numel = out.numel();
  return post(c, in, out);
}

Work Communicator::reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op) {
  check_usable();
  check_tensor(in, *backend_, "input", OpType::kReduceScatter, true);
  check_tensor(out, *backend_, "output", OpType::kReduceScatter, true);
  MT_CHECK(in.dtype() == out.dtype() && in.numel() == out.numel() * size(),
           "reduce_scatter on group '{}' ({} ranks): input {} must have the output's dtype and "
           "{} times its elements (output {})",
           name(), size(), in.str(), size(), out.str());
  MT_CHECK(!overlaps(in, out), "reduce_scatter on group '{}': input {} and output {} overlap",
           name(), in.str(), out.str());
  Collective c;
  c.op = OpType::kReduceScatter;
  c.reduce = op;
  c.dtype = in.dtype();
  c.in_shape = in.shape();
  c.out_numel = out.numel();
  return post(c, in, out);
}

Work Communicator::all_gather(const Tensor& in, const Tensor& out) {
  check_usable();
  check_tensor(in, *backend_, "input", OpType::kAllGather, false);
  check_tensor(out, *backend_, "output", OpType::kAllGather, false);
  MT_CHECK(in.dtype() == out.dtype() && out.numel() == in.numel() * size(),
           "all_gather on group '{}' ({} ranks): output {} must have the input's dtype and {} "
           "times its elements (input {})",
           name(), size(), out.str(), size(), in.str());
  const bool own_chunk =
      in.data() == static_cast<const std::uint8_t*>(out.data()) + rank() * in.nbytes();
  MT_CHECK(own_chunk || !overlaps(in, out),
           "all_gather on group '{}': input {} overlaps the output {} without being this rank's "
           "chunk of it",
           name(), in.str(), out.str());
  Collective c;
  c.op = OpType::kAllGather;
  c.dtype = in.dtype();
  c.in_shape = in.shape();
  c.out_numel = out.numel();
  return post(c, in, out);
}

Work Communicator::broadcast(const Tensor& tensor, int root) {
  check_usable();
  check_tensor(tensor, *backend_, "broadcast", OpType::kBroadcast, false);
  MT_CHECK(root >= 0 && root < size(),
           "broadcast on group '{}': root {} is not a rank of the {} "
           "ranks",
           name(), root, size());
  Collective c;
  c.op = OpType::kBroadcast;
  c.dtype = tensor.dtype();
  c.in_shape = tensor.shape();
  c.out_numel = tensor.numel();
  c.root = root;
  return post(c, tensor, tensor);
}

Work Communicator::barrier() {
  check_usable();
  Collective c;
  c.op = OpType::kBarrier;
  return post(c, Tensor(), Tensor());
}

Communicator Communicator::split(int color, int key) {
  check_usable();
  prune();
  Collective c;
  c.op = OpType::kSplit;
  c.color = color;
  c.key = key;
  c.seq = next_seq_++;
  std::unique_ptr<Backend> child;
  try {
    child = backend_->split(c);
  } catch (const CommTimeout& e) {
    health_->mark(e.what(), true);
    throw;
  } catch (const InvalidArgument&) {
    throw;
  } catch (const std::exception& e) {
    health_->mark(e.what(), false);
    throw;
  }
  if (!child) return Communicator();
  return Communicator(std::move(child), options_);
}

std::vector<std::shared_ptr<WorkImpl>> Backend::post_p2p(const std::vector<P2pCall>& calls) {
  MT_CHECK(calls.empty(), "{} on group '{}': the {} backend has no point-to-point (send, recv)",
           op_name(calls.front().c.op), name(), kind());
  return {};
}

void Communicator::check_peer(int peer, std::string_view call) const {
  MT_CHECK(peer >= 0 && peer < size() && peer != rank(),
           "{} on group '{}' (this is rank {} of {}): peer {} is {}", call, name(), rank(), size(),
           peer,
           peer == rank() ? "this rank (a rank sends to and receives from other ranks only)"
                          : fmt::format("not a rank of the group (expected 0 to {})", size() - 1));
}

void Communicator::ensure_p2p_tables() {
  if (sends_posted_.empty()) {
    sends_posted_.assign(size(), 0);
    recvs_posted_.assign(size(), 0);
    peer_labels_.assign(size(), std::string());
  }
}

Work Communicator::send(const Tensor& tensor, int peer, std::string_view label) {
  return exchange({P2pOp::send(tensor, peer, std::string(label))}).front();
}

Work Communicator::recv(const Tensor& tensor, int peer, std::string_view label) {
  return exchange({P2pOp::recv(tensor, peer, std::string(label))}).front();
}

std::vector<Work> Communicator::exchange(const std::vector<P2pOp>& ops) {
  check_usable();
  for (std::size_t i = 0; i < ops.size(); ++i) {
    const P2pOp& o = ops[i];
    MT_CHECK(is_p2p(o.op), "exchange on group '{}': op {} is a {}, not a send or a recv", name(), i,
             op_name(o.op));
    const std::string call =
        fmt::format("{} {} rank {}", op_name(o.op), o.op == OpType::kSend ? "to" : "from", o.peer);
    check_peer(o.peer, call);
    MT_CHECK(o.tensor.defined(), "{} on group '{}': the tensor is undefined", call, name());
    MT_CHECK(backend_->accepts(o.tensor.device()),
             "{} on group '{}': the tensor {} is on a device the {} backend cannot use", call,
             name(), o.tensor.str(), backend_->kind());
  }
  for (std::size_t i = 0; i < ops.size(); ++i) {
    if (ops[i].op != OpType::kRecv) continue;
    for (std::size_t j = 0; j < ops.size(); ++j) {
      MT_CHECK(i == j || !overlaps(ops[i].tensor, ops[j].tensor),
               "exchange on group '{}': the tensor {} of op {} (recv from rank {}) overlaps the "
               "tensor {} of op {} ({} rank {}); a recv's tensor must not overlap another op's",
               name(), ops[i].tensor.str(), i, ops[i].peer, ops[j].tensor.str(), j,
               op_name(ops[j].op), ops[j].peer);
    }
  }
  if (ops.empty()) return {};
  prune();
  ensure_p2p_tables();
  std::vector<Backend::P2pCall> calls;
  calls.reserve(ops.size());
  for (const P2pOp& o : ops) {
    Collective c;
    c.op = o.op;
    c.dtype = o.tensor.dtype();
    c.in_shape = o.tensor.shape();
    c.out_numel = o.tensor.numel();
    c.peer = o.peer;
    c.label = o.label.empty() ? peer_labels_[o.peer] : o.label;
    c.seq = ++(o.op == OpType::kSend ? sends_posted_ : recvs_posted_)[o.peer];
    calls.push_back({std::move(c), o.tensor});
  }
  std::vector<std::shared_ptr<WorkImpl>> impls;
  try {
    impls = backend_->post_p2p(calls);
  } catch (const CommTimeout& e) {
    health_->mark(e.what(), true);
    throw;
  } catch (const InvalidArgument&) {
    // Found before anything was started: the numbers are given back, the group stays usable.
    for (const Backend::P2pCall& call : calls)
      --(call.c.op == OpType::kSend ? sends_posted_ : recvs_posted_)[call.c.peer];
    throw;
  } catch (const std::exception& e) {
    health_->mark(e.what(), false);
    throw;
  }
  MT_ASSERT(impls.size() == calls.size(), "the {} backend returned {} works for {} ops",
            backend_->kind(), impls.size(), calls.size());
  std::vector<Work> works;
  works.reserve(impls.size());
  for (auto& impl : impls) {
    works.emplace_back(std::move(impl), health_);
    outstanding_.push_back(works.back());
  }
  return works;
}

void Communicator::set_peer_label(int peer, std::string label) {
  MT_CHECK(valid(), "set_peer_label() of a communicator that is not valid");
  check_peer(peer, "set_peer_label");
  ensure_p2p_tables();
  peer_labels_[peer] = std::move(label);
}

std::uint64_t Communicator::next_send_seq(int peer) const {
  MT_CHECK(valid(), "next_send_seq() of a communicator that is not valid");
  check_peer(peer, "next_send_seq");
  return sends_posted_.empty() ? 1 : sends_posted_[peer] + 1;
}

std::uint64_t Communicator::next_recv_seq(int peer) const {
  MT_CHECK(valid(), "next_recv_seq() of a communicator that is not valid");
  check_peer(peer, "next_recv_seq");
  return recvs_posted_.empty() ? 1 : recvs_posted_[peer] + 1;
}

void Communicator::wait_all() {
  for (Work& w : outstanding_) w.wait();
  outstanding_.clear();
}

void Communicator::finalize() {
  if (!backend_) return;
  if (!health_->is_failed()) {
    wait_all();  // throws CommTimeout if a peer never comes; the destructor then abandons
    backend_->finalize();
    backend_.reset();
    return;
  }
  // After a failure, give the late ranks one more timeout to complete what is outstanding
  // (then the buffers can be released cleanly), and abandon the group otherwise.
  const auto until = WorkImpl::Clock::now() + options_.timeout();
  bool drained = true;
  for (Work& w : outstanding_) {
    try {
      drained = drained && w.impl_->wait_until(until);
    } catch (const std::exception& e) {
      log::warn("communicator '{}': {} failed while finalizing: {}", backend_->name(),
                w.collective().str(), e.what());
      drained = false;
    }
  }
  if (drained) {
    outstanding_.clear();
    try {
      backend_->finalize();
      backend_.reset();
      return;
    } catch (const std::exception& e) {
      log::warn("communicator '{}': finalize after a failure: {}", backend_->name(), e.what());
    }
  } else {
    log::warn(
        "communicator '{}': outstanding collectives did not complete after the failure; "
        "abandoning the group",
        backend_->name());
  }
  abandon_group();
}

void Communicator::abort(int code) noexcept {
  if (!backend_) return;
  health_->mark(fmt::format("communicator '{}' was aborted", backend_->name()), false);
  backend_->abort(code);
}

}  // namespace meshtrain::comm
