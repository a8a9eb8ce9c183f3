// The Communicator: collectives on tensors across the ranks of a group.
//
// Structure (as c10d): a Communicator (the process group) validates arguments, numbers every
// collective and keeps the outstanding ones; a Backend (MPI, loopback, NCCL) carries them out;
// every collective returns a Work handle. This header compiles with a plain C++ compiler: no
// vendor header is visible here.
//
// Contract for callers, as in MPI and NCCL: every rank of a group issues the same collectives in
// the same order, with the same dtype and compatible shapes. Breaking it is a caller bug; with
// MESHTRAIN_COMM_DEBUG=1 every collective first checks it across ranks and reports the first
// mismatching rank (InvalidArgument on every rank).
//
// Point-to-point (send, recv, exchange) involves two ranks only and is numbered per pair and
// direction, apart from the collectives: see "Point-to-point" below and comm/README.md.
//
// No silent hangs: a collective that has not completed `timeout_s` seconds after it was posted
// fails with CommTimeout on every rank that waits for it, naming the operation, its sequence
// number, the group and the ranks that never arrived; backends that can (MPI) also name the
// ranks whose process is gone (comm/mpi/liveness.hpp). The communicator is unusable afterwards;
// the caller ends the job with abort().
//
// Thread-safety: a Communicator and the Work handles it returned are used by one thread at a
// time. Different communicators may be used from different threads where the backend allows it
// (loopback: always; MPI: when the session was started with MPI_THREAD_MULTIPLE).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "runtime/dtype.hpp"
#include "runtime/shape.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain::comm {

enum class ReduceOp : std::uint8_t { kSum, kAvg, kMax, kMin };

enum class OpType : std::uint8_t {
  kAllreduce,
  kReduceScatter,
  kAllGather,
  kBroadcast,
  kBarrier,
  kSplit,
  // Point-to-point (Communicator::send, recv, exchange): not collectives, but described, numbered
  // and timed out with the same machinery.
  kSend,
  kRecv,
};

// "sum", "avg", "max", "min".
std::string_view reduce_op_name(ReduceOp op);
// "allreduce", "reduce_scatter", "all_gather", "broadcast", "barrier", "split", "send", "recv".
std::string_view op_name(OpType op);
// kSend or kRecv.
inline bool is_p2p(OpType op) {
  return op == OpType::kSend || op == OpType::kRecv;
}

// One collective as a rank called it: the signature compared across ranks in debug mode, the
// description in every error message. Also one send or recv (op kSend or kRecv): then `seq`
// counts this rank's ops of that kind with `peer` on the group (send #3 to rank 2 is matched by
// rank 2's recv #3 from this rank), and `label` names the peer in messages.
struct Collective {
  OpType op = OpType::kBarrier;
  ReduceOp reduce = ReduceOp::kSum;  // allreduce and reduce_scatter
  DType dtype = DType::kF32;
  Shape in_shape;  // the input (broadcast: the buffer; barrier, split: empty)
  std::int64_t out_numel = 0;
  int root = 0;           // broadcast
  int color = 0;          // split
  int key = 0;            // split
  std::uint64_t seq = 0;  // 1 for the group's first collective, then +1 per call
  int peer = -1;          // send, recv: the other rank (group rank)
  std::string label;      // send, recv: the caller's name for the peer ("pipeline stage 2")

  // "allreduce #7 (sum, bf16[1024])", "send #3 to rank 2, pipeline stage 2 (bf16[4, 1024])".
  std::string str() const;
  // Whether two ranks' calls are the same collective. Split colors and keys may differ.
  bool same_call(const Collective& other) const;
};

// Given every rank's call for one sequence number (indexed by group rank), the message naming
// the first rank whose call differs from rank 0's, or "" when all agree.
std::string first_mismatch(const std::vector<Collective>& calls, std::string_view group);

// The message for a recv whose matching send (the peer's call, as announced) has another dtype or
// shape, or "" when they agree. `recv.peer` sent `send`.
std::string p2p_mismatch(const Collective& recv, const Collective& send, std::string_view group);

