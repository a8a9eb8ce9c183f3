#include "comm/mpi/arrivals.hpp"

#include <mpi.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <thread>
#include <type_traits>

#include "comm/mpi/liveness.hpp"
#include "comm/mpi/mpi_check.hpp"
#include "comm/mpi/ring.hpp"
#include "runtime/log.hpp"

namespace meshtrain::comm::detail {
namespace {

constexpr int kTag = 0x4d54;  // "MT"; the duplicate communicator carries nothing else
// Point-to-point announcements kept per peer and kind, for the debug comparison of a recv with
// its send (a pipeline has a few messages in flight per pair).
constexpr std::size_t kP2pKept = 64;

// A Collective in a fixed-size, trivially copyable form.
struct Notice {
  std::uint64_t seq;
  std::int64_t dims[Shape::kMaxDims];
  std::int64_t out_numel;
  std::int32_t ndim;
  std::int32_t root;
  std::int32_t color;
  std::int32_t key;
  std::uint8_t op;
  std::uint8_t reduce;
  std::uint8_t dtype;
  std::uint8_t pad[5];
};
static_assert(std::is_trivially_copyable_v<Notice>);

Notice to_notice(const Collective& c) {
  Notice n{};
  n.seq = c.seq;
  n.ndim = c.in_shape.ndim();
  for (int i = 0; i < n.ndim; ++i) n.dims[i] = c.in_shape[i];
  n.out_numel = c.out_numel;
  n.root = c.root;
  n.color = c.color;
  n.key = c.key;
  n.op = static_cast<std::uint8_t>(c.op);
  n.reduce = static_cast<std::uint8_t>(c.reduce);
  n.dtype = static_cast<std::uint8_t>(c.dtype);
  return n;
}

Collective from_notice(const Notice& n) {
  Collective c;
  c.seq = n.seq;
  const int ndim = std::clamp<int>(n.ndim, 0, Shape::kMaxDims);
  c.in_shape = Shape(std::vector<std::int64_t>(n.dims, n.dims + ndim));
  c.out_numel = n.out_numel;
  c.root = n.root;
  c.color = n.color;
  c.key = n.key;
  c.op = static_cast<OpType>(n.op);
  c.reduce = static_cast<ReduceOp>(n.reduce);
  c.dtype = static_cast<DType>(n.dtype);
  return c;
}

// One announcement being sent to every peer: the buffer lives until every send completed.
struct Outgoing {
  Notice notice;
  std::vector<MPI_Request> requests;
};

}  // namespace

struct ArrivalBoard::Impl {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0;
  int size = 1;
  // Per peer: the receive kept posted, its buffer, and the announcements received (in order).
  std::vector<MPI_Request> recv_requests;
  std::vector<Notice> recv_buffers;
  std::vector<std::deque<Collective>> received;
  std::vector<std::uint64_t> latest;  // highest sequence number announced by each peer
  std::deque<Outgoing> outgoing;
  // Point-to-point, per peer: what it announced of its ops with this rank (the highest numbers
  // and the latest few of each kind), and how many this rank posted with it.
  struct P2pIn {
    std::uint64_t sends = 0, recvs = 0;
    std::deque<Collective> sends_kept, recvs_kept;
  };
  std::vector<P2pIn> p2p_in;
  std::vector<std::uint64_t> p2p_sends_out, p2p_recvs_out;

  void record_p2p(int peer, Collective c) {
    P2pIn& in = p2p_in[peer];
    c.peer = rank;  // the op as the peer posted it: with this rank
    const bool is_send = c.op == OpType::kSend;
    std::uint64_t& highest = is_send ? in.sends : in.recvs;
    highest = std::max(highest, c.seq);
    auto& kept = is_send ? in.sends_kept : in.recvs_kept;
    kept.push_back(std::move(c));
    if (kept.size() > kP2pKept) kept.pop_front();
  }

  // Whether every peer has announced the ops matching this rank's sends and recvs.
  bool p2p_matched() const {
    for (int peer = 0; peer < size; ++peer) {
      if (peer == rank) continue;
      if (p2p_in[peer].sends < p2p_recvs_out[peer] || p2p_in[peer].recvs < p2p_sends_out[peer])
        return false;
    }
    return true;
  }

  void post_recv(int peer) {
    MT_MPI_CHECK(MPI_Irecv(&recv_buffers[peer], sizeof(Notice), MPI_BYTE, peer, kTag, comm,
                           &recv_requests[peer]));
  }

