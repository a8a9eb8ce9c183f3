// The MPI backend.
//
// Asynchrony: every collective starts at once (MPI non-blocking collectives for small messages,
// our rings of non-blocking point-to-point messages for large ones, comm/mpi/ring.hpp) and is
// advanced from two places: the caller's Work::test()/wait() and every new collective, and the
// process's progress thread (comm/mpi/progress.hpp), which keeps the rings moving while the
// caller computes. The thread sleeps between polls, and every MPI call of comm/ holds one mutex
// (MT_MPI_CHECK), so MPI_THREAD_SERIALIZED suffices. MESHTRAIN_COMM_PROGRESS=caller turns the
// thread off (then only the caller advances collectives, as MPI itself does).
//
// Every collective is first announced on the group's ArrivalBoard (comm/mpi/arrivals.hpp): the
// side channel that names the ranks that never arrived when a collective times out, and that
// carries the signatures compared in debug mode.
//
// Point-to-point (send, recv): MPI_Isend/MPI_Irecv of the tensor's bytes on the group's
// communicator, with tags above the rings' (kP2pTagFirst up, the pair's op number modulo the
// tags there are), so that they never match a ring's messages and MPI's non-overtaking order
// matches them in posting order. Each op is announced to its peer on the board; the progress
// thread tests their requests like the collectives'. A recv checks the byte count it got
// (MPI_Get_count; a longer message is MPI_ERR_TRUNCATE) and, in debug mode, the sender's dtype
// and shape from its announcement.

#include "comm/mpi/mpi_backend.hpp"

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <condition_variable>
#include <functional>
#include <thread>

#include "comm/mpi/arrivals.hpp"
#include "comm/mpi/liveness.hpp"
#include "comm/mpi/mpi_check.hpp"
#include "comm/mpi/progress.hpp"
#include "comm/mpi/reduce16.hpp"
#include "comm/mpi/ring.hpp"
#include "runtime/log.hpp"

namespace meshtrain::comm::detail {
namespace {

using Clock = std::chrono::steady_clock;

// The first point-to-point tag: the rings use 0 .. 32767 (MpiGroup::tag_ub).
constexpr int kP2pTagFirst = 32768;

template <DType D, ReduceOp R>
void user_op(void* in, void* inout, int* len, MPI_Datatype*) {
  reduce16(D, R, in, inout, static_cast<std::size_t>(*len));
}

// A duplicate of `parent`, through MPI_Comm_idup so that a rank that never comes yields
// CommTimeout instead of a hang.
MPI_Comm dup_until(MPI_Comm parent, Clock::time_point deadline, const std::string& name) {
  MPI_Comm out = MPI_COMM_NULL;
  MPI_Request req = MPI_REQUEST_NULL;
  MT_MPI_CHECK(MPI_Comm_idup(parent, &out, &req));
  for (int flag = 0, spins = 0; !flag; ++spins) {
    MT_MPI_CHECK(MPI_Test(&req, &flag, MPI_STATUS_IGNORE));
    if (flag) break;
    if (Clock::now() >= deadline) {
      throw CommTimeout(
          fmt::format("creating communicator '{}' (MPI_Comm_idup) did not complete "
                      "in time: not every rank of the group is creating it [{}]",
                      name, log::rank_label()));
    }
    ring_progress_all();
    if (spins > 64) std::this_thread::yield();
  }
  return out;
}

// Everything a group's operations share. Outlives the backend while works refer to it.
struct MpiGroup {
  MPI_Comm comm = MPI_COMM_NULL;
  GroupInfo info;
  CommOptions options;
  MpiOptions mpi;
  std::unique_ptr<ArrivalBoard> board;
  MPI_Datatype type16[2] = {MPI_DATATYPE_NULL, MPI_DATATYPE_NULL};  // bf16, fp16
  MPI_Op op16[2][3] = {{MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL},
                       {MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL}};  // [bf16, fp16][sum, max, min]
  std::uint64_t last_seq = 0;
  int tag_ub = 32767;  // the largest tag (MPI_TAG_UB; the standard guarantees 32767)
  // Finalized or abandoned: the progress thread no longer touches its requests.
  std::atomic<bool> released{false};
  std::shared_ptr<ProgressEngine> engine;  // null: only the caller advances collectives
  int p2p_tags = 0;  // how many tags point-to-point cycles through; 0: not asked MPI yet

  static int index16(DType d) { return d == DType::kBF16 ? 0 : 1; }
  static int index_op(ReduceOp r) {
    return r == ReduceOp::kMax ? 1 : r == ReduceOp::kMin ? 2 : 0;  // avg reduces as sum
  }

