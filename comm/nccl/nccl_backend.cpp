#include <cuda_runtime.h>

#include <optional>

#include "comm/mpi/arrivals.hpp"
#include "comm/mpi/liveness.hpp"
#include "comm/mpi/mpi_backend.hpp"
#include "comm/nccl/nccl.hpp"
#include "comm/nccl/nccl_compat.hpp"
#include "runtime/cuda/cuda_check.hpp"
#include "runtime/cuda/stream.hpp"
#include "runtime/log.hpp"

namespace meshtrain::comm {

namespace nccl_compat {
void fail_nccl(const char* call, int status, std::string_view text, const char* file, int line) {
  throw NcclError(cuda::detail::describe_failure(call, status, text, file, line));
}

void log_nccl(const char* call, int status, std::string_view text, const char* file,
              int line) noexcept {
  try {
    log::error("{}", cuda::detail::describe_failure(call, status, text, file, line));
  } catch (...) {
    // Logging itself failed (out of memory): nothing left to report with.
  }
}
}  // namespace nccl_compat

namespace {

using Clock = std::chrono::steady_clock;

ncclDataType_t nccl_type(DType d) {
  switch (d) {
    case DType::kF32:
      return ncclFloat32;
    case DType::kBF16:
      return ncclBfloat16;
    case DType::kF16:
      return ncclFloat16;
    case DType::kI32:
      return ncclInt32;
  }
  MT_ASSERT(false, "no NCCL type for {}", dtype_name(d));
  return ncclFloat32;
}

ncclRedOp_t nccl_op(ReduceOp r) {
  switch (r) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kAvg:
      return ncclAvg;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  return ncclSum;
}

// What a group's operations share. Used from one thread at a time (the communicator's).
struct NcclGroup {
  ncclComm_t comm = nullptr;
  GroupInfo info;
  int device = 0;
  CommOptions options;
  cudaStream_t compute = nullptr;      // not owned: the caller's compute stream
  std::optional<cuda::Stream> stream;  // owned: every collective of the group runs here
  Communicator mpi;                    // the same ranks over MPI: bootstrap and side channel
  std::unique_ptr<detail::ArrivalBoard> board;
  float* scratch = nullptr;  // one float on the device, what barrier() reduces
  std::uint64_t last_seq = 0;
  bool aborted = false;
  bool released = false;

  ~NcclGroup() {
    if (scratch != nullptr) MT_CUDA_LOG(cudaFree(scratch));
  }

  // Ends every kernel of the communicator; afterwards its buffers may be freed.
  void abort_comm() noexcept {
    if (comm == nullptr || aborted) return;
    aborted = true;
    // After the abort the communicator cannot describe its own error: none passed.
    MT_NCCL_LOG(ncclCommAbort(comm), nullptr);
  }

  void check_usable() const {
    if (aborted) {
      throw NcclError(
          fmt::format("the NCCL communicator of group '{}' was aborted after an "
                      "earlier failure [{}]",
                      info.name, log::rank_label()));
    }
  }

  std::string describe_timeout(const Collective& c) {
    if (is_p2p(c.op)) return describe_p2p_timeout(c);
    std::vector<std::string> last;
    std::vector<int> missing;
    if (board) {
      const double ms = std::clamp(options.timeout_s * 50.0, 20.0, 500.0);
      missing = board->missing(c.seq, std::chrono::milliseconds(static_cast<int>(ms)), &last);
    }
    return timeout_message(c, "nccl", info.name, info.rank, info.world_ranks, options.timeout_s,
                           missing, last);
  }

  // A send or recv timed out: what its peer posted toward this rank (the board), and whether the
  // peer's process is alive (the MPI liveness check of that one rank, comm/mpi/liveness.hpp).
  std::string describe_p2p_timeout(const Collective& c) {
    std::optional<PeerP2p> peer;
    if (board) {
      const double ms = std::clamp(options.timeout_s * 50.0, 20.0, 500.0);
      peer = board->p2p_peer(c, std::chrono::milliseconds(static_cast<int>(ms)));
    }
    std::optional<LivenessReport> live;
    const auto window = std::chrono::milliseconds(
        static_cast<int>(std::clamp(options.timeout_s * 250.0, 3000.0, 5000.0)));
    if (auto result = detail::liveness_check({info.world_ranks[c.peer]}, window)) {
      live.emplace();
      live->window_s = std::chrono::duration<double>(window).count();
      if (!result->lost.empty()) live->lost.push_back(c.peer);
      for (const auto& stall : result->stalled) live->stalled.emplace_back(c.peer, stall.second);
    }
    return p2p_timeout_message(c, "nccl", info.name, info.rank, info.world_ranks, options.timeout_s,
                               peer, live);
  }
};

// A timing event recorded on one of the group's streams: the device clock at that point.
class CudaMark final : public DeviceMark {
 public:
  explicit CudaMark(int device) : device_(device) {}
  double ms_since(const DeviceMark& origin) const override {
    const auto* o = dynamic_cast<const CudaMark*>(&origin);
    MT_CHECK(o != nullptr && o->device_ == device_,
             "ms_since: device marks of different devices or backends cannot be compared");
    o->event_.synchronize();
    event_.synchronize();
    return static_cast<double>(o->event_.elapsed_ms(event_));
  }
  void record(cudaStream_t s) { event_.record(s); }
  const cuda::Event& event() const { return event_; }

