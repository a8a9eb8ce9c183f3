// The Communicator (comm/communicator.hpp): options from the settings, WorkImpl and the Work
// handle, the group's lifetime (move, destruction, finalize, abort, abandon), posting and the
// collectives' argument checks, and split. Point-to-point: communicator_p2p.cpp; names, signatures
// and timeout messages: communicator_messages.cpp.
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

CommOptions CommOptions::from_settings() {
  CommOptions o;
  o.timeout_s = settings().comm_timeout_s;
  o.debug = settings().comm_debug;
  return o;
}

std::chrono::steady_clock::duration CommOptions::timeout() const {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(timeout_s));
}

bool WorkImpl::wait_until(Clock::time_point until) {
  // Spin first, then yield the core. Spinning for a while matters: on a machine shared with
  // other work a yield gives the core away for a whole time slice, which cost 10-20% of
  // bandwidth on 2-4 MB allreduces. Yielding afterwards matters too: with more ranks than cores
  // (tests oversubscribe) a waiter that never yields starves the peers it waits for.
  constexpr auto kSpin = std::chrono::milliseconds(1);
  const auto start = Clock::now();
  for (;;) {
    if (progress()) return true;
    const auto now = Clock::now();
    if (now >= until) return false;
    if (now - start > kSpin) std::this_thread::yield();
  }
}

std::optional<WorkImpl::Clock::time_point> WorkImpl::completed_at() const {
  const Clock::rep t = completed_.load(std::memory_order_acquire);
  if (t == 0) return std::nullopt;
  return Clock::time_point(Clock::duration(t));
}

void WorkImpl::mark_completed(Clock::time_point t) noexcept {
  Clock::rep expected = 0;
  const Clock::rep v = std::max<Clock::rep>(t.time_since_epoch().count(), 1);
  completed_.compare_exchange_strong(expected, v, std::memory_order_acq_rel);
}

Work::Work(std::shared_ptr<WorkImpl> impl, std::shared_ptr<detail::GroupHealth> health)
    : impl_(std::move(impl)), health_(std::move(health)) {}

const Collective& Work::collective() const {
  MT_CHECK(defined(), "collective() of an empty Work handle");
  return impl_->collective();
}

std::chrono::steady_clock::time_point Work::posted_at() const {
  MT_CHECK(defined(), "posted_at() of an empty Work handle");
  return impl_->posted_at();
}

std::optional<std::chrono::steady_clock::time_point> Work::completed_at() const {
  MT_CHECK(defined(), "completed_at() of an empty Work handle");
  return impl_->completed_at();
}

std::shared_ptr<DeviceMark> Work::device_start() const {
  MT_CHECK(defined(), "device_start() of an empty Work handle");
  return impl_->device_start();
}

std::shared_ptr<DeviceMark> Work::device_end() const {
  MT_CHECK(defined(), "device_end() of an empty Work handle");
  return impl_->device_end();
}

void Work::fail_timeout() {
  const std::string msg = impl_->describe_timeout();
  impl_->on_timeout();
  log::error("{}", msg);
  health_->mark(msg, true);
  throw CommTimeout(msg);
}

bool Work::test() {
  MT_CHECK(defined(), "test() on an empty Work handle");
  try {
    if (impl_->progress()) {
      impl_->mark_completed();
      return true;
    }
  } catch (const std::exception& e) {
    health_->mark(e.what(), false);
    throw;
  }
  if (WorkImpl::Clock::now() >= impl_->deadline()) fail_timeout();
  return false;
}

void Work::wait() {
  MT_CHECK(defined(), "wait() on an empty Work handle");
  bool done = false;
  try {
    done = impl_->wait_until(impl_->deadline()) || impl_->progress();
  } catch (const std::exception& e) {
    health_->mark(e.what(), false);
    throw;
  }
  if (!done) fail_timeout();
  impl_->mark_completed();
}