  void drain() {
    if (size == 1) return;
    std::vector<int> idx(size);
    for (;;) {
      int count = 0;
      MT_MPI_CHECK(
          MPI_Testsome(size, recv_requests.data(), &count, idx.data(), MPI_STATUSES_IGNORE));
      if (count == MPI_UNDEFINED || count == 0) break;
      for (int i = 0; i < count; ++i) {
        const int peer = idx[i];
        const Collective c = from_notice(recv_buffers[peer]);
        if (is_p2p(c.op)) {
          record_p2p(peer, c);
        } else {
          latest[peer] = std::max(latest[peer], c.seq);
          received[peer].push_back(c);
        }
        post_recv(peer);
      }
    }
    while (!outgoing.empty()) {
      int done = 0;
      auto& reqs = outgoing.front().requests;
      MT_MPI_CHECK(
          MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &done, MPI_STATUSES_IGNORE));
      if (!done) break;
      outgoing.pop_front();
    }
  }

  void cancel_receives() noexcept {
    for (int peer = 0; peer < size; ++peer) {
      if (recv_requests[peer] == MPI_REQUEST_NULL) continue;
      MT_MPI_LOG(MPI_Cancel(&recv_requests[peer]));
      MT_MPI_LOG(MPI_Wait(&recv_requests[peer], MPI_STATUS_IGNORE));
    }
  }
};

ArrivalBoard::ArrivalBoard(std::int32_t fortran_comm, Clock::time_point deadline)
    : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  MPI_Comm parent = MPI_Comm_f2c(fortran_comm);
  MPI_Request req = MPI_REQUEST_NULL;
  MT_MPI_CHECK(MPI_Comm_idup(parent, &s.comm, &req));
  for (int flag = 0; !flag;) {
    MT_MPI_CHECK(MPI_Test(&req, &flag, MPI_STATUS_IGNORE));
    if (!flag && Clock::now() >= deadline) {
      // The request cannot be cancelled; the half-made communicator is leaked.
      throw CommTimeout(
          "creating the side channel of a communicator (MPI_Comm_idup) did not "
          "complete in time: not every rank of the group is creating it");
    }
    if (!flag) {
      ring_progress_all();
      std::this_thread::yield();
    }
  }
  MT_MPI_CHECK(MPI_Comm_set_errhandler(s.comm, MPI_ERRORS_RETURN));
  MT_MPI_CHECK(MPI_Comm_rank(s.comm, &s.rank));
  MT_MPI_CHECK(MPI_Comm_size(s.comm, &s.size));
  s.recv_requests.assign(s.size, MPI_REQUEST_NULL);
  s.recv_buffers.resize(s.size);
  s.received.resize(s.size);
  s.latest.assign(s.size, 0);
  s.p2p_in.resize(s.size);
  s.p2p_sends_out.assign(s.size, 0);
  s.p2p_recvs_out.assign(s.size, 0);
  for (int peer = 0; peer < s.size; ++peer) {
    if (peer != s.rank) s.post_recv(peer);
  }
}

ArrivalBoard::~ArrivalBoard() {
  if (impl_ && impl_->comm != MPI_COMM_NULL) abandon();
}

int ArrivalBoard::rank() const {
  return impl_->rank;
}
int ArrivalBoard::size() const {
  return impl_->size;
}

void ArrivalBoard::announce(const Collective& c) {
  Impl& s = *impl_;
  if (s.size == 1) return;
  s.drain();
  for (auto& q : s.received) {
    while (q.size() > 1 && q.front().seq < c.seq) q.pop_front();
  }
  Outgoing& out = s.outgoing.emplace_back();
  out.notice = to_notice(c);
  out.requests.reserve(s.size - 1);
  for (int peer = 0; peer < s.size; ++peer) {
    if (peer == s.rank) continue;
    MPI_Request& r = out.requests.emplace_back(MPI_REQUEST_NULL);
    MT_MPI_CHECK(MPI_Isend(&out.notice, sizeof(Notice), MPI_BYTE, peer, kTag, s.comm, &r));
  }
}

void ArrivalBoard::announce_p2p(const Collective& c) {
  Impl& s = *impl_;
  MT_ASSERT(is_p2p(c.op) && c.peer >= 0 && c.peer < s.size && c.peer != s.rank,
            "announce_p2p of {} with peer {} on a group of {}", c.str(), c.peer, s.size);
  s.drain();
  std::uint64_t& posted = c.op == OpType::kSend ? s.p2p_sends_out[c.peer] : s.p2p_recvs_out[c.peer];
  posted = std::max(posted, c.seq);
  Outgoing& out = s.outgoing.emplace_back();
  out.notice = to_notice(c);
  MPI_Request& r = out.requests.emplace_back(MPI_REQUEST_NULL);
  MT_MPI_CHECK(MPI_Isend(&out.notice, sizeof(Notice), MPI_BYTE, c.peer, kTag, s.comm, &r));
}