 private:
  int device_;
  cuda::Event event_{/*timing=*/true};
};

class NcclWork final : public WorkImpl {
 public:
  NcclWork(const Collective& c, Clock::time_point deadline, std::shared_ptr<NcclGroup> g)
      : WorkImpl(c, deadline),
        g_(std::move(g)),
        start_(std::make_shared<CudaMark>(g_->device)),
        done_(std::make_shared<CudaMark>(g_->device)) {}
  // One op of a batch whose marks it shares (point-to-point: one NCCL group, one span).
  NcclWork(const Collective& c, Clock::time_point deadline, std::shared_ptr<NcclGroup> g,
           std::shared_ptr<CudaMark> start, std::shared_ptr<CudaMark> done)
      : WorkImpl(c, deadline), g_(std::move(g)), start_(std::move(start)), done_(std::move(done)) {}

  bool progress() override {
    if (complete_) return true;
    g_->check_usable();
    if (MT_CUDA_ALLOW(cudaEventQuery(done_->event().get()), cudaErrorNotReady) == cudaSuccess) {
      // Later work on the compute stream sees the result.
      MT_CUDA_CHECK(cudaStreamWaitEvent(g_->compute, done_->event().get(), 0));
      keep_.clear();
      complete_ = true;
      return true;
    }
    ncclResult_t async = ncclSuccess;
    MT_NCCL_CHECK(ncclCommGetAsyncError(g_->comm, &async), g_->comm);
    if (async != ncclSuccess && async != ncclInProgress) {
      g_->abort_comm();
      nccl_compat::fail_nccl("an NCCL collective (ncclCommGetAsyncError)", static_cast<int>(async),
                             ncclGetErrorString(async), __FILE__, __LINE__);
    }
    return false;
  }

  std::string describe_timeout() override { return g_->describe_timeout(collective()); }
  void on_timeout() noexcept override { g_->abort_comm(); }

  std::shared_ptr<DeviceMark> device_start() const override { return start_; }
  std::shared_ptr<DeviceMark> device_end() const override { return done_; }
  CudaMark& start() { return *start_; }
  CudaMark& done() { return *done_; }
  void keep(const Tensor& t) { keep_.push_back(t); }

 private:
  std::shared_ptr<NcclGroup> g_;
  // Timing events on the group's stream around the collective: its device-time span (and
  // done_ is what progress() polls).
  std::shared_ptr<CudaMark> start_, done_;
  std::vector<Tensor> keep_;
  bool complete_ = false;
};

// A group over `comm`, whose members are those of `mpi`.
std::shared_ptr<NcclGroup> make_group(ncclComm_t comm, Communicator mpi, std::string name,
                                      cudaStream_t compute, int device,
                                      const CommOptions& options) {
  auto g = std::make_shared<NcclGroup>();
  g->comm = comm;
  g->info = GroupInfo{mpi.rank(), mpi.size(), std::move(name), mpi.backend().world_ranks()};
  g->device = device;
  g->options = options;
  g->compute = compute;
  MT_CUDA_CHECK(cudaSetDevice(device));
  g->stream.emplace(0);
  MT_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&g->scratch), sizeof(float)));
  MT_CUDA_CHECK(cudaMemset(g->scratch, 0, sizeof(float)));
  g->board = std::make_unique<detail::ArrivalBoard>(detail::mpi_fortran_handle(mpi),
                                                    Clock::now() + options.timeout());
  g->mpi = std::move(mpi);
  return g;
}