  void create_types_and_ops() {
    for (int d = 0; d < 2; ++d) {
      MT_MPI_CHECK(MPI_Type_contiguous(1, MPI_UINT16_T, &type16[d]));
      MT_MPI_CHECK(MPI_Type_set_name(type16[d], d == 0 ? "meshtrain_bf16" : "meshtrain_fp16"));
      MT_MPI_CHECK(MPI_Type_commit(&type16[d]));
    }
    MT_MPI_CHECK(MPI_Op_create(&user_op<DType::kBF16, ReduceOp::kSum>, 1, &op16[0][0]));
    MT_MPI_CHECK(MPI_Op_create(&user_op<DType::kBF16, ReduceOp::kMax>, 1, &op16[0][1]));
    MT_MPI_CHECK(MPI_Op_create(&user_op<DType::kBF16, ReduceOp::kMin>, 1, &op16[0][2]));
    MT_MPI_CHECK(MPI_Op_create(&user_op<DType::kF16, ReduceOp::kSum>, 1, &op16[1][0]));
    MT_MPI_CHECK(MPI_Op_create(&user_op<DType::kF16, ReduceOp::kMax>, 1, &op16[1][1]));
    MT_MPI_CHECK(MPI_Op_create(&user_op<DType::kF16, ReduceOp::kMin>, 1, &op16[1][2]));
  }

  void free_types_and_ops() {
    for (auto& row : op16) {
      for (MPI_Op& op : row) {
        if (op != MPI_OP_NULL) MT_MPI_CHECK(MPI_Op_free(&op));
      }
    }
    for (MPI_Datatype& t : type16) {
      if (t != MPI_DATATYPE_NULL) MT_MPI_CHECK(MPI_Type_free(&t));
    }
  }

  std::chrono::milliseconds grace() const {
    // Announcements of the ranks that did arrive were sent when they arrived; the grace only
    // covers ones still in flight at the moment of the timeout.
    const double ms = std::clamp(options.timeout_s * 50.0, 20.0, 500.0);
    return std::chrono::milliseconds(static_cast<int>(ms));
  }

  // How long a liveness check at a timeout waits for answers: a live process answers within
  // milliseconds (its progress thread wakes every 100 ms), so this only has to cover a loaded
  // machine's scheduling delays; it bounds how long after the timeout the job ends.
  std::chrono::milliseconds liveness_window() const {
    const double ms = std::clamp(options.timeout_s * 250.0, 3000.0, 5000.0);
    return std::chrono::milliseconds(static_cast<int>(ms));
  }

  std::string describe_timeout(const Collective& c) {
    std::vector<std::string> last;
    std::vector<int> missing;
    if (board) missing = board->missing(c.seq, grace(), &last);
    // Who is still there: names a rank that posted the collective and then died or stopped,
    // which the arrivals cannot tell from a slow one.
    std::optional<LivenessReport> live;
    const auto window = liveness_window();
    const std::vector<int>& world_ranks = info.world_ranks;
    if (auto result = liveness_check(world_ranks, window)) {
      live.emplace();
      live->window_s = std::chrono::duration<double>(window).count();
      auto group_rank = [&](int w) {
        const auto it = std::find(world_ranks.begin(), world_ranks.end(), w);
        return it == world_ranks.end() ? -1 : static_cast<int>(it - world_ranks.begin());
      };
      for (int w : result->lost) {
        if (const int g = group_rank(w); g >= 0) live->lost.push_back(g);
      }
      for (const auto& [w, seconds] : result->stalled) {
        if (const int g = group_rank(w); g >= 0) live->stalled.emplace_back(g, seconds);
      }
    }
    return timeout_message(c, "mpi", info.name, info.rank, world_ranks, options.timeout_s, missing,
                           last, live);
  }

  // A send or recv timed out: what its peer posted toward this rank (the board), and whether the
  // peer is alive (a liveness check of that one rank).
  std::string describe_p2p_timeout(const Collective& c) {
    std::optional<PeerP2p> peer;
    if (board) peer = board->p2p_peer(c, grace());
    std::optional<LivenessReport> live;
    const auto window = liveness_window();
    if (auto result = liveness_check({info.world_ranks[c.peer]}, window)) {
      live.emplace();
      live->window_s = std::chrono::duration<double>(window).count();
      if (!result->lost.empty()) live->lost.push_back(c.peer);
      for (const auto& stall : result->stalled) live->stalled.emplace_back(c.peer, stall.second);
    }
    return p2p_timeout_message(c, "mpi", info.name, info.rank, info.world_ranks, options.timeout_s,
                               peer, live);
  }

  // How many tags point-to-point cycles through, from kP2pTagFirst to MPI_TAG_UB.
  int p2p_tag_count() {
    if (p2p_tags > 0) return p2p_tags;
    // MPI_TAG_UB holds for every communicator, but only MPI_COMM_WORLD is sure to carry it:
    // communicators from MPI_Comm_split have no attributes.
    void* attr = nullptr;
    int flag = 0;
    MT_MPI_CHECK(MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &attr, &flag));
    const int ub = flag ? *static_cast<int*>(attr) : 32767;
    if (ub < kP2pTagFirst + 1023) {
      throw MpiError(fmt::format(
          "point-to-point on group '{}': this MPI's largest tag (MPI_TAG_UB) is {}, but sends and "
          "recvs need tags {} to at least {} (below are the collectives' rings)",
          info.name, ub, kP2pTagFirst, kP2pTagFirst + 1023));
    }
    p2p_tags = ub - kP2pTagFirst + 1;
    return p2p_tags;
  }
};

// One posted collective. Two threads may advance it: its owner (progress(), which finishes it)
// and the progress thread (poll(), which only moves the transfer and records when it completed).
// `mu_` serialises them; the thread only try-locks it.
class MpiWork final : public WorkImpl, public Pollable {
 public:
  MpiWork(const Collective& c, Clock::time_point deadline, std::shared_ptr<MpiGroup> group)
      : WorkImpl(c, deadline), group_(std::move(group)) {}