struct CommOptions {
  // Seconds after posting before a collective fails with CommTimeout (MESHTRAIN_COMM_TIMEOUT).
  double timeout_s = 600.0;
  // Check every collective's signature across ranks first (MESHTRAIN_COMM_DEBUG).
  bool debug = false;

  // From the process settings (runtime/settings.hpp).
  static CommOptions from_settings();
  std::chrono::steady_clock::duration timeout() const;
};

// A point on a device's timeline (NCCL: a CUDA timing event on the compute stream). A GPU runs
// behind the host that queues its work, so host clocks cannot say when a collective overlapped
// compute; device marks can. Backends without a device timeline (MPI, loopback) have none.
class DeviceMark {
 public:
  virtual ~DeviceMark() = default;
  // Milliseconds on the device clock from `origin` to this mark (negative when this mark came
  // first). Blocks until both have been reached. Both marks must come from the same backend
  // kind and device (InvalidArgument otherwise).
  virtual double ms_since(const DeviceMark& origin) const = 0;
};

// What a backend returns for one posted collective. Implementations keep the tensors alive until
// the operation has completed.
class WorkImpl {
 public:
  using Clock = std::chrono::steady_clock;
  WorkImpl(Collective c, Clock::time_point deadline)
      : collective_(std::move(c)), deadline_(deadline) {}
  virtual ~WorkImpl() = default;
  WorkImpl(const WorkImpl&) = delete;
  WorkImpl& operator=(const WorkImpl&) = delete;

  // Advances the operation without blocking; true once it is complete and its outputs are
  // written. Throws the backend's error (MpiError, NcclError, InvalidArgument for a mismatch).
  virtual bool progress() = 0;
  // Blocks until progress() is true or `until` passes; false on the latter. The default polls.
  virtual bool wait_until(Clock::time_point until);
  // Called once the deadline has passed without completion: the CommTimeout message, naming the
  // ranks that never arrived. May block for a short grace period to collect arrivals in flight.
  virtual std::string describe_timeout() = 0;
  // Called once after describe_timeout(), before CommTimeout is thrown: a backend whose
  // operations could otherwise run forever ends them here (NCCL: ncclCommAbort). Never throws.
  virtual void on_timeout() noexcept {}

  const Collective& collective() const { return collective_; }
  Clock::time_point deadline() const { return deadline_; }
  Clock::time_point posted_at() const { return posted_; }
  // When the operation completed: as the backend saw it (the MPI progress thread records the
  // moment the transfer finished), else when a test() or wait() first saw it complete.
  // nullopt while it has not.
  std::optional<Clock::time_point> completed_at() const;
  // Records the completion time; the first call wins. Thread-safe.
  void mark_completed(Clock::time_point t = Clock::now()) noexcept;
  // Device timeline: where the collective started and ended on the device (null for backends
  // without one). Valid to read (ms_since) once the operation has completed.
  virtual std::shared_ptr<DeviceMark> device_start() const { return nullptr; }
  virtual std::shared_ptr<DeviceMark> device_end() const { return nullptr; }

 private:
  Collective collective_;
  Clock::time_point deadline_;
  Clock::time_point posted_ = Clock::now();
  std::atomic<Clock::rep> completed_{0};  // ticks since the clock's epoch; 0: not yet
};

namespace detail {
struct GroupHealth;
}

// A handle to one posted collective. Copies share the operation. Dropping every handle does not
// cancel it: the communicator keeps it until it completes (finalize() waits for it).
class Work {
 public:
  Work() = default;
  Work(std::shared_ptr<WorkImpl> impl, std::shared_ptr<detail::GroupHealth> health);

  bool defined() const { return impl_ != nullptr; }
  // Non-blocking: true once complete. Throws CommTimeout once the deadline has passed, and the
  // backend's error if the collective failed.
  bool test();
  // Blocks until complete (the blocking convenience: comm.allreduce(t).wait()). Throws
  // CommTimeout when the collective has not completed `timeout_s` after it was posted.
  void wait();
  const Collective& collective() const;
  // See WorkImpl: when it was posted, and when it completed (nullopt before).
  std::chrono::steady_clock::time_point posted_at() const;
  std::optional<std::chrono::steady_clock::time_point> completed_at() const;
  // See WorkImpl: device-timeline marks of the collective's start and end (null for host
  // backends).
  std::shared_ptr<DeviceMark> device_start() const;
  std::shared_ptr<DeviceMark> device_end() const;

