#include "parallel/grad_reducer.hpp"

#include <algorithm>

#include "runtime/error.hpp"
#include "runtime/ops.hpp"

namespace meshtrain::parallel {

namespace {
double ms_between(std::chrono::steady_clock::time_point a,
                  std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}
}  // namespace

std::int64_t auto_bucket_bytes(std::int64_t grad_bytes) {
  return std::clamp<std::int64_t>(grad_bytes / 8, 1LL << 20, 25LL << 20);
}

GradReducer::GradReducer(comm::Communicator& dp, Tensor grads, std::span<const ParamSlot> params,
                         ReducerOptions options)
    : dp_(&dp), grads_(std::move(grads)), options_(options) {
  MT_CHECK(dp.valid(), "GradReducer: the DP communicator is not valid");
  MT_CHECK(grads_.defined() && grads_.dtype() == DType::kF32,
           "GradReducer: gradients must be one contiguous fp32 buffer");
  MT_CHECK(options_.bucket_bytes > 0 && options_.first_bucket_bytes > 0,
           "GradReducer: bucket sizes must be positive (got {} and {})", options_.bucket_bytes,
           options_.first_bucket_bytes);
  MT_CHECK(options_.reduce_dtype == DType::kF32 || options_.reduce_dtype == DType::kBF16,
           "GradReducer: gradients are reduced in fp32 or bf16, not {}",
           dtype_name(options_.reduce_dtype));
  const std::int64_t esize = static_cast<std::int64_t>(sizeof(float));
  const std::int64_t expect = flat_numel(params, "GradReducer");
  MT_CHECK(expect == grads_.numel(), "GradReducer: parameters cover {} of {} gradient elements",
           expect, grads_.numel());
  const std::int64_t dp_size = dp.size();
  if (!options_.shard) {
    // Reverse parameter order, cut at parameter boundaries. A bucket closes before the
    // parameter that would take it past its cap (a parameter larger than the cap gets a bucket
    // of its own).
    std::int64_t hi = expect, lo = expect;
    std::int64_t cap = options_.first_bucket_bytes;
    for (auto it = params.rbegin(); it != params.rend(); ++it) {
      if (hi > lo && (hi - it->offset) * esize > cap) {
        buckets_.emplace_back(lo, hi);
        hi = lo;
        cap = options_.bucket_bytes;
      }
      lo = it->offset;
    }
    if (hi > lo) buckets_.emplace_back(lo, hi);
    MT_ASSERT(lo == 0, "buckets end at {}", lo);
  } else {
    // Cut at multiples of dp (inside parameters where needed), so that every bucket but the
    // first splits into dp equal chunks without padding.
    auto floor_dp = [&](std::int64_t x) { return x <= 0 ? 0 : x - x % dp_size; };
    std::int64_t hi = expect;
    std::int64_t cap = std::max<std::int64_t>(options_.first_bucket_bytes / esize, 1);
    while (hi > 0) {
      std::int64_t lo = floor_dp(hi - cap);
      if (lo == hi) lo = floor_dp(hi - dp_size);
      buckets_.emplace_back(lo, hi);
      hi = lo;
      cap = std::max<std::int64_t>(options_.bucket_bytes / esize, dp_size);
    }
    const int rank = dp.rank();
    std::int64_t padded_max = 0;
    for (std::size_t b = 0; b < buckets_.size(); ++b) {
      const auto [lo, hi2] = buckets_[b];
      const std::int64_t c = chunk(b);
      shard_offset_.push_back(shard_numel_);
      const std::int64_t start = lo + rank * c;
      const std::int64_t end = std::min(hi2, start + c);
      if (end > start) runs_.push_back(FlatRun{start, shard_numel_, end - start});
      if (c * dp_size != hi2 - lo) padded_max = std::max(padded_max, c * dp_size);
      shard_numel_ += c;
    }
    grad_shard_ = Tensor::zeros(Shape{shard_numel_}, DType::kF32, grads_.device());
    if (padded_max > 0 && options_.reduce_dtype == DType::kF32)
      pad_ = Tensor::zeros(Shape{padded_max}, DType::kF32, grads_.device());
  }
  if (options_.reduce_dtype == DType::kBF16) {
    std::int64_t n = expect;
    if (options_.shard) {
      n = shard_numel_ * dp_size;  // every bucket padded to dp chunks
      wire_shard_ = Tensor::zeros(Shape{shard_numel_}, DType::kBF16, grads_.device());
    }
    wire_ = Tensor::zeros(Shape{n}, DType::kBF16, grads_.device());
  }
  ready_.assign(buckets_.size(), 0);
  works_.resize(buckets_.size());
  done_.assign(buckets_.size(), false);
  posted_at_.resize(buckets_.size());
  done_at_.resize(buckets_.size());
}

std::int64_t GradReducer::chunk(std::size_t b) const {
  const std::int64_t n = buckets_[b].second - buckets_[b].first;
  const std::int64_t dp_size = dp_->size();
  return (n + dp_size - 1) / dp_size;
}

void GradReducer::begin_step(bool communicate) {
  for (const comm::Work& w : works_)
    MT_CHECK(!w.defined(),
             "GradReducer: begin_step while a reduction is in flight (finish() the "
             "previous communicating step first)");
  communicate_ = communicate;
  origin_ = communicate ? dp_->mark_compute() : nullptr;
  std::fill(ready_.begin(), ready_.end(), 0);
  std::fill(done_.begin(), done_.end(), false);
  next_post_ = 0;
}

void GradReducer::post(std::size_t b) {
  const auto [lo, hi] = buckets_[b];
  const std::int64_t n = hi - lo;
  posted_at_[b] = Clock::now();
  const bool wide = options_.reduce_dtype == DType::kF32;
  Tensor src = grads_.slice(lo, n);
  if (!options_.shard) {
    if (wide) {
      works_[b] = dp_->allreduce(src, comm::ReduceOp::kAvg);
    } else {
      Tensor w = wire_.slice(lo, n);
      ops::convert(w, src);
      works_[b] = dp_->allreduce(w, comm::ReduceOp::kAvg);
    }
    return;
  }
  const std::int64_t c = chunk(b);
  const std::int64_t padded = c * dp_->size();
  Tensor in;
  if (wide) {
    if (padded == n) {
      in = src;
    } else {
      in = pad_.slice(0, padded);  // the tail beyond n stays zero
      Tensor head = in.slice(0, n);
      head.copy_from(src);
    }
    works_[b] =
        dp_->reduce_scatter(in, grad_shard_.slice(shard_offset_[b], c), comm::ReduceOp::kAvg);
  } else {
    in = wire_.slice(shard_offset_[b] * dp_->size(), padded);
    Tensor head = in.slice(0, n);
    ops::convert(head, src);
    works_[b] =
        dp_->reduce_scatter(in, wire_shard_.slice(shard_offset_[b], c), comm::ReduceOp::kAvg);
  }
}

void GradReducer::complete(std::size_t b) {
  done_[b] = true;
  const auto t = works_[b].completed_at();
  done_at_[b] = t ? *t : Clock::now();
  if (options_.reduce_dtype == DType::kF32) return;
  const auto [lo, hi] = buckets_[b];
  if (!options_.shard) {
    Tensor g = grads_.slice(lo, hi - lo);
    ops::convert(g, wire_.slice(lo, hi - lo));
  } else {
    Tensor g = grad_shard_.slice(shard_offset_[b], chunk(b));
    ops::convert(g, wire_shard_.slice(shard_offset_[b], chunk(b)));
  }
}

void GradReducer::poll() {
  for (std::size_t b = 0; b < next_post_; ++b) {
    if (!done_[b] && works_[b].test()) complete(b);
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
  // The end of backward on the device: everything queued on the compute stream so far.
  const std::shared_ptr<comm::DeviceMark> backward_end = origin_ ? dp_->mark_compute() : nullptr;
  while (next_post_ < buckets_.size()) post(next_post_++);
  for (std::size_t b = 0; b < buckets_.size(); ++b) {
    if (!done_[b]) {
      works_[b].wait();
      complete(b);
    }
  }
  const auto t1 = Clock::now();
  s.buckets = static_cast<int>(buckets_.size());
  if (backward_end) {
    // Device time, relative to the start of backward. Buckets run in order on one stream.
    const double bw_end = backward_end->ms_since(*origin_);
    double busy = 0, before = 0, last_end = 0;
    for (std::size_t b = 0; b < buckets_.size(); ++b) {
      const std::shared_ptr<comm::DeviceMark> start = works_[b].device_start();
      const std::shared_ptr<comm::DeviceMark> end = works_[b].device_end();
      MT_ASSERT(start && end, "bucket {} has no device timing on a device-timed communicator", b);
      const double a = start->ms_since(*origin_);
      const double e = std::max(end->ms_since(*origin_), a);
      busy += e - a;
      before += std::clamp(bw_end, a, e) - a;
      last_end = std::max(last_end, e);
      works_[b] = comm::Work();
    }
    origin_ = nullptr;
    s.device_timed = true;
    s.wait_ms = std::max(0.0, last_end - bw_end);
    s.comm_ms = busy;
    s.hidden = busy > 0 ? std::clamp(before / busy, 0.0, 1.0) : 0.0;
    return s;
  }
  for (comm::Work& w : works_) w = comm::Work();
  double busy = 0, before = 0;
  Clock::time_point link_free = posted_at_[0];
  for (std::size_t b = 0; b < buckets_.size(); ++b) {
    const auto start = std::max(posted_at_[b], link_free);
    const auto end = std::max(done_at_[b], start);
    busy += ms_between(start, end);
    before += ms_between(start, std::clamp(t0, start, end));
    link_free = end;
  }
  s.wait_ms = ms_between(t0, t1);
  s.comm_ms = busy;
  s.hidden = busy > 0 ? std::clamp(before / busy, 0.0, 1.0) : 0.0;
  return s;
}

double GradReducer::all_gather_shards(const Tensor& shard, Tensor& flat) {
  const auto t0 = Clock::now();
  MT_CHECK(options_.shard, "GradReducer::all_gather_shards needs the sharded (ZeRO-1) layout");
  MT_CHECK(flat.numel() == grads_.numel(),
           "all_gather_shards: the flat buffer has {} elements, the layout {}", flat.numel(),
           grads_.numel());
  MT_CHECK(!shard.defined() || (shard.numel() == shard_numel_ && shard.dtype() == flat.dtype()),
           "all_gather_shards: the shard {} must have {} elements of {}",
           shard.defined() ? shard.str() : std::string("(none)"), shard_numel_,
           dtype_name(flat.dtype()));
  const std::int64_t dp_size = dp_->size();
  const std::int64_t rank = dp_->rank();
  std::vector<comm::Work> works;
  std::vector<std::pair<std::size_t, Tensor>> staged;  // padded buckets, copied back after
  for (std::size_t b = 0; b < buckets_.size(); ++b) {
    const auto [lo, hi] = buckets_[b];
    const std::int64_t n = hi - lo, c = chunk(b), padded = c * dp_size;
    const std::int64_t valid = std::clamp<std::int64_t>(n - rank * c, 0, c);
    Tensor out;
    if (padded == n) {
      out = flat.slice(lo, n);
    } else {
      out = Tensor::zeros(Shape{padded}, flat.dtype(), flat.device());
      staged.emplace_back(b, out);
    }
    Tensor own = out.slice(rank * c, c);
    if (valid > 0) {
      Tensor dst = own.slice(0, valid);
      if (shard.defined()) {
        dst.copy_from(shard.slice(shard_offset_[b], valid));
      } else if (padded != n) {
        dst.copy_from(flat.slice(lo + rank * c, valid));
      }
    }
    works.push_back(dp_->all_gather(own, out));
  }
  comm::wait_all(works);
  double ms = ms_between(t0, Clock::now());
  if (!works.empty() && works.front().device_start()) {
    // The all-gathers run back to back on the communication stream.
    ms = std::max(0.0, works.back().device_end()->ms_since(*works.front().device_start()));
  }
  for (auto& [b, out] : staged) {
    const auto [lo, hi] = buckets_[b];
    Tensor dst = flat.slice(lo, hi - lo);
    dst.copy_from(out.slice(0, hi - lo));
  }
  return ms;
}

}  // namespace meshtrain::parallel