  ~MpiWork() override {
    if (request_ != MPI_REQUEST_NULL || (ring_ && !ring_->done())) {
      // Only reachable when a communicator was abandoned; the buffers are leaked with it.
      log::warn("{} on group '{}' destroyed before it completed", collective().str(),
                group_->info.name);
    }
  }

  bool progress() override {
    std::lock_guard lock(mu_);
    if (done_) return true;
    // Every ring in flight, of any group: a peer may be waiting for one this rank is not.
    ring_progress_all();
    if (!transferred_) {
      if (ring_) {
        if (!ring_->advance()) return false;
      } else {
        int flag = 0;
        MT_MPI_CHECK(MPI_Test(&request_, &flag, MPI_STATUS_IGNORE));
        if (!flag) return false;
      }
      transferred_ = true;
      mark_completed();
    }
    if (finish_) finish_();
    finish_ = nullptr;
    keep_.clear();
    done_ = true;
    return true;
  }

  // From the progress thread: advance the transfer; never runs finish_ (device copies and
  // conversions stay on the owner's thread). Errors are left for the owner's progress().
  void poll() noexcept override {
    if (group_->released.load(std::memory_order_acquire)) return;
    std::unique_lock lock(mu_, std::try_to_lock);
    if (!lock.owns_lock() || transferred_) return;
    try {
      if (ring_) {
        if (!ring_->done()) return;  // ring_progress_all() has just advanced it
      } else {
        int flag = 0;
        MT_MPI_CHECK(MPI_Test(&request_, &flag, MPI_STATUS_IGNORE));
        if (!flag) return;
      }
      transferred_ = true;
      mark_completed();
      progress_events().fetch_add(1, std::memory_order_relaxed);
      done_cv_.notify_all();
    } catch (const std::exception& e) {
      // MPI_Test failed: the owner's progress() sees the request still pending and the error
      // again (or a timeout).
      log::debug("{}: progress thread: {}", collective().str(), e.what());
    }
  }

  // Spins for a while (the lowest latency on an idle machine), then, when the progress thread
  // is there to move the transfer, sleeps until it reports it done (or 20 us .. 1 ms pass, to
  // finish it here and watch the deadline). A waiter that kept spinning would take the core from
  // the peer it waits for whenever ranks outnumber cores, and from the progress thread.
  bool wait_until(Clock::time_point until) override {
    constexpr auto kSpin = std::chrono::milliseconds(1);
    const auto start = Clock::now();
    auto nap = std::chrono::microseconds(20);
    for (;;) {
      if (progress()) return true;
      const auto now = Clock::now();
      if (now >= until) return false;
      if (now - start < kSpin) continue;
      if (!group_->engine) {
        liveness_serve();  // and only this thread answers liveness checks (at most every 100 ms)
        std::this_thread::yield();  // only this thread moves it
        continue;
      }
      std::unique_lock lock(mu_);
      done_cv_.wait_for(lock, std::min<Clock::duration>(nap, until - now),
                        [&] { return transferred_; });
      nap = std::min(nap * 2, std::chrono::microseconds(1000));
    }
  }

  std::string describe_timeout() override {
    std::lock_guard lock(mu_);
    return group_->describe_timeout(collective());
  }

  MPI_Request* request() { return &request_; }
  // Runs the collective as a ring (comm/mpi/ring.hpp) instead of an MPI request.
  void start_ring(const RingSpec& spec) {
    ring_ = std::make_shared<RingOp>(spec);
    ring_register(ring_);
  }
  // Runs once, when the collective has completed (conversions back, avg division, copies back
  // to the device).
  void on_complete(std::function<void()> f) { finish_ = std::move(f); }
  // Keeps buffers alive until completion.
  void keep(const Tensor& t) { keep_.push_back(t); }

 private:
  std::shared_ptr<MpiGroup> group_;
  std::mutex mu_;
  std::condition_variable done_cv_;  // the progress thread finished the transfer
  MPI_Request request_ = MPI_REQUEST_NULL;
  std::shared_ptr<RingOp> ring_;
  std::function<void()> finish_;
  std::vector<Tensor> keep_;
  bool transferred_ = false;  // the data has arrived (finish_ may still be due)
  bool done_ = false;
};

// MPI_Test of a receive, made as MT_MPI_CHECK makes it (under mpi_mutex(); MpiError naming the
// call on failure), except for a message longer than the buffer: that error (class
// MPI_ERR_TRUNCATE) is the caller's mismatch, returned as a completion with *truncated set so
// that the work reports it as InvalidArgument. MPI_Error_class is made under the same lock.
bool test_receive(MPI_Request* request, MPI_Status* status, bool* truncated) {
  int flag = 0;
  int err = MPI_SUCCESS;
  int cls = MPI_SUCCESS;
  {
    std::lock_guard lock(mpi_mutex());
    err = MPI_Test(request, &flag, status);
    if (err != MPI_SUCCESS && MPI_Error_class(err, &cls) != MPI_SUCCESS) cls = err;
  }
  if (err == MPI_SUCCESS) return flag != 0;
  if (cls == MPI_ERR_TRUNCATE) {
    *truncated = true;
    return true;
  }
  fail_mpi(err, "MPI_Test(request, &flag, status)", __FILE__, __LINE__);
}

// One send or recv. As MpiWork, two threads may advance it: its owner (progress(), which
// finishes it: the byte count, the debug comparison, the copy to a device) and the progress
// thread (poll(), which only tests the request); `mu_` serialises them, the thread try-locks.
// A failure seen by either is kept and thrown by every later progress().
class MpiP2pWork final : public WorkImpl, public Pollable {
 public:
  MpiP2pWork(const Collective& c, Clock::time_point deadline, std::shared_ptr<MpiGroup> group,
             std::size_t bytes)
      : WorkImpl(c, deadline), group_(std::move(group)), bytes_(bytes) {}

