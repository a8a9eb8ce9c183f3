// Internal to the MPI backend (comm/mpi/mpi_backend.cpp and the works it posts): MpiGroup,
// everything a group's operations share (the duplicated communicator, its 16-bit datatypes and
// reduction ops, the arrival board, the progress engine, the point-to-point tags) and the
// descriptions of its timeouts, with the user reduction ops it registers.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <condition_variable>
#include <functional>
#include <thread>

#include "comm/mpi.hpp"
#include "comm/mpi/arrivals.hpp"
#include "comm/mpi/liveness.hpp"
#include "comm/mpi/mpi_check.hpp"
#include "comm/mpi/progress.hpp"
#include "comm/mpi/reduce16.hpp"
#include "comm/mpi/ring.hpp"
#include "runtime/log.hpp"

namespace meshtrain::comm::detail {

using Clock = std::chrono::steady_clock;

// The first point-to-point tag: the rings use 0 .. 32767 (MpiGroup::tag_ub).
constexpr int kP2pTagFirst = 32768;

template <DType D, ReduceOp R>
void user_op(void* in, void* inout, int* len, MPI_Datatype*) {
  reduce16(D, R, in, inout, static_cast<std::size_t>(*len));
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

}  // namespace meshtrain::comm::detail
