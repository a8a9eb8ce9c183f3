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
//
// Here: the backend (posting, the collectives' start, split, point-to-point, finalize) and its
// factory. A group's shared state: comm/mpi/mpi_group.hpp; a posted collective:
// comm/mpi/mpi_work.hpp; a posted send or recv: comm/mpi/mpi_p2p_work.hpp.

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
#include "comm/mpi/mpi_group.hpp"
#include "comm/mpi/mpi_p2p_work.hpp"
#include "comm/mpi/mpi_work.hpp"
#include "comm/mpi/progress.hpp"
#include "comm/mpi/reduce16.hpp"
#include "comm/mpi/ring.hpp"
#include "runtime/log.hpp"

namespace meshtrain::comm::detail {
namespace {

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