  ~MpiP2pWork() override {
    if (!transferred_ && request_ != MPI_REQUEST_NULL) {
      // Only reachable when a communicator was abandoned; the buffers are leaked with it.
      log::warn("{} on group '{}' destroyed before it completed", collective().str(),
                group_->info.name);
    }
  }

  bool progress() override {
    std::lock_guard lock(mu_);
    if (done_) return true;
    rethrow();
    ring_progress_all();
    try {
      if (!transferred_ && !test()) return false;
      finish();
    } catch (const InvalidArgument& e) {
      failure_ = e.what();
      invalid_ = true;
      throw;
    } catch (const std::exception& e) {
      failure_ = e.what();
      throw;
    }
    return true;
  }

  void poll() noexcept override {
    if (group_->released.load(std::memory_order_acquire)) return;
    std::unique_lock lock(mu_, std::try_to_lock);
    if (!lock.owns_lock() || transferred_ || !failure_.empty()) return;
    try {
      if (!test()) return;
      progress_events().fetch_add(1, std::memory_order_relaxed);
    } catch (const std::exception& e) {
      failure_ = e.what();  // thrown by the owner's next progress()
    }
    done_cv_.notify_all();
  }

  // As MpiWork::wait_until: spins for a while, then sleeps until the progress thread reports the
  // transfer done (or 20 us .. 1 ms pass).
  bool wait_until(Clock::time_point until) override {
    constexpr auto kSpin = std::chrono::milliseconds(1);
    const auto start = Clock::now();
    auto nap = std::chrono::microseconds(20);
    for (;;) {
      if (progress()) return true;
      const auto now = Clock::now();
      if (now >= until) return false;
      if (now - start < kSpin) continue;
      if (!group_->engine) {
        liveness_serve();
        std::this_thread::yield();
        continue;
      }
      std::unique_lock lock(mu_);
      done_cv_.wait_for(lock, std::min<Clock::duration>(nap, until - now),
                        [&] { return transferred_ || !failure_.empty(); });
      nap = std::min(nap * 2, std::chrono::microseconds(1000));
    }
  }

  std::string describe_timeout() override {
    std::lock_guard lock(mu_);
    return group_->describe_p2p_timeout(collective());
  }

  MPI_Request* request() { return &request_; }
  void on_complete(std::function<void()> f) { finish_ = std::move(f); }
  void keep(const Tensor& t) { keep_.push_back(t); }

 private:
  void rethrow() const {
    if (failure_.empty()) return;
    if (invalid_) throw InvalidArgument(failure_);
    throw MpiError(failure_);
  }

  // Tests the request (mu_ held); true once the transfer is complete.
  bool test() {
    int flag = 0;
    if (collective().op == OpType::kRecv) {
      flag = test_receive(&request_, &status_, &truncated_) ? 1 : 0;
    } else {
      MT_MPI_CHECK(MPI_Test(&request_, &flag, MPI_STATUS_IGNORE));
    }
    if (!flag) return false;
    transferred_ = true;
    mark_completed();
    return true;
  }

  // After the transfer, on the owner's thread (mu_ held): a recv checks what it got against what
  // it expected, then the data goes to the device.
  void finish() {
    const Collective& c = collective();
    if (c.op == OpType::kRecv) {
      int got = 0;
      if (!truncated_) MT_MPI_CHECK(MPI_Get_count(&status_, MPI_BYTE, &got));
      if (truncated_ || static_cast<std::size_t>(got) != bytes_) {
        // What the sender posted, if its announcement is here: says which side is wrong.
        std::string sent;
        if (const auto peer = group_->board->p2p_peer(c, group_->grace()); peer.matching) {
          sent = fmt::format(" (its send #{} is {}{})", peer.matching->seq,
                             dtype_name(peer.matching->dtype), peer.matching->in_shape.str());
        }
        throw InvalidArgument(fmt::format(
            "{} on group '{}': rank {} sent {}{}, but this recv holds {} bytes (a send and its "
            "recv must have the same dtype and shape)",
            c.str(), group_->info.name, c.peer,
            truncated_ ? "more bytes" : fmt::format("{} bytes", got), sent, bytes_));
      }
      if (group_->options.debug) {
        // The sender announced its send before posting it; its announcement may still be on
        // the way when the data is here.
        const PeerP2p peer = group_->board->p2p_peer(c, group_->grace());
        if (peer.matching) {
          const std::string msg = p2p_mismatch(c, *peer.matching, group_->info.name);
          if (!msg.empty()) throw InvalidArgument(msg);
        }
      }
    }
    if (finish_) finish_();
    finish_ = nullptr;
    keep_.clear();
    done_ = true;
  }