 private:
  friend class Communicator;
  void fail_timeout();
  std::shared_ptr<WorkImpl> impl_;
  std::shared_ptr<detail::GroupHealth> health_;
};

// Waits for every handle in order (each with its own deadline).
void wait_all(std::vector<Work>& works);

// The outcome of a liveness check run at a timeout (comm/mpi/liveness.hpp): the group ranks
// whose process did not answer within `window_s` seconds (exited, killed or stopped).
struct LivenessReport {
  std::vector<int> lost;  // group ranks that did not answer within window_s
  double window_s = 0;
  // Group ranks that answered, but only after not running for the given seconds (stopped, e.g.
  // by SIGSTOP and continued by the job's teardown, or starved of CPU).
  std::vector<std::pair<int, double>> stalled;
};

// What a peer had posted toward this rank when a send or recv with it timed out, as a backend's
// side channel knows it.
struct PeerP2p {
  std::uint64_t sends = 0;  // the peer's sends to this rank so far (the highest number)
  std::uint64_t recvs = 0;  // the peer's recvs from this rank so far
  // The peer's op matching the one that timed out (its send for a recv, its recv for a send),
  // when it has posted it; what it last posted of that kind otherwise (if anything).
  std::optional<Collective> matching;
  std::optional<Collective> last;
};

// For backends: the CommTimeout message for the send or recv `c` (c.peer, c.label). `peer` is
// what the peer had posted toward this rank (nullopt: unknown), `liveness` the check of the peer
// (group ranks), when one was run.
std::string p2p_timeout_message(const Collective& c, std::string_view kind, std::string_view group,
                                int rank, const std::vector<int>& world_ranks, double timeout_s,
                                const std::optional<PeerP2p>& peer,
                                const std::optional<LivenessReport>& liveness = std::nullopt);

// For backends: the CommTimeout message for `c` on a group. `missing` are the group ranks that
// never arrived; `last_seen[i]` says what missing[i] last posted on this group ("" if unknown).
// `world_ranks` are the group's members (their world ranks, by group rank). `liveness`, when a
// check was run, names the lost ranks among those that did arrive, and says of each missing
// rank whether it is alive.
std::string timeout_message(const Collective& c, std::string_view kind, std::string_view group,
                            int rank, const std::vector<int>& world_ranks, double timeout_s,
                            const std::vector<int>& missing,
                            const std::vector<std::string>& last_seen,
                            const std::optional<LivenessReport>& liveness = std::nullopt);

// Who a group is, fixed when it is made: this rank's place in it and its members.
struct GroupInfo {
  int rank = 0;
  int size = 1;
  // The group's name in messages: "world", "world/1" for color 1 of a split of world.
  std::string name;
  // The rank in the world group of each member, indexed by group rank.
  std::vector<int> world_ranks;
};

// A vendor implementation. Called by Communicator with validated arguments: tensors defined,
// dtypes and element counts consistent with the collective, sequence number assigned.
class Backend {
 public:
  explicit Backend(GroupInfo group) : group_(std::move(group)) {}
  virtual ~Backend() = default;
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;

  // "mpi", "loopback", "nccl".
  virtual std::string_view kind() const = 0;
  const GroupInfo& group() const { return group_; }
  int rank() const { return group_.rank; }
  int size() const { return group_.size; }
  const std::string& name() const { return group_.name; }
  const std::vector<int>& world_ranks() const { return group_.world_ranks; }
  // Whether tensors on `device` can be passed to this backend.
  virtual bool accepts(const Device& device) const = 0;
  // A mark on the device timeline at the current end of the compute stream (what the caller
  // has queued so far), comparable with the device_start/device_end of this backend's work;
  // null for backends without a device timeline (the default).
  virtual std::shared_ptr<DeviceMark> mark_compute() { return nullptr; }

