// Ring allreduce and reduce-scatter over MPI non-blocking point-to-point, advanced by the
// caller: the large-message path of the MPI backend.
//
// Why not MPI_Iallreduce for large messages: Open MPI's non-blocking collectives (libnbc) pick a
// reduce-then-broadcast tree below 4 ranks and for every in-place call, which serialises the
// two ranks of a pair and measured 60-83% of the blocking MPI_Allreduce from 64 KiB to 16 MiB
// on 2 ranks (under 50% in place).
// The ring is bandwidth-optimal for any rank count (each rank sends and receives 2(n-1)/n of
// the buffer), reduces with our own loops (fp32 arithmetic on 16-bit data, the avg division
// fused into the last step), and does not depend on how an MPI build tunes libnbc.
//
// Algorithm (rank r of n, buffer in n chunks): reduce-scatter in n-1 steps, each sending one
// chunk to rank r+1 and receiving one from rank r-1, which is combined with this rank's input
// into the output (or a scratch chunk for reduce-scatter); then, for allreduce, all-gather in
// n-1 steps passing the reduced chunks around. An allreduce over exactly two ranks below
// 512 KiB instead exchanges the whole buffers and each rank reduces all of it: one
// synchronisation instead of two, which measured faster there (the ring wins above). Within a
// step the chunk travels in segments of 1 MiB received into two alternating buffers, so that the
// reduction of one segment reads data still in cache. One tag per operation (from its sequence
// number) keeps concurrent operations apart; within one, MPI's non-overtaking order matches the
// segments.
//
// Progress: an operation advances only when advance() is called. Every ring in flight is
// registered in one process-wide list of weak references (it owns nothing), and every progress
// call of any MPI work advances all of them, so that waiting on one operation never starves
// another one that a peer is waiting on. The progress thread (comm/mpi/progress.hpp) calls
// ring_progress_all() too, so rings move while the caller computes. Internal to comm/; no mpi.h
// here.
#pragma once

#include <cstdint>
#include <memory>

#include "comm/communicator.hpp"

namespace meshtrain::comm::detail {

struct RingSpec {
  bool reduce_scatter = false;  // allreduce otherwise
  DType dtype = DType::kF32;    // fp32, bf16 or fp16
  ReduceOp op = ReduceOp::kSum;
  // Allreduce: `count` elements each; out may be in. Reduce-scatter: in has `count` elements
  // (size equal chunks) and out one chunk; they do not overlap.
  const void* in = nullptr;
  void* out = nullptr;
  std::int64_t count = 0;
  // Applied once to every element, when its reduction completes (1/size for kAvg, else 1).
  float final_scale = 1.0f;
  std::int32_t fortran_comm = 0;  // MPI_Comm_c2f of the group's communicator (size >= 2)
  int tag = 0;
};

class RingOp {
 public:
  // Posts the first step.
  explicit RingOp(const RingSpec& spec);
  // An operation destroyed before completion (its group abandoned) leaks its requests' buffers.
  ~RingOp();
  RingOp(const RingOp&) = delete;
  RingOp& operator=(const RingOp&) = delete;

  // Advances as far as possible without blocking; true once the output is complete. Throws
  // MpiError, also one raised while another operation's wait advanced this one.
  bool advance();
  // Whether the output is complete (without advancing; any thread).
  bool done() const;

 private:
  friend void ring_progress_all() noexcept;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Adds `op` to the process-wide list of rings in flight.
void ring_register(const std::shared_ptr<RingOp>& op);
// Advances every ring in flight; errors are kept for the operation's own advance(). Every
// polling loop of comm/mpi calls it, so that a rank waiting anywhere keeps its rings moving.
void ring_progress_all() noexcept;

}  // namespace meshtrain::comm::detail