// ncclCommInitRank over the ranks of `mpi`, the id broadcast from its rank 0.
ncclComm_t init_over(Communicator& mpi) {
  ncclUniqueId id{};
  static_assert(sizeof(id) % sizeof(std::int32_t) == 0);
  if (mpi.rank() == 0) MT_NCCL_CHECK(ncclGetUniqueId(&id), nullptr);
  Tensor bytes = Tensor::wrap(&id, Shape{static_cast<std::int64_t>(sizeof(id) / 4)}, DType::kI32);
  mpi.broadcast(bytes, 0).wait();
  ncclComm_t comm = nullptr;
  // Every rank has passed the broadcast, so every rank reaches this call.
  MT_NCCL_CHECK(ncclCommInitRank(&comm, mpi.size(), id, mpi.rank()), nullptr);
  return comm;
}

class NcclBackend final : public Backend {
 public:
  explicit NcclBackend(std::shared_ptr<NcclGroup> g) : Backend(g->info), g_(std::move(g)) {}

  ~NcclBackend() override {
    if (g_->released) return;
    try {
      finalize();
    } catch (const std::exception& e) {
      log::error("NCCL communicator '{}': release failed: {}", name(), e.what());
    }
  }

  std::string_view kind() const override { return "nccl"; }
  bool accepts(const Device& d) const override {
    return d.type() == DeviceType::kCUDA && d.index() == g_->device;
  }
  std::shared_ptr<DeviceMark> mark_compute() override {
    g_->check_usable();
    auto m = std::make_shared<CudaMark>(g_->device);
    m->record(g_->compute);
    return m;
  }

  std::shared_ptr<WorkImpl> post(const Collective& c, const Tensor& in,
                                 const Tensor& out) override {
    NcclGroup& g = *g_;
    g.check_usable();
    const auto deadline = Clock::now() + g.options.timeout();
    g.board->announce(c);
    g.last_seq = c.seq;
    if (g.options.debug) check_signatures(c, deadline);
    auto w = std::make_shared<NcclWork>(c, deadline, g_);
    // Ordered after everything queued on the compute stream so far.
    cuda::Event ready;
    ready.record(g.compute);
    ready.block(g.stream->get());
    const cudaStream_t s = g.stream->get();
    w->start().record(s);
    switch (c.op) {
      case OpType::kAllreduce:
        MT_NCCL_CHECK(ncclAllReduce(in.data(), out.data(), static_cast<std::size_t>(in.numel()),
                                    nccl_type(c.dtype), nccl_op(c.reduce), g.comm, s),
                      g.comm);
        break;
      case OpType::kReduceScatter:
        MT_NCCL_CHECK(
            ncclReduceScatter(in.data(), out.data(), static_cast<std::size_t>(out.numel()),
                              nccl_type(c.dtype), nccl_op(c.reduce), g.comm, s),
            g.comm);
        break;
      case OpType::kAllGather:
        // In place when `in` is this rank's chunk of `out`, which NCCL handles by address.
        MT_NCCL_CHECK(ncclAllGather(in.data(), out.data(), static_cast<std::size_t>(in.numel()),
                                    nccl_type(c.dtype), g.comm, s),
                      g.comm);
        break;
      case OpType::kBroadcast:
        MT_NCCL_CHECK(ncclBroadcast(in.data(), in.data(), static_cast<std::size_t>(in.numel()),
                                    nccl_type(c.dtype), c.root, g.comm, s),
                      g.comm);
        break;
      case OpType::kBarrier:
        // NCCL has no barrier: a one-element allreduce completes only once every rank joined.
        MT_NCCL_CHECK(ncclAllReduce(g.scratch, g.scratch, 1, ncclFloat32, ncclSum, g.comm, s),
                      g.comm);
        break;
      case OpType::kSplit:
        MT_ASSERT(false, "split is not posted");
        break;
      case OpType::kSend:
      case OpType::kRecv:
        MT_ASSERT(false, "{} is posted by post_p2p", c.str());
        break;
    }
    w->done().record(s);
    w->keep(in);
    w->keep(out);
    return w;
  }