  // Starts the collective `c`. Allreduce: in and out have the same numel and may be the same
  // tensor. Reduce-scatter: in has size() * out.numel() elements. All-gather: out has size() *
  // in.numel() elements; in may be this rank's slice of out. Broadcast: in is out. Barrier: none.
  virtual std::shared_ptr<WorkImpl> post(const Collective& c, const Tensor& in,
                                         const Tensor& out) = 0;
  // Collective: ranks with the same color >= 0 form a new group, ordered by (key, rank); a
  // negative color returns nullptr. Blocks until every rank has called it (or CommTimeout).
  virtual std::unique_ptr<Backend> split(const Collective& c) = 0;

  // One send or recv of a batch: c.op is kSend or kRecv; c.peer (another rank of the group),
  // c.seq (the op's number among this rank's ops of that kind with that peer, from 1), c.dtype,
  // c.in_shape and c.label are set; `tensor` is defined and accepted.
  struct P2pCall {
    Collective c;
    Tensor tensor;
  };
  // Starts every op of `calls` together, without blocking (NCCL: one ncclGroupStart/End, so that
  // none waits for another on the device), and returns one WorkImpl per call, in order. A send
  // is matched by the peer's recv with the same number; a WorkImpl completes when its transfer
  // has (a send: the data has left `tensor`; a recv: it is in `tensor`). Throws InvalidArgument
  // only before starting anything. The default: InvalidArgument (no point-to-point).
  virtual std::vector<std::shared_ptr<WorkImpl>> post_p2p(const std::vector<P2pCall>& calls);

  // Releases the group after its work has completed. Collective in spirit; must not hang.
  virtual void finalize() = 0;
  // Ends the job (MPI, NCCL) or fails every pending and future collective of the world
  // (loopback). Never throws.
  virtual void abort(int code) noexcept = 0;
  // The group could not be finalized cleanly (a collective timed out): release what can be
  // released without waiting. Returns true when collectives may still be running in the vendor
  // library, so that their buffers (and this backend) must be leaked rather than freed under
  // it. Never throws.
  virtual bool abandon() noexcept = 0;

 private:
  GroupInfo group_;
};

// One send or recv of Communicator::exchange().
struct P2pOp {
  OpType op = OpType::kSend;  // kSend or kRecv
  Tensor tensor;
  int peer = -1;
  std::string label;  // see Communicator::send

  static P2pOp send(Tensor tensor, int peer, std::string label = {}) {
    return {OpType::kSend, std::move(tensor), peer, std::move(label)};
  }
  static P2pOp recv(Tensor tensor, int peer, std::string label = {}) {
    return {OpType::kRecv, std::move(tensor), peer, std::move(label)};
  }
};

class Communicator {
 public:
  // A split with a negative color yields a communicator that is not valid().
  Communicator() = default;
  Communicator(std::unique_ptr<Backend> backend, CommOptions options);
  // Finalizes if still open (errors are logged, never thrown); a communicator that timed out is
  // abandoned instead, since its peers may never complete.
  ~Communicator();
  Communicator(Communicator&&) noexcept;
  Communicator& operator=(Communicator&&) noexcept;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  bool valid() const { return backend_ != nullptr; }
  explicit operator bool() const { return valid(); }
  int rank() const;
  int size() const;
  const std::string& name() const;
  const CommOptions& options() const { return options_; }
  // The sequence number the next collective will get.
  std::uint64_t next_seq() const { return next_seq_; }
  Backend& backend();
  // See Backend::mark_compute: null for host backends.
  std::shared_ptr<DeviceMark> mark_compute();

