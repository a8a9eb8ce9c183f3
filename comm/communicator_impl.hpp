// Internal to comm/communicator*.cpp, not installed: what the Communicator's files share.
//   communicator.cpp           options, Work, the Communicator's lifetime and its collectives
//   communicator_p2p.cpp       send, recv and exchange (per-peer numbering)
//   communicator_messages.cpp  op names, call signatures, the mismatch reports and the timeout
//                              messages every backend shares
#pragma once

#include <mutex>
#include <string>

#include "comm/communicator.hpp"

namespace meshtrain::comm {

namespace detail {
// Shared by a communicator and its Work handles: the first failure makes the group unusable.
struct GroupHealth {
  std::mutex mu;
  bool failed = false;
  bool timed_out = false;
  std::string first_error;

  void mark(const std::string& what, bool timeout) {
    std::lock_guard lock(mu);
    if (failed) return;
    failed = true;
    timed_out = timeout;
    first_error = what;
  }
  bool is_failed() {
    std::lock_guard lock(mu);
    return failed;
  }
};

// Whether the bytes of a and b overlap (defined in communicator.cpp).
bool overlaps(const Tensor& a, const Tensor& b);

}  // namespace detail

// The Communicator's files name it unqualified, as when they were one file.
using detail::overlaps;

}  // namespace meshtrain::comm