PeerP2p ArrivalBoard::p2p_peer(const Collective& c, std::chrono::milliseconds grace) {
  Impl& s = *impl_;
  MT_ASSERT(is_p2p(c.op) && c.peer >= 0 && c.peer < s.size && c.peer != s.rank,
            "p2p_peer of {} with peer {} on a group of {}", c.str(), c.peer, s.size);
  const OpType want = c.op == OpType::kSend ? OpType::kRecv : OpType::kSend;
  const auto until = Clock::now() + grace;
  PeerP2p out;
  for (;;) {
    s.drain();
    const Impl::P2pIn& in = s.p2p_in[c.peer];
    const auto& kept = want == OpType::kSend ? in.sends_kept : in.recvs_kept;
    out.sends = in.sends;
    out.recvs = in.recvs;
    out.last = kept.empty() ? std::nullopt : std::optional<Collective>(kept.back());
    const auto it =
        std::find_if(kept.begin(), kept.end(), [&](const Collective& x) { return x.seq == c.seq; });
    if (it != kept.end()) out.matching = *it;
    if (out.matching || Clock::now() >= until) break;
    ring_progress_all();
    liveness_serve();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return out;
}

void ArrivalBoard::progress() {
  impl_->drain();
}

std::vector<int> ArrivalBoard::missing(std::uint64_t seq, std::chrono::milliseconds grace,
                                       std::vector<std::string>* last_seen) {
  Impl& s = *impl_;
  const auto until = Clock::now() + grace;
  auto absent = [&] {
    std::vector<int> out;
    for (int peer = 0; peer < s.size; ++peer) {
      if (peer != s.rank && s.latest[peer] < seq) out.push_back(peer);
    }
    return out;
  };
  std::vector<int> out;
  for (;;) {
    s.drain();
    ring_progress_all();
    out = absent();
    if (out.empty() || Clock::now() >= until) break;
    liveness_serve();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (last_seen) {
    last_seen->clear();
    for (int peer : out) {
      last_seen->push_back(s.received[peer].empty() ? std::string()
                                                    : s.received[peer].back().str());
    }
  }
  return out;
}

std::optional<std::vector<Collective>> ArrivalBoard::await_all(const Collective& mine,
                                                               Clock::time_point deadline) {
  Impl& s = *impl_;
  for (int spins = 0;; ++spins) {
    s.drain();
    ring_progress_all();
    bool all = true;
    for (int peer = 0; peer < s.size && all; ++peer) {
      all = peer == s.rank || s.latest[peer] >= mine.seq;
    }
    if (all) break;
    if (Clock::now() >= deadline) return std::nullopt;
    if (spins > 64) std::this_thread::yield();
  }
  std::vector<Collective> calls(s.size);
  for (int peer = 0; peer < s.size; ++peer) {
    if (peer == s.rank) {
      calls[peer] = mine;
      continue;
    }
    const auto& q = s.received[peer];
    const auto it =
        std::find_if(q.begin(), q.end(), [&](const Collective& c) { return c.seq == mine.seq; });
    MT_ASSERT(it != q.end(), "rank {}'s announcement of #{} was lost", peer, mine.seq);
    calls[peer] = *it;
  }
  return calls;
}

void ArrivalBoard::finalize(std::uint64_t last_seq, Clock::time_point deadline) {
  Impl& s = *impl_;
  if (s.comm == MPI_COMM_NULL) return;
  // Drain what the peers announced up to the end, so that no message is left unmatched.
  for (int spins = 0;; ++spins) {
    s.drain();
    ring_progress_all();
    bool all = s.outgoing.empty() && s.p2p_matched();
    for (int peer = 0; peer < s.size && all; ++peer) {
      all = peer == s.rank || s.latest[peer] >= last_seq;
    }
    if (all) break;
    if (Clock::now() >= deadline) {
      log::warn(
          "communicator side channel: not every rank announced #{} (and the sends and recvs "
          "matching this rank's) before finalize",
          last_seq);
      abandon();
      return;
    }
    if (spins > 64) std::this_thread::yield();
  }
  s.cancel_receives();
  MT_MPI_CHECK(MPI_Comm_free(&s.comm));
}

void ArrivalBoard::abandon() noexcept {
  Impl& s = *impl_;
  if (s.comm == MPI_COMM_NULL) return;
  s.cancel_receives();
  // Sends that have not completed may still read their buffers: free the requests (MPI
  // completes them in the background) and leak the buffers.
  for (auto& out : s.outgoing) {
    for (MPI_Request& r : out.requests) {
      if (r != MPI_REQUEST_NULL) MT_MPI_LOG(MPI_Request_free(&r));
    }
  }
  if (!s.outgoing.empty()) new std::deque<Outgoing>(std::move(s.outgoing));
  MT_MPI_LOG(MPI_Comm_free(&s.comm));
  s.comm = MPI_COMM_NULL;
}

}  // namespace meshtrain::comm::detail