  // Point-to-point: the batch is one NCCL group (ncclGroupStart/End) on the group's stream, so
  // its sends and recvs progress together; it is ordered after the compute stream's work as the
  // collectives are, between the same two timing events (every op's device_start/device_end).
  // NCCL checks no sizes: a send and recv that differ hang until the timeout, whose message then
  // shows the peer's announced dtype and shape.
  std::vector<std::shared_ptr<WorkImpl>> post_p2p(const std::vector<P2pCall>& calls) override {
    NcclGroup& g = *g_;
    g.check_usable();
    const auto deadline = Clock::now() + g.options.timeout();
    for (const P2pCall& call : calls) g.board->announce_p2p(call.c);
    auto start = std::make_shared<CudaMark>(g.device);
    auto done = std::make_shared<CudaMark>(g.device);
    cuda::Event ready;
    ready.record(g.compute);
    ready.block(g.stream->get());
    const cudaStream_t s = g.stream->get();
    start->record(s);
    MT_NCCL_CHECK(ncclGroupStart(), g.comm);
    try {
      for (const P2pCall& call : calls) {
        const auto count = static_cast<std::size_t>(call.tensor.numel());
        if (call.c.op == OpType::kSend) {
          MT_NCCL_CHECK(
              ncclSend(call.tensor.data(), count, nccl_type(call.c.dtype), call.c.peer, g.comm, s),
              g.comm);
        } else {
          MT_NCCL_CHECK(
              ncclRecv(call.tensor.data(), count, nccl_type(call.c.dtype), call.c.peer, g.comm, s),
              g.comm);
        }
      }
    } catch (...) {
      // Close the group, so that NCCL's group nesting stays balanced; the first error is the one
      // thrown (the group is unusable after it).
      MT_NCCL_LOG(ncclGroupEnd(), g.comm);
      throw;
    }
    MT_NCCL_CHECK(ncclGroupEnd(), g.comm);
    done->record(s);
    std::vector<std::shared_ptr<WorkImpl>> works;
    for (const P2pCall& call : calls) {
      auto w = std::make_shared<NcclWork>(call.c, deadline, g_, start, done);
      w->keep(call.tensor);
      works.push_back(std::move(w));
    }
    return works;
  }

  std::unique_ptr<Backend> split(const Collective& c) override {
    NcclGroup& g = *g_;
    g.check_usable();
    const auto deadline = Clock::now() + g.options.timeout();
    g.board->announce(c);
    g.last_seq = c.seq;
    // ncclCommSplit blocks until every rank calls it: only once all have called split.
    check_signatures(c, deadline);
    Communicator child_mpi = g.mpi.split(c.color, c.key);
    ncclComm_t child = nullptr;
    if constexpr (nccl_compat::kHasCommSplit) {
      MT_NCCL_CHECK(nccl_compat::split(g.comm, c.color, c.key, &child), g.comm);
    } else if (child_mpi.valid()) {
      child = init_over(child_mpi);
    }
    if (c.color < 0) return nullptr;
    MT_ASSERT(child != nullptr && child_mpi.valid(), "split of '{}' with color {} made no group",
              name(), c.color);
    return std::make_unique<NcclBackend>(make_group(child, std::move(child_mpi),
                                                    fmt::format("{}/{}", name(), c.color),
                                                    g.compute, g.device, g.options));
  }

  void finalize() override {
    NcclGroup& g = *g_;
    if (g.released) return;
    g.released = true;
    g.board->finalize(g.last_seq, Clock::now() + g.options.timeout());
    if (!g.aborted) {
      g.stream->synchronize();
      MT_NCCL_CHECK(nccl_compat::finalize(g.comm), g.comm);
      MT_NCCL_CHECK(ncclCommDestroy(g.comm), g.comm);
      g.comm = nullptr;
    }
    g.mpi.finalize();
  }

  bool abandon() noexcept override {
    NcclGroup& g = *g_;
    if (g.released) return false;
    g.released = true;
    // After ncclCommAbort no kernel of the group runs: its buffers can be freed normally.
    g.abort_comm();
    g.board->abandon();
    return false;
  }

  void abort(int code) noexcept override {
    g_->abort_comm();
    g_->mpi.abort(code);
  }

 private:
  void check_signatures(const Collective& c, Clock::time_point deadline) {
    NcclGroup& g = *g_;
    auto calls = g.board->await_all(c, deadline);
    if (!calls) throw CommTimeout(g.describe_timeout(c));
    const std::string msg = first_mismatch(*calls, name());
    if (!msg.empty()) throw InvalidArgument(msg);
  }

  std::shared_ptr<NcclGroup> g_;
};

}  // namespace

Communicator nccl_communicator(Communicator& bootstrap, const NcclOptions& nccl,
                               const CommOptions& options) {
  detail::mpi_fortran_handle(bootstrap);  // throws InvalidArgument unless MPI-backed
  // A private copy of the bootstrap group (through split: checked and under the timeout).
  Communicator mpi = bootstrap.split(0, bootstrap.rank());
  if (nccl.device >= 0) MT_CUDA_CHECK(cudaSetDevice(nccl.device));
  int device = 0;
  MT_CUDA_CHECK(cudaGetDevice(&device));
  ncclComm_t comm = init_over(mpi);
  std::string name = bootstrap.name();
  return Communicator(std::make_unique<NcclBackend>(make_group(
                          comm, std::move(mpi), std::move(name),
                          static_cast<cudaStream_t>(nccl.compute_stream), device, options)),
                      options);
}

}  // namespace meshtrain::comm
