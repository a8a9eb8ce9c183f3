// What the communicator says about calls: the names of ops and reductions, a call's signature
// (Collective::str, same_call), the mismatch reports of debug mode and point-to-point, and the
// timeout messages every backend shares (who never arrived, who is lost or stalled).
#include "comm/communicator.hpp"

#include <algorithm>
#include <mutex>
#include <thread>
#include <utility>

#include "runtime/error.hpp"
#include "runtime/log.hpp"
#include "runtime/settings.hpp"

namespace meshtrain::comm {

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

}  // namespace meshtrain::comm
