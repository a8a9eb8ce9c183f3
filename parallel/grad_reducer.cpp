#include "parallel/grad_reducer.hpp"

#include <algorithm>

#include "runtime/error.hpp"

namespace meshtrain::parallel {

namespace {
double ms_between(std::chrono::steady_clock::time_point a,
                  std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}
}  // namespace

GradReducer::GradReducer(comm::Communicator& dp, Tensor grads,
                         const std::vector<std::pair<std::int64_t, std::int64_t>>& params,
                         ReducerOptions options)
    : dp_(&dp), grads_(std::move(grads)), options_(options) {
  MT_CHECK(dp.valid(), "GradReducer: the DP communicator is not valid");
  MT_CHECK(grads_.defined() && grads_.dtype() == DType::kF32,
           "GradReducer: gradients must be one contiguous fp32 buffer");
  MT_CHECK(options_.bucket_bytes > 0 && options_.first_bucket_bytes > 0,
           "GradReducer: bucket sizes must be positive (got {} and {})", options_.bucket_bytes,
           options_.first_bucket_bytes);
  const std::int64_t esize = static_cast<std::int64_t>(sizeof(float));
  std::int64_t expect = 0;
  for (const auto& [off, n] : params) {
    MT_CHECK(off == expect && n > 0,
             "GradReducer: parameters must tile the flat buffer in order "
             "(parameter at {} of {} elements, expected offset {})",
             off, n, expect);
    expect += n;
  }
  MT_CHECK(expect == grads_.numel(), "GradReducer: parameters cover {} of {} gradient elements",
           expect, grads_.numel());
  // Reverse parameter order, cut at parameter boundaries.
  std::int64_t hi = expect, lo = expect;
  std::int64_t cap = options_.first_bucket_bytes;
  // A bucket closes before the parameter that would take it past its cap (a parameter larger
  // than the cap gets a bucket of its own).
  for (auto it = params.rbegin(); it != params.rend(); ++it) {
    if (hi > lo && (hi - it->first) * esize > cap) {
      buckets_.emplace_back(lo, hi);
      hi = lo;
      cap = options_.bucket_bytes;
    }
    lo = it->first;
  }
  if (hi > lo) buckets_.emplace_back(lo, hi);
  MT_ASSERT(lo == 0, "buckets end at {}", lo);
  ready_.assign(buckets_.size(), 0);
  works_.resize(buckets_.size());
  done_.assign(buckets_.size(), false);
}

void GradReducer::begin_step(bool communicate) {
  for (const comm::Work& w : works_)
    MT_CHECK(!w.defined(),
             "GradReducer: begin_step while a reduction is in flight (finish() the "
             "previous communicating step first)");
  communicate_ = communicate;
  std::fill(ready_.begin(), ready_.end(), 0);
  std::fill(done_.begin(), done_.end(), false);
  next_post_ = 0;
  first_posted_ = false;
}

void GradReducer::post(std::size_t b) {
  const auto [lo, hi] = buckets_[b];
  if (!first_posted_) {
    first_posted_ = true;
    first_post_ = Clock::now();
  }
  works_[b] = dp_->allreduce(grads_.slice(lo, hi - lo), comm::ReduceOp::kAvg);
}

void GradReducer::poll() {
  for (std::size_t b = 0; b < next_post_; ++b) {
    if (done_[b]) continue;
    if (works_[b].test()) {
      done_[b] = true;
      last_done_ = Clock::now();
    } else {
      break;  // collectives complete in order; testing later ones only costs time
    }
  }
}

void GradReducer::grads_ready(std::int64_t begin, std::int64_t end) {
  if (!communicate_) return;
  for (std::size_t b = 0; b < buckets_.size(); ++b) {
    const std::int64_t lo = std::max(begin, buckets_[b].first);
    const std::int64_t hi = std::min(end, buckets_[b].second);
    if (hi > lo) ready_[b] += hi - lo;
    MT_ASSERT(ready_[b] <= buckets_[b].second - buckets_[b].first,
              "gradient range [{}, {}) reported twice", begin, end);
  }
  if (!options_.overlap) return;
  while (next_post_ < buckets_.size() &&
         ready_[next_post_] == buckets_[next_post_].second - buckets_[next_post_].first)
    post(next_post_++);
  poll();
}

ReducerStats GradReducer::finish() {
  ReducerStats s;
  if (!communicate_) return s;
  communicate_ = false;
  const auto t0 = Clock::now();
  while (next_post_ < buckets_.size()) post(next_post_++);
  for (std::size_t b = 0; b < buckets_.size(); ++b) {
    if (!done_[b]) {
      works_[b].wait();
      done_[b] = true;
      last_done_ = Clock::now();
    }
    works_[b] = comm::Work();
  }
  const auto t1 = Clock::now();
  s.buckets = static_cast<int>(buckets_.size());
  s.wait_ms = ms_between(t0, t1);
  s.comm_ms = first_posted_ ? ms_between(first_post_, std::max(last_done_, first_post_)) : 0.0;
  s.hidden = s.comm_ms > 0 ? std::clamp(1.0 - s.wait_ms / s.comm_ms, 0.0, 1.0) : 0.0;
  return s;
}

}  // namespace meshtrain::parallel