  std::shared_ptr<MpiGroup> group_;
  std::size_t bytes_;
  std::mutex mu_;
  std::condition_variable done_cv_;
  MPI_Request request_ = MPI_REQUEST_NULL;
  MPI_Status status_{};
  std::function<void()> finish_;
  std::vector<Tensor> keep_;
  bool transferred_ = false;
  bool truncated_ = false;
  bool done_ = false;
  std::string failure_;
  bool invalid_ = false;  // failure_ is the caller's (InvalidArgument), not MPI's
};

int checked_count(std::int64_t n, const Collective& c) {
  MT_CHECK(n <= INT_MAX,
           "{}: {} elements exceed what one MPI call can carry ({}); split the "
           "tensor",
           c.str(), n, INT_MAX);
  return static_cast<int>(n);
}

// A host buffer with the contents of `t` (t itself when it is in host memory).
Tensor host_copy(const Tensor& t) {
  if (t.is_cpu()) return t;
  Tensor h = Tensor::empty(t.shape(), t.dtype(), cpu_device());
  t.device().copy_to_host(h.data(), t.data(), t.nbytes());
  return h;
}

// A host buffer to receive into for `t` (t itself when it is in host memory).
Tensor host_target(const Tensor& t) {
  return t.is_cpu() ? t : Tensor::empty(t.shape(), t.dtype(), cpu_device());
}

// A group over `comm`, of which it takes ownership (a private duplicate or a split result).
std::shared_ptr<MpiGroup> open_group(MPI_Comm comm, std::string name, const CommOptions& options,
                                     const MpiOptions& mpi) {
  auto group = std::make_shared<MpiGroup>();
  MpiGroup& g = *group;
  g.comm = comm;
  g.info.name = std::move(name);
  g.options = options;
  g.mpi = mpi;
  MT_MPI_CHECK(MPI_Comm_set_errhandler(g.comm, MPI_ERRORS_RETURN));
  MT_MPI_CHECK(MPI_Comm_rank(g.comm, &g.info.rank));
  MT_MPI_CHECK(MPI_Comm_size(g.comm, &g.info.size));
  MPI_Group mine = MPI_GROUP_NULL, world = MPI_GROUP_NULL;
  MT_MPI_CHECK(MPI_Comm_group(g.comm, &mine));
  MT_MPI_CHECK(MPI_Comm_group(MPI_COMM_WORLD, &world));
  const int n = g.info.size;
  std::vector<int> ranks(n);
  for (int r = 0; r < n; ++r) ranks[r] = r;
  g.info.world_ranks.resize(n);
  MT_MPI_CHECK(MPI_Group_translate_ranks(mine, n, ranks.data(), world, g.info.world_ranks.data()));
  MT_MPI_CHECK(MPI_Group_free(&mine));
  MT_MPI_CHECK(MPI_Group_free(&world));
  g.board = std::make_unique<ArrivalBoard>(MPI_Comm_c2f(g.comm), Clock::now() + options.timeout());
  g.create_types_and_ops();
  g.engine = ProgressEngine::acquire();
  return group;
}

class MpiBackend final : public Backend {
 public:
  // Takes ownership of `comm` (a private duplicate or a split result).
  MpiBackend(MPI_Comm comm, std::string name, const CommOptions& options, const MpiOptions& mpi)
      : MpiBackend(open_group(comm, std::move(name), options, mpi)) {}
  explicit MpiBackend(std::shared_ptr<MpiGroup> g) : Backend(g->info), g_(std::move(g)) {}

  ~MpiBackend() override {
    if (g_->released) return;
    try {
      finalize();
    } catch (const std::exception& e) {
      log::error("MPI communicator '{}': release failed: {}", name(), e.what());
    }
  }

  std::string_view kind() const override { return "mpi"; }
  // Device tensors are staged through host memory.
  bool accepts(const Device&) const override { return true; }

  MPI_Comm comm() const { return g_->comm; }

  std::shared_ptr<WorkImpl> post(const Collective& c, const Tensor& in,
                                 const Tensor& out) override {
    MpiGroup& g = *g_;
    const auto deadline = Clock::now() + g.options.timeout();
    g.board->announce(c);
    g.last_seq = c.seq;
    if (g.options.debug) check_signatures(c, deadline);
    auto w = std::make_shared<MpiWork>(c, deadline, g_);
    switch (c.op) {
      case OpType::kAllreduce:
        start_allreduce(*w, c, in, out);
        break;
      case OpType::kReduceScatter:
        start_reduce_scatter(*w, c, in, out);
        break;
      case OpType::kAllGather:
        start_all_gather(*w, c, in, out);
        break;
      case OpType::kBroadcast:
        start_broadcast(*w, c, in);
        break;
      case OpType::kBarrier:
        MT_MPI_CHECK(MPI_Ibarrier(g.comm, w->request()));
        break;
      case OpType::kSplit:
        MT_ASSERT(false, "split is not posted");
        break;
      case OpType::kSend:
      case OpType::kRecv:
        MT_ASSERT(false, "{} is posted by post_p2p", c.str());
        break;
    }
    if (g.engine) g.engine->add(w);
    return w;
  }