void wait_all(std::vector<Work>& works) {
  for (Work& w : works) w.wait();
}

Communicator::Communicator(std::unique_ptr<Backend> backend, CommOptions options)
    : backend_(std::move(backend)),
      options_(options),
      health_(std::make_shared<detail::GroupHealth>()) {
  MT_CHECK(options_.timeout_s > 0, "communicator timeout must be > 0 seconds, got {}",
           options_.timeout_s);
}

Communicator::Communicator(Communicator&& o) noexcept
    : backend_(std::move(o.backend_)),
      options_(o.options_),
      next_seq_(o.next_seq_),
      outstanding_(std::move(o.outstanding_)),
      health_(std::move(o.health_)),
      sends_posted_(std::move(o.sends_posted_)),
      recvs_posted_(std::move(o.recvs_posted_)),
      peer_labels_(std::move(o.peer_labels_)) {}

Communicator& Communicator::operator=(Communicator&& o) noexcept {
  if (this != &o) {
    Communicator old(std::move(*this));  // finalizes (or abandons) what this held
    backend_ = std::move(o.backend_);
    options_ = o.options_;
    next_seq_ = o.next_seq_;
    outstanding_ = std::move(o.outstanding_);
    health_ = std::move(o.health_);
    sends_posted_ = std::move(o.sends_posted_);
    recvs_posted_ = std::move(o.recvs_posted_);
    peer_labels_ = std::move(o.peer_labels_);
  }
  return *this;
}

Communicator::~Communicator() {
  if (!backend_) return;
  if (health_->is_failed()) {
    // Waiting here could block for a whole timeout during unwinding; the job is ending anyway.
    log::warn("communicator '{}' destroyed after a failure: abandoning it", backend_->name());
    abandon_group();
    return;
  }
  try {
    finalize();
  } catch (const std::exception& e) {
    log::error("communicator '{}': finalize in the destructor failed: {}", backend_->name(),
               e.what());
    abandon_group();
  }
}

void Communicator::abandon_group() noexcept {
  if (!backend_) return;
  if (backend_->abandon()) {
    // Operations that never completed may still write into their buffers, and the vendor
    // library may still reference the group: both are leaked on purpose rather than freed under
    // its feet. This only happens on the way to abort().
    new std::vector<Work>(std::move(outstanding_));
    (void)backend_.release();
    return;
  }
  outstanding_.clear();
  backend_.reset();
}

int Communicator::rank() const {
  MT_CHECK(valid(), "rank() of a communicator that is not valid (split with a negative color?)");
  return backend_->rank();
}

int Communicator::size() const {
  MT_CHECK(valid(), "size() of a communicator that is not valid (split with a negative color?)");
  return backend_->size();
}

const std::string& Communicator::name() const {
  MT_CHECK(valid(), "name() of a communicator that is not valid (split with a negative color?)");
  return backend_->name();
}

Backend& Communicator::backend() {
  MT_CHECK(valid(), "backend() of a communicator that is not valid");
  return *backend_;
}

std::shared_ptr<DeviceMark> Communicator::mark_compute() {
  MT_CHECK(valid(), "mark_compute() of a communicator that is not valid");
  return backend_->mark_compute();
}

void Communicator::check_usable() const {
  MT_CHECK(valid(),
           "collective on a communicator that is not valid (finalized, moved from, or "
           "split with a negative color)");
  std::lock_guard lock(health_->mu);
  if (!health_->failed) return;
  const std::string msg = fmt::format(
      "communicator '{}' is unusable after an earlier failure; end the job with abort(). The "
      "failure: {}",
      backend_->name(), health_->first_error);
  if (health_->timed_out) throw CommTimeout(msg);
  throw Error(msg);
}

void Communicator::prune() {
  std::erase_if(outstanding_, [](Work& w) {
    try {
      return w.impl_->progress();
    } catch (const std::exception&) {
      return false;  // reported to whoever waits on it
    }
  });
}

