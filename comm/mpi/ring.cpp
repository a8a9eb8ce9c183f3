#include "comm/mpi/ring.hpp"

#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <exception>
#include <mutex>
#include <vector>

#include "comm/mpi/mpi_check.hpp"
#include "comm/mpi/progress.hpp"
#include "comm/mpi/reduce16.hpp"
#include "runtime/log.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain::comm::detail {
namespace {

constexpr std::size_t kSegmentBytes = 1u << 20;
// Below this, an allreduce over two ranks exchanges whole buffers (one synchronisation
// instead of two; each rank reduces everything): 1.3-1.5x faster than the ring from 64 to
// 256 KiB, even at 512 KiB, and slower from 1 MiB up (the ring reduces half as much, and in
// place the exchange must wait for each segment's send before overwriting it).
constexpr std::size_t kExchangeMaxBytes = 512u << 10;

int mod(int a, int n) {
  return ((a % n) + n) % n;
}

struct RecvSegment {
  MPI_Request request = MPI_REQUEST_NULL;
  std::int64_t offset = 0;  // elements into the chunk
  std::int64_t length = 0;
  int slot = 0;  // temp buffer, in the reduce-scatter phase
};

}  // namespace

struct RingOp::Impl {
  RingSpec s;
  MPI_Comm comm = MPI_COMM_NULL;
  MPI_Datatype type = MPI_DATATYPE_NULL;
  std::size_t esize = 0;
  int rank = 0;
  int size = 1;
  int left = 0;
  int right = 0;
  std::int64_t seg = 0;  // elements per segment
  // Two ranks, below kExchangeMaxBytes: exchange whole buffers and reduce everything in one
  // step instead of the ring's two.
  bool exchange = false;

  enum Phase { kReduceScatter, kAllGather, kDone } phase = kReduceScatter;
  int step = 0;

  // The current step.
  std::vector<MPI_Request> sends;
  std::vector<MPI_Request> next_sends;  // the next step's, posted as this step finishes segments
  std::deque<RecvSegment> recvs;
  std::int64_t recv_chunk = 0;   // chunk index received this step
  std::int64_t next_offset = 0;  // next segment of the received chunk to post
  bool free_slot[2] = {true, true};

  Tensor temp;        // 2 segments: what the reduce-scatter phase receives into
  Tensor partial[2];  // reduce-scatter only: the partial sums passed on between steps
  std::exception_ptr error;
  std::atomic<bool> finished{false};
  std::mutex mu;  // advance() from two threads at once (MPI_THREAD_MULTIPLE) is serialised

  // Element range of chunk c.
  std::int64_t chunk_begin(std::int64_t c) const {
    if (exchange) return c == 0 ? 0 : s.count;
    if (s.reduce_scatter) return c * (s.count / size);
    return c * s.count / size;
  }
  std::int64_t chunk_length(std::int64_t c) const { return chunk_begin(c + 1) - chunk_begin(c); }

  const std::uint8_t* in_at(std::int64_t element) const {
    return static_cast<const std::uint8_t*>(s.in) + element * esize;
  }
  std::uint8_t* out_at(std::int64_t element) const {
    return static_cast<std::uint8_t*>(s.out) + element * esize;
  }

  int steps() const { return exchange ? 1 : size - 1; }

  // Where the chunk received at reduce-scatter step `st` is combined into.
  std::uint8_t* rs_destination(std::int64_t c, int st) const {
    if (!s.reduce_scatter) return out_at(chunk_begin(c));
    if (st == steps() - 1) return static_cast<std::uint8_t*>(s.out);
    return static_cast<std::uint8_t*>(partial[st % 2].data());
  }

  // Whether the current step is the last of the whole operation.
  bool last_step() const {
    if (step != steps() - 1) return false;
    return exchange || phase == kAllGather || s.reduce_scatter;
  }