  std::unique_ptr<Backend> split(const Collective& c) override {
    MpiGroup& g = *g_;
    const auto deadline = Clock::now() + g.options.timeout();
    g.board->announce(c);
    g.last_seq = c.seq;
    // MPI_Comm_split blocks until every rank calls it: only call it once all have arrived, and
    // only if they all called split (always checked: splits are rare and a mismatch would hang).
    // While this rank blocks in it, its rings stand still; that is safe because the wait for
    // the others' arrival advances rings, and once every rank has arrived at the split no rank
    // is still waiting on an earlier collective.
    check_signatures(c, deadline);
    MPI_Comm child = MPI_COMM_NULL;
    MT_MPI_CHECK(MPI_Comm_split(g.comm, c.color >= 0 ? c.color : MPI_UNDEFINED, c.key, &child));
    if (child == MPI_COMM_NULL) return nullptr;
    return std::make_unique<MpiBackend>(child, fmt::format("{}/{}", name(), c.color), g.options,
                                        g.mpi);
  }

  std::vector<std::shared_ptr<WorkImpl>> post_p2p(const std::vector<P2pCall>& calls) override {
    MpiGroup& g = *g_;
    // Everything that can refuse a call, before anything starts.
    for (const P2pCall& call : calls)
      checked_count(static_cast<std::int64_t>(call.tensor.nbytes()), call.c);
    const int tags = g.p2p_tag_count();
    const auto deadline = Clock::now() + g.options.timeout();
    std::vector<std::shared_ptr<WorkImpl>> works(calls.size());
    // Recvs first: a message that arrives finds its buffer posted.
    for (const OpType pass : {OpType::kRecv, OpType::kSend}) {
      for (std::size_t i = 0; i < calls.size(); ++i) {
        if (calls[i].c.op == pass) works[i] = start_p2p(calls[i], deadline, tags);
      }
    }
    return works;
  }

  void finalize() override {
    MpiGroup& g = *g_;
    if (g.released) return;
    int finalized = 0;
    MT_MPI_CHECK(MPI_Finalized(&finalized));
    if (finalized) {
      g.released = true;
      log::error(
          "MPI communicator '{}' released after MPI_Finalize: it was leaked (finalize "
          "communicators before the MpiSession)",
          name());
      return;
    }
    g.board->finalize(g.last_seq, Clock::now() + g.options.timeout());
    g.free_types_and_ops();
    MT_MPI_CHECK(MPI_Comm_free(&g.comm));
    g.released = true;
    g.engine.reset();  // the thread stops with the last group that used it
  }

  bool abandon() noexcept override {
    MpiGroup& g = *g_;
    if (g.released) return true;
    g.released = true;
    int finalized = 0;
    MT_MPI_LOG(MPI_Finalized(&finalized));
    if (finalized) return true;
    // Collectives still posted on g.comm may complete later: the communicator, its types and
    // its ops stay allocated for them.
    g.board->abandon();
    return true;
  }

  void abort(int code) noexcept override {
    log::error("aborting the job from communicator '{}' (MPI_Abort, code {})", name(), code);
    MT_MPI_LOG(MPI_Abort(MPI_COMM_WORLD, code == 0 ? 1 : code));
    // MPI_Abort does not return; if an MPI library does, the job must still end.
    std::_Exit(code == 0 ? 1 : code);
  }

 private:
  void check_signatures(const Collective& c, Clock::time_point deadline) {
    MpiGroup& g = *g_;
    auto calls = g.board->await_all(c, deadline);
    if (!calls) throw CommTimeout(g.describe_timeout(c));
    const std::string msg = first_mismatch(*calls, name());
    if (!msg.empty()) throw InvalidArgument(msg);
  }

  // The MPI datatype and op for a reduction of `d` in the wire format, or false for fp16/bf16
  // under Reduce16::kConvert.
  bool wire_type(DType d, ReduceOp r, MPI_Datatype* type, MPI_Op* op) const {
    const MpiGroup& g = *g_;
    if (d == DType::kF32) {
      *type = MPI_FLOAT;
      *op = r == ReduceOp::kMax ? MPI_MAX : r == ReduceOp::kMin ? MPI_MIN : MPI_SUM;
      return true;
    }
    if (g.mpi.reduce16 == Reduce16::kConvert) return false;
    *type = g.type16[MpiGroup::index16(d)];
    *op = g.op16[MpiGroup::index16(d)][MpiGroup::index_op(r)];
    return true;
  }

  float avg_scale(ReduceOp r) const {
    return r == ReduceOp::kAvg ? 1.0f / static_cast<float>(size()) : 1.0f;
  }