namespace {

void check_tensor(const Tensor& t, const Backend& b, std::string_view what, OpType op,
                  bool reduction) {
  MT_CHECK(t.defined(), "{} on group '{}': the {} tensor is undefined", op_name(op), b.name(),
           what);
  MT_CHECK(b.accepts(t.device()),
           "{} on group '{}': the {} tensor {} is on a device the {} "
           "backend cannot use",
           op_name(op), b.name(), what, t.str(), b.kind());
  if (reduction) {
    MT_CHECK(is_floating(t.dtype()),
             "{} on group '{}': {} tensor {}: reductions need fp32, bf16 "
             "or fp16",
             op_name(op), b.name(), what, t.str());
  }
}

}  // namespace

namespace detail {

bool overlaps(const Tensor& a, const Tensor& b) {
  const auto* pa = static_cast<const std::uint8_t*>(a.data());
  const auto* pb = static_cast<const std::uint8_t*>(b.data());
  return pa < pb + b.nbytes() && pb < pa + a.nbytes();
}

}  // namespace detail

Work Communicator::post(Collective c, const Tensor& in, const Tensor& out) {
  check_usable();
  prune();
  c.seq = next_seq_;
  // The number is spent even if the backend throws (a mismatch, an MPI error): every rank
  // throws at the same collective, so the numbering stays aligned across ranks.
  ++next_seq_;
  std::shared_ptr<WorkImpl> impl;
  try {
    impl = backend_->post(c, in, out);
  } catch (const CommTimeout& e) {
    health_->mark(e.what(), true);
    throw;
  } catch (const InvalidArgument&) {
    throw;  // a mismatch found before anything was started: the group stays usable
  } catch (const std::exception& e) {
    health_->mark(e.what(), false);
    throw;
  }
  Work w(std::move(impl), health_);
  outstanding_.push_back(w);
  return w;
}

Work Communicator::allreduce(const Tensor& tensor, ReduceOp op) {
  return allreduce(tensor, tensor, op);
}

Work Communicator::allreduce(const Tensor& in, const Tensor& out, ReduceOp op) {
  check_usable();
  check_tensor(in, *backend_, "input", OpType::kAllreduce, true);
  check_tensor(out, *backend_, "output", OpType::kAllreduce, true);
  MT_CHECK(in.dtype() == out.dtype() && in.numel() == out.numel(),
           "allreduce on group '{}': input {} and output {} must have the same dtype and number "
           "of elements",
           name(), in.str(), out.str());
  MT_CHECK(in.data() == out.data() || !overlaps(in, out),
           "allreduce on group '{}': input {} and output {} overlap without being the same buffer",
           name(), in.str(), out.str());
  Collective c;
  c.op = OpType::kAllreduce;
  c.reduce = op;
  c.dtype = in.dtype();
  c.in_shape = in.shape();
  c.out_numel = out.numel();
  return post(c, in, out);
}

Work Communicator::reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op) {
  check_usable();
  check_tensor(in, *backend_, "input", OpType::kReduceScatter, true);
  check_tensor(out, *backend_, "output", OpType::kReduceScatter, true);
  MT_CHECK(in.dtype() == out.dtype() && in.numel() == out.numel() * size(),
           "reduce_scatter on group '{}' ({} ranks): input {} must have the output's dtype and "
           "{} times its elements (output {})",
           name(), size(), in.str(), size(), out.str());
  MT_CHECK(!overlaps(in, out), "reduce_scatter on group '{}': input {} and output {} overlap",
           name(), in.str(), out.str());
  Collective c;
  c.op = OpType::kReduceScatter;
  c.reduce = op;
  c.dtype = in.dtype();
  c.in_shape = in.shape();
  c.out_numel = out.numel();
  return post(c, in, out);
}