  // Allreduce in place: every rank's `tensor` becomes the reduction over all ranks.
  Work allreduce(const Tensor& tensor, ReduceOp op = ReduceOp::kSum);
  // Out of place: out = reduction of every rank's in (same numel and dtype; may be the same).
  Work allreduce(const Tensor& in, const Tensor& out, ReduceOp op = ReduceOp::kSum);
  // in holds size() equal chunks; rank r's out receives the reduction of chunk r.
  Work reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op = ReduceOp::kSum);
  // out holds size() equal chunks; chunk r is rank r's in. `in` may be this rank's chunk of out.
  Work all_gather(const Tensor& in, const Tensor& out);
  // Every rank's tensor becomes root's.
  Work broadcast(const Tensor& tensor, int root);
  Work barrier();

  // Collective over this group: see Backend::split. Children inherit the options and are
  // independent of the parent (either may be finalized first).
  Communicator split(int color, int key);

  // Point-to-point. Asynchronous: posting never blocks; the Work completes when the transfer
  // has (a send: the data has left `tensor`, which must not be written until then; a recv: it is
  // in `tensor`, which must not be read until then). `peer` is another rank of this group.
  // Streams (NCCL): as the collectives, ordered after the work queued on the compute stream at
  // posting, run on the group's NCCL stream; Work::wait() orders the compute stream after them.
  // Thread-safety: as the collectives (one thread at a time per communicator).
  //
  // Matching: the k-th send from rank a to rank b on a group is received by b's k-th recv from a
  // (FIFO per pair and direction, numbered apart from the collectives, which they do not
  // disturb). A send and its recv have the same dtype and shape: the byte counts are always
  // compared where the backend can (loopback, MPI), dtype and shape with MESHTRAIN_COMM_DEBUG=1
  // (loopback: always); a mismatch is InvalidArgument on the receiving rank.
  //
  // Deadlock rule (comm/README.md): (1) post every op a peer may be waiting for before waiting
  // on anything; (2) ops that must be in flight at the same time (a send and a recv between the
  // same two ranks, a ring shift) go in one exchange(), or are posted in the same relative order
  // on both ranks of every pair. A send may complete only once its recv is posted (loopback:
  // always; MPI: above the eager size), and NCCL runs a group's ops one after another in posting
  // order on its stream, so on NCCL two ranks that each post a lone send to the other before the
  // recv wait for each other forever; in one exchange() they do not.
  //
  // Timeouts: as collectives (CommTimeout `timeout_s` after posting, the group unusable after),
  // naming the peer (group and world rank, and `label`: "pipeline stage 2"; empty: the label set
  // with set_peer_label), whether it posted the matching op, and (MPI, NCCL) whether it is
  // alive, lost or stalled. Errors: a peer that is this rank or not in the group, an undefined
  // tensor, a tensor on a device the backend cannot use: InvalidArgument naming the call, and
  // nothing is posted.
  Work send(const Tensor& tensor, int peer, std::string_view label = {});
  Work recv(const Tensor& tensor, int peer, std::string_view label = {});
  // Posts every op together (Megatron's batch_isend_irecv; NCCL: one ncclGroupStart/End) and
  // returns one Work per op, in order. Ops are numbered in the order given. Recv tensors must
  // not overlap any other op's tensor of the batch. Either every op is posted or none is.
  std::vector<Work> exchange(const std::vector<P2pOp>& ops);
  // The name of `peer` in the messages of sends and recvs posted without a label ("pipeline
  // stage 2"; Mesh names its pipeline group's ranks so). Local to this rank.
  void set_peer_label(int peer, std::string label);
  // The number the next send to (recv from) `peer` will get.
  std::uint64_t next_send_seq(int peer) const;
  std::uint64_t next_recv_seq(int peer) const;

  // Waits for every outstanding collective of this communicator.
  void wait_all();
  // Waits for outstanding work, then releases the group. Every rank calls it. After a timeout
  // it waits at most one more timeout for the late ranks, then abandons the group. Idempotent.
  void finalize();
  // Ends the job with a non-zero status (MPI, NCCL: MPI_Abort over the world); loopback fails
  // every pending and future collective of its world instead. Never throws.
  void abort(int code = 1) noexcept;

 private:
  Work post(Collective c, const Tensor& in, const Tensor& out);
  void check_usable() const;
  void prune();
  // InvalidArgument unless `peer` is another rank of this group; `call` names the caller.
  void check_peer(int peer, std::string_view call) const;
  void ensure_p2p_tables();
  void abandon_group() noexcept;

  std::unique_ptr<Backend> backend_;
  CommOptions options_;
  std::uint64_t next_seq_ = 1;
  std::vector<Work> outstanding_;
  std::shared_ptr<detail::GroupHealth> health_;
  // Point-to-point, by peer (group rank); sized on first use.
  std::vector<std::uint64_t> sends_posted_, recvs_posted_;
  std::vector<std::string> peer_labels_;
};

}  // namespace meshtrain::comm