  void start_step() {
    // This step's sends were posted segment by segment as the previous step finished them
    // (forward()), except the first step's, which come from the input.
    sends = std::move(next_sends);
    next_sends.clear();
    recvs.clear();
    next_offset = 0;
    free_slot[0] = free_slot[1] = true;
    if (phase == kReduceScatter) {
      // Allreduce ends with chunk r+1 reduced on rank r; reduce-scatter shifts by one so that
      // rank r ends with chunk r.
      const int shift = s.reduce_scatter ? 1 : 0;
      const std::int64_t send_chunk = exchange ? 0 : mod(rank - step - shift, size);
      recv_chunk = exchange ? 0 : mod(rank - step - 1 - shift, size);
      if (step == 0) {
        const std::int64_t len = chunk_length(send_chunk);
        const auto* src = in_at(chunk_begin(send_chunk));
        for (std::int64_t off = 0; off < len; off += seg) {
          const std::int64_t n = std::min(seg, len - off);
          MPI_Request& r = sends.emplace_back(MPI_REQUEST_NULL);
          MT_MPI_CHECK(
              MPI_Isend(src + off * esize, static_cast<int>(n), type, right, s.tag, comm, &r));
        }
      }
      post_receives();
    } else {
      recv_chunk = mod(rank - step, size);
      // Straight into the output, every segment at once.
      const std::int64_t len = chunk_length(recv_chunk);
      for (std::int64_t off = 0; off < len; off += seg) {
        RecvSegment& r = recvs.emplace_back();
        r.offset = off;
        r.length = std::min(seg, len - off);
        MT_MPI_CHECK(MPI_Irecv(out_at(chunk_begin(recv_chunk) + off), static_cast<int>(r.length),
                               type, left, s.tag, comm, &r.request));
      }
      next_offset = len;
    }
  }

  // A segment of this step's received chunk is final in its destination. The next step sends
  // exactly that chunk on (in every transition: reduce-scatter to reduce-scatter, to
  // all-gather, all-gather to all-gather), so the segment is sent at once: the peer can take
  // it while this rank works on the rest, instead of every rank waiting at step boundaries.
  // Sends to one peer are posted in the order the peer posts its receives, which is what
  // matches them (one tag, non-overtaking).
  void forward(const RecvSegment& r) {
    if (last_step()) return;
    const std::uint8_t* src = phase == kReduceScatter
                                  ? rs_destination(recv_chunk, step) + r.offset * esize
                                  : out_at(chunk_begin(recv_chunk) + r.offset);
    MPI_Request& req = next_sends.emplace_back(MPI_REQUEST_NULL);
    MT_MPI_CHECK(MPI_Isend(src, static_cast<int>(r.length), type, right, s.tag, comm, &req));
  }

  // Reduce-scatter phase: keeps a receive posted in every free temp slot.
  void post_receives() {
    const std::int64_t len = chunk_length(recv_chunk);
    for (int slot = 0; slot < 2 && next_offset < len; ++slot) {
      if (!free_slot[slot]) continue;
      RecvSegment& r = recvs.emplace_back();
      r.offset = next_offset;
      r.length = std::min(seg, len - next_offset);
      r.slot = slot;
      free_slot[slot] = false;
      next_offset += r.length;
      auto* buf = static_cast<std::uint8_t*>(temp.data()) + slot * seg * esize;
      MT_MPI_CHECK(MPI_Irecv(buf, static_cast<int>(r.length), type, left, s.tag, comm, &r.request));
    }
  }

  bool advance_locked() {
    while (phase != kDone) {
      // Received segments, in order: combine them, then reuse their slot.
      while (!recvs.empty()) {
        RecvSegment& r = recvs.front();
        int flag = 0;
        MT_MPI_CHECK(MPI_Test(&r.request, &flag, MPI_STATUS_IGNORE));
        if (!flag) break;
        if (phase == kReduceScatter) {
          if (exchange) {
            // In place, the segment about to be overwritten is the one this rank sends: its
            // send must have completed (the peer has copied it) first.
            int sent_seg = 0;
            MT_MPI_CHECK(MPI_Test(&sends[r.offset / seg], &sent_seg, MPI_STATUS_IGNORE));
            if (!sent_seg) break;
          }
          const bool last = step == steps() - 1;
          const std::int64_t first = chunk_begin(recv_chunk) + r.offset;
          const auto* recv = static_cast<const std::uint8_t*>(temp.data()) + r.slot * seg * esize;
          std::uint8_t* dst = rs_destination(recv_chunk, step) + r.offset * esize;
          reduce_into(s.dtype, s.op, in_at(first), recv, dst, static_cast<std::size_t>(r.length),
                      last ? s.final_scale : 1.0f);
          forward(r);
          free_slot[r.slot] = true;
          recvs.pop_front();
          post_receives();
        } else {
          forward(r);
          recvs.pop_front();
        }
        progress_events().fetch_add(1, std::memory_order_relaxed);
      }
      int sent = 0;
      MT_MPI_CHECK(
          MPI_Testall(static_cast<int>(sends.size()), sends.data(), &sent, MPI_STATUSES_IGNORE));
      if (!recvs.empty() || !sent) return false;
      if (++step == steps()) {
        step = 0;
        phase = phase == kReduceScatter && !s.reduce_scatter && !exchange ? kAllGather : kDone;
      }
      if (phase != kDone) start_step();
    }
    progress_events().fetch_add(1, std::memory_order_relaxed);
    finished = true;
    return true;
  }
};