Work Communicator::all_gather(const Tensor& in, const Tensor& out) {
  check_usable();
  check_tensor(in, *backend_, "input", OpType::kAllGather, false);
  check_tensor(out, *backend_, "output", OpType::kAllGather, false);
  MT_CHECK(in.dtype() == out.dtype() && out.numel() == in.numel() * size(),
           "all_gather on group '{}' ({} ranks): output {} must have the input's dtype and {} "
           "times its elements (input {})",
           name(), size(), out.str(), size(), in.str());
  const bool own_chunk =
      in.data() == static_cast<const std::uint8_t*>(out.data()) + rank() * in.nbytes();
  MT_CHECK(own_chunk || !overlaps(in, out),
           "all_gather on group '{}': input {} overlaps the output {} without being this rank's "
           "chunk of it",
           name(), in.str(), out.str());
  Collective c;
  c.op = OpType::kAllGather;
  c.dtype = in.dtype();
  c.in_shape = in.shape();
  c.out_numel = out.numel();
  return post(c, in, out);
}

Work Communicator::broadcast(const Tensor& tensor, int root) {
  check_usable();
  check_tensor(tensor, *backend_, "broadcast", OpType::kBroadcast, false);
  MT_CHECK(root >= 0 && root < size(),
           "broadcast on group '{}': root {} is not a rank of the {} "
           "ranks",
           name(), root, size());
  Collective c;
  c.op = OpType::kBroadcast;
  c.dtype = tensor.dtype();
  c.in_shape = tensor.shape();
  c.out_numel = tensor.numel();
  c.root = root;
  return post(c, tensor, tensor);
}

Work Communicator::barrier() {
  check_usable();
  Collective c;
  c.op = OpType::kBarrier;
  return post(c, Tensor(), Tensor());
}

Communicator Communicator::split(int color, int key) {
  check_usable();
  prune();
  Collective c;
  c.op = OpType::kSplit;
  c.color = color;
  c.key = key;
  c.seq = next_seq_++;
  std::unique_ptr<Backend> child;
  try {
    child = backend_->split(c);
  } catch (const CommTimeout& e) {
    health_->mark(e.what(), true);
    throw;
  } catch (const InvalidArgument&) {
    throw;
  } catch (const std::exception& e) {
    health_->mark(e.what(), false);
    throw;
  }
  if (!child) return Communicator();
  return Communicator(std::move(child), options_);
}

void Communicator::wait_all() {
  for (Work& w : outstanding_) w.wait();
  outstanding_.clear();
}

void Communicator::finalize() {
  if (!backend_) return;
  if (!health_->is_failed()) {
    wait_all();  // throws CommTimeout if a peer never comes; the destructor then abandons
    backend_->finalize();
    backend_.reset();
    return;
  }
  // After a failure, give the late ranks one more timeout to complete what is outstanding
  // (then the buffers can be released cleanly), and abandon the group otherwise.
  const auto until = WorkImpl::Clock::now() + options_.timeout();
  bool drained = true;
  for (Work& w : outstanding_) {
    try {
      drained = drained && w.impl_->wait_until(until);
    } catch (const std::exception& e) {
      log::warn("communicator '{}': {} failed while finalizing: {}", backend_->name(),
                w.collective().str(), e.what());
      drained = false;
    }
  }
  if (drained) {
    outstanding_.clear();
    try {
      backend_->finalize();
      backend_.reset();
      return;
    } catch (const std::exception& e) {
      log::warn("communicator '{}': finalize after a failure: {}", backend_->name(), e.what());
    }
  } else {
    log::warn(
        "communicator '{}': outstanding collectives did not complete after the failure; "
        "abandoning the group",
        backend_->name());
  }
  abandon_group();
}

void Communicator::abort(int code) noexcept {
  if (!backend_) return;
  health_->mark(fmt::format("communicator '{}' was aborted", backend_->name()), false);
  backend_->abort(code);
}

}  // namespace meshtrain::comm
