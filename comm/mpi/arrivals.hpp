// The side channel that makes timeouts diagnosable and debug checks possible.
//
// Every rank announces each collective it posts (its full signature, ~100 bytes) to every other
// rank of the group with non-blocking sends, on a private duplicate of the group's MPI
// communicator. Each rank keeps one receive posted per peer and drains them whenever it touches
// the communicator. The announcement is made when the call is posted, so it reaches the peers
// whatever the caller does next; a rank that never posts the collective never announces it. So
// when a collective times out, the ranks whose announcement for that sequence number has not
// arrived are exactly the ranks that never arrived, and the others are named with what they last
// posted. No peer has to answer anything at timeout time: a stuck peer cannot.
//
// Point-to-point ops (send, recv) are announced too, to their peer only: at a timeout the board
// says whether the peer posted the matching op (and with what dtype and shape), and debug mode
// compares a recv with its send.
//
// MPI orders messages between two ranks on one communicator, so each peer's announcements
// arrive in sequence order. Cost: size - 1 small eager sends per collective per rank, negligible
// next to a collective's own traffic for the group sizes of CPU jobs; a tree-shaped scheme would
// be the step to take for thousands of ranks.
//
// Used by the MPI backend and by the NCCL backend (whose bootstrap is MPI). Internal to comm/;
// not thread-safe (its owner serialises calls). No mpi.h here: the communicator is given by its
// Fortran handle (MPI_Comm_c2f).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "comm/communicator.hpp"

namespace meshtrain::comm::detail {

class ArrivalBoard {
 public:
  using Clock = std::chrono::steady_clock;

  // Duplicates `fortran_comm` (collective over it; MPI_Comm_idup, so that a rank that never
  // comes makes it fail with CommTimeout at `deadline` rather than hang).
  ArrivalBoard(std::int32_t fortran_comm, Clock::time_point deadline);
  // Frees what finalize()/abandon() did not; never throws.
  ~ArrivalBoard();
  ArrivalBoard(const ArrivalBoard&) = delete;
  ArrivalBoard& operator=(const ArrivalBoard&) = delete;

  int rank() const;
  int size() const;

  // Announces `c` (this rank has posted it) to every peer, without blocking. Announcements
  // received for earlier sequence numbers are forgotten (but each peer's latest), so memory is
  // bounded by how far peers run ahead.
  void announce(const Collective& c);
  // Drains arrived announcements and retires completed sends, without blocking.
  void progress();
  // The group ranks (never this one) that have not announced sequence number `seq`, after
  // draining for up to `grace` to let announcements in flight land; and what each of them
  // last announced ("" if nothing).
  std::vector<int> missing(std::uint64_t seq, std::chrono::milliseconds grace,
                           std::vector<std::string>* last_seen);
  // Blocks until every peer has announced `mine.seq`, then returns every rank's call for it (by
  // group rank, this rank's included). Returns std::nullopt if `deadline` passes first.
  std::optional<std::vector<Collective>> await_all(const Collective& mine,
                                                   Clock::time_point deadline);
  // Announces the send or recv `c` (c.op, c.peer, c.seq: its number among this rank's ops of
  // that kind with that peer) to c.peer only, without blocking.
  void announce_p2p(const Collective& c);
  // What c.peer has announced of its point-to-point ops with this rank, after draining for up
  // to `grace` until it has announced the op matching `c` (this rank's send or recv): its recv
  // #c.seq for a send, its send #c.seq for a recv. `matching` is set once it has (the latest 64
  // announcements of each kind per peer are kept); `last` is its latest op of that kind.
  PeerP2p p2p_peer(const Collective& c, std::chrono::milliseconds grace);
  // Drains until every peer has announced `last_seq` and the ops matching this rank's sends and
  // recvs (or `deadline`), then cancels the receives and frees the duplicate communicator.
  void finalize(std::uint64_t last_seq, Clock::time_point deadline);
  // Releases without waiting for anyone (after a timeout). Never throws.
  void abandon() noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace meshtrain::comm::detail