RingOp::RingOp(const RingSpec& spec) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.s = spec;
  m.comm = MPI_Comm_f2c(spec.fortran_comm);
  m.esize = dtype_size(spec.dtype);
  m.type = spec.dtype == DType::kF32 ? MPI_FLOAT : MPI_UINT16_T;
  MT_MPI_CHECK(MPI_Comm_rank(m.comm, &m.rank));
  MT_MPI_CHECK(MPI_Comm_size(m.comm, &m.size));
  MT_ASSERT(m.size >= 2, "a ring needs two ranks");
  MT_ASSERT(!spec.reduce_scatter || spec.count % m.size == 0, "reduce-scatter of {} over {} ranks",
            spec.count, m.size);
  m.left = mod(m.rank - 1, m.size);
  m.right = mod(m.rank + 1, m.size);
  m.seg = std::max<std::int64_t>(1, static_cast<std::int64_t>(kSegmentBytes / m.esize));
  m.exchange = !spec.reduce_scatter && m.size == 2 &&
               static_cast<std::size_t>(spec.count) * m.esize < kExchangeMaxBytes;
  m.temp = Tensor::empty(Shape{2 * m.seg}, spec.dtype, cpu_device());
  if (spec.reduce_scatter && m.size > 2) {
    const std::int64_t chunk = spec.count / m.size;
    m.partial[0] = Tensor::empty(Shape{chunk}, spec.dtype, cpu_device());
    m.partial[1] = Tensor::empty(Shape{chunk}, spec.dtype, cpu_device());
  }
  m.start_step();
}

RingOp::~RingOp() {
  if (impl_ && !impl_->finished) {
    // Only reachable for an abandoned group; its requests may still write into the buffers.
    log::warn("ring operation destroyed before it completed: its buffers are leaked");
    new Tensor(impl_->temp);
    new Tensor(impl_->partial[0]);
    new Tensor(impl_->partial[1]);
  }
}

bool RingOp::done() const {
  return impl_->finished.load(std::memory_order_acquire);
}

bool RingOp::advance() {
  std::lock_guard lock(impl_->mu);
  if (impl_->error) std::rethrow_exception(impl_->error);
  return impl_->advance_locked();
}

namespace {
struct Registry {
  std::mutex mu;
  std::vector<std::weak_ptr<RingOp>> ops;
  std::atomic<int> count{0};  // ops.size(), readable without the lock
};
// The list holds weak references only: it owns no operation, buffer or communicator.
Registry& registry() {
  static Registry r;
  return r;
}
}  // namespace

void ring_register(const std::shared_ptr<RingOp>& op) {
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  r.ops.push_back(op);
  r.count = static_cast<int>(r.ops.size());
}

void ring_progress_all() noexcept {
  Registry& r = registry();
  if (r.count.load(std::memory_order_relaxed) == 0) return;  // the common case: no ring
  // Reused between calls: this runs in every poll of every wait.
  thread_local std::vector<std::shared_ptr<RingOp>> live;
  live.clear();
  {
    std::lock_guard lock(r.mu);
    std::erase_if(r.ops, [](const std::weak_ptr<RingOp>& w) { return w.expired(); });
    for (const auto& w : r.ops) {
      if (auto op = w.lock()) live.push_back(std::move(op));
    }
  }
  for (const auto& op : live) {
    RingOp::Impl& m = *op->impl_;
    std::unique_lock lock(m.mu, std::try_to_lock);
    if (!lock.owns_lock() || m.error || m.finished) continue;
    try {
      m.advance_locked();
    } catch (...) {
      m.error = std::current_exception();
    }
  }
  live.clear();
  std::lock_guard lock(r.mu);
  std::erase_if(r.ops, [](const std::weak_ptr<RingOp>& w) {
    auto op = w.lock();
    return !op || op->impl_->finished;
  });
  r.count = static_cast<int>(r.ops.size());
}

}  // namespace meshtrain::comm::detail