  // After the reduction into `hout` (host): divide for avg, copy back to the device of `out`.
  std::function<void()> finisher(const Tensor& hout, const Tensor& out, ReduceOp r,
                                 bool scale_hout) {
    const float scale = avg_scale(r);
    return [hout, out, scale, scale_hout] {
      if (scale_hout && scale != 1.0f) {
        scale_inplace(hout.dtype(), hout.data(), static_cast<std::size_t>(hout.numel()), scale);
      }
      if (hout.data() != out.data())
        out.device().copy_from_host(out.data(), hout.data(), out.nbytes());
    };
  }

  // Large reductions run as rings (comm/mpi/ring.hpp), small ones as libnbc collectives, whose
  // latency is lower.
  bool use_ring(std::size_t bytes) const { return size() >= 2 && bytes >= g_->mpi.ring_min_bytes; }

  RingSpec ring_spec(const Collective& c, bool reduce_scatter, DType dtype, const void* in,
                     void* out, std::int64_t count) const {
    RingSpec r;
    r.reduce_scatter = reduce_scatter;
    r.dtype = dtype;
    r.op = c.reduce;
    r.in = in;
    r.out = out;
    r.count = count;
    r.final_scale = avg_scale(c.reduce);
    r.fortran_comm = static_cast<std::int32_t>(MPI_Comm_c2f(g_->comm));
    // One tag per operation, so that concurrent rings never match each other's messages.
    r.tag = static_cast<int>(c.seq % (static_cast<std::uint64_t>(g_->tag_ub) + 1));
    return r;
  }

  static MPI_Op float_op(ReduceOp r) {
    return r == ReduceOp::kMax ? MPI_MAX : r == ReduceOp::kMin ? MPI_MIN : MPI_SUM;
  }

  void start_allreduce(MpiWork& w, const Collective& c, const Tensor& in, const Tensor& out) {
    MpiGroup& g = *g_;
    const int n = checked_count(in.numel(), c);
    const bool in_place = in.data() == out.data();
    Tensor hin = host_copy(in);
    Tensor hout = in_place ? hin : host_target(out);
    w.keep(in);
    w.keep(out);
    w.keep(hin);
    w.keep(hout);
    MPI_Datatype type;
    MPI_Op op;
    if (wire_type(c.dtype, c.reduce, &type, &op)) {
      if (use_ring(hin.nbytes())) {
        w.on_complete(finisher(hout, out, c.reduce, false));  // the ring divides for avg
        w.start_ring(ring_spec(c, false, c.dtype, hin.data(), hout.data(), n));
        return;
      }
      const void* send = hin.data() == hout.data() ? MPI_IN_PLACE : hin.data();
      w.on_complete(finisher(hout, out, c.reduce, true));
      MT_MPI_CHECK(MPI_Iallreduce(send, hout.data(), n, type, op, g.comm, w.request()));
      return;
    }
    // Convert-reduce-convert: fp32 on the wire, one rounding at the end.
    const float scale = avg_scale(c.reduce);
    auto back = finisher(hout, out, c.reduce, false);
    Tensor wide = Tensor::empty(Shape{in.numel()}, DType::kF32, cpu_device());
    widen16(c.dtype, hin.data(), wide.data_as<float>(), static_cast<std::size_t>(n));
    w.keep(wide);
    if (use_ring(wide.nbytes())) {
      w.on_complete([wide, hout, back, dtype = c.dtype, n] {
        narrow16(dtype, wide.data_as<float>(), hout.data(), static_cast<std::size_t>(n), 1.0f);
        back();
      });
      w.start_ring(ring_spec(c, false, DType::kF32, wide.data(), wide.data(), n));
      return;
    }
    Tensor wide_out = Tensor::empty(Shape{in.numel()}, DType::kF32, cpu_device());
    w.keep(wide_out);
    w.on_complete([wide_out, hout, scale, back, dtype = c.dtype, n] {
      narrow16(dtype, wide_out.data_as<float>(), hout.data(), static_cast<std::size_t>(n), scale);
      back();
    });
    MT_MPI_CHECK(MPI_Iallreduce(wide.data(), wide_out.data(), n, MPI_FLOAT, float_op(c.reduce),
                                g.comm, w.request()));
  }

