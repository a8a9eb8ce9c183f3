// The Communicator's point-to-point: send, recv and exchange (argument checks, numbering per
// peer and direction, the peers' labels) and the default Backend::post_p2p of a backend without
// it. The deadlock rule and the matching are described in comm/README.md.
#include "comm/communicator.hpp"

#include <algorithm>
#include <mutex>
#include <thread>
#include <utility>

#include "comm/communicator_impl.hpp"
#include "runtime/error.hpp"
#include "runtime/log.hpp"
#include "runtime/settings.hpp"

namespace meshtrain::comm {

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

}  // namespace meshtrain::comm