  void start_reduce_scatter(MpiWork& w, const Collective& c, const Tensor& in, const Tensor& out) {
    MpiGroup& g = *g_;
    const int total = checked_count(in.numel(), c);
    const int m = checked_count(out.numel(), c);
    Tensor hin = host_copy(in);
    Tensor hout = host_target(out);
    w.keep(in);
    w.keep(out);
    w.keep(hin);
    w.keep(hout);
    MPI_Datatype type;
    MPI_Op op;
    if (wire_type(c.dtype, c.reduce, &type, &op)) {
      if (use_ring(hin.nbytes())) {
        w.on_complete(finisher(hout, out, c.reduce, false));
        w.start_ring(ring_spec(c, true, c.dtype, hin.data(), hout.data(), total));
        return;
      }
      w.on_complete(finisher(hout, out, c.reduce, true));
      MT_MPI_CHECK(
          MPI_Ireduce_scatter_block(hin.data(), hout.data(), m, type, op, g.comm, w.request()));
      return;
    }
    Tensor wide_in = Tensor::empty(Shape{in.numel()}, DType::kF32, cpu_device());
    Tensor wide_out = Tensor::empty(Shape{out.numel()}, DType::kF32, cpu_device());
    widen16(c.dtype, hin.data(), wide_in.data_as<float>(), static_cast<std::size_t>(total));
    w.keep(wide_in);
    w.keep(wide_out);
    const bool ring = use_ring(wide_in.nbytes());
    const float scale = ring ? 1.0f : avg_scale(c.reduce);  // the ring divides for avg itself
    auto back = finisher(hout, out, c.reduce, false);
    w.on_complete([wide_out, hout, scale, back, dtype = c.dtype, m] {
      narrow16(dtype, wide_out.data_as<float>(), hout.data(), static_cast<std::size_t>(m), scale);
      back();
    });
    if (ring) {
      w.start_ring(ring_spec(c, true, DType::kF32, wide_in.data(), wide_out.data(), total));
      return;
    }
    MT_MPI_CHECK(MPI_Ireduce_scatter_block(wide_in.data(), wide_out.data(), m, MPI_FLOAT,
                                           float_op(c.reduce), g.comm, w.request()));
  }

  void start_all_gather(MpiWork& w, const Collective& c, const Tensor& in, const Tensor& out) {
    MpiGroup& g = *g_;
    const int bytes = checked_count(static_cast<std::int64_t>(in.nbytes()), c);
    checked_count(static_cast<std::int64_t>(out.nbytes()), c);
    w.keep(in);
    w.keep(out);
    if (in.is_cpu() && out.is_cpu()) {
      const bool own_chunk =
          in.data() == static_cast<const std::uint8_t*>(out.data()) + rank() * in.nbytes();
      const void* send = own_chunk ? MPI_IN_PLACE : in.data();
      MT_MPI_CHECK(
          MPI_Iallgather(send, bytes, MPI_BYTE, out.data(), bytes, MPI_BYTE, g.comm, w.request()));
      return;
    }
    Tensor hin = host_copy(in);
    Tensor hout = Tensor::empty(out.shape(), out.dtype(), cpu_device());
    w.keep(hin);
    w.keep(hout);
    w.on_complete(
        [hout, out] { out.device().copy_from_host(out.data(), hout.data(), out.nbytes()); });
    MT_MPI_CHECK(MPI_Iallgather(hin.data(), bytes, MPI_BYTE, hout.data(), bytes, MPI_BYTE, g.comm,
                                w.request()));
  }

  std::shared_ptr<MpiP2pWork> start_p2p(const P2pCall& call, Clock::time_point deadline, int tags) {
    MpiGroup& g = *g_;
    const Collective& c = call.c;
    const Tensor& t = call.tensor;
    g.board->announce_p2p(c);
    const int bytes = static_cast<int>(t.nbytes());
    const int tag = kP2pTagFirst + static_cast<int>((c.seq - 1) % static_cast<std::uint64_t>(tags));
    auto w = std::make_shared<MpiP2pWork>(c, deadline, g_, t.nbytes());
    w->keep(t);
    if (c.op == OpType::kSend) {
      Tensor h = host_copy(t);
      w->keep(h);
      MT_MPI_CHECK(MPI_Isend(h.data(), bytes, MPI_BYTE, c.peer, tag, g.comm, w->request()));
    } else {
      Tensor h = host_target(t);
      w->keep(h);
      if (h.data() != t.data())
        w->on_complete([h, t] { t.device().copy_from_host(t.data(), h.data(), t.nbytes()); });
      MT_MPI_CHECK(MPI_Irecv(h.data(), bytes, MPI_BYTE, c.peer, tag, g.comm, w->request()));
    }
    if (g.engine) g.engine->add(w);
    return w;
  }

  void start_broadcast(MpiWork& w, const Collective& c, const Tensor& t) {
    MpiGroup& g = *g_;
    const int bytes = checked_count(static_cast<std::int64_t>(t.nbytes()), c);
    Tensor h = host_copy(t);
    w.keep(t);
    w.keep(h);
    if (h.data() != t.data() && rank() != c.root) {
      w.on_complete([h, t] { t.device().copy_from_host(t.data(), h.data(), t.nbytes()); });
    }
    MT_MPI_CHECK(MPI_Ibcast(h.data(), bytes, MPI_BYTE, c.root, g.comm, w.request()));
  }

  std::shared_ptr<MpiGroup> g_;
};

}  // namespace

std::unique_ptr<Backend> make_mpi_backend(std::int32_t fortran_comm, std::string name,
                                          const CommOptions& options, const MpiOptions& mpi) {
  MPI_Comm dup = dup_until(MPI_Comm_f2c(fortran_comm), Clock::now() + options.timeout(), name);
  return std::make_unique<MpiBackend>(dup, std::move(name), options, mpi);
}

std::int32_t mpi_fortran_handle(Communicator& comm) {
  auto* b = dynamic_cast<MpiBackend*>(&comm.backend());
  MT_CHECK(b != nullptr, "communicator '{}' is not MPI-backed (it is {})", comm.name(),
           comm.backend().kind());
  return static_cast<std::int32_t>(MPI_Comm_c2f(b->comm()));
}

}  // namespace meshtrain::comm::detail
