#include "parallel/tensor_parallel.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "runtime/ops.hpp"

namespace meshtrain::parallel {

void TPGroup::allreduce(const Tensor& t, comm::ReduceOp op) const {
  if (comm_ != nullptr) comm_->allreduce(t, op).wait();
}

std::int64_t TPGroup::shard_tokens(std::int64_t tokens) const {
  const int k = size();
  MT_CHECK(tokens % k == 0,
           "sequence parallelism: the {} tokens of a micro-batch (train.batch_size x "
           "train.seq_len) cannot be split into {} equal shards (train.tp = {})",
           tokens, k, k);
  return tokens / k;
}

void TPGroup::gather_tokens(Tensor& full, const Tensor& shard) const {
  MT_CHECK(full.numel() == shard.numel() * size(),
           "sequence parallelism: gathering shards {} of a group of {} into {}", shard.str(),
           size(), full.str());
  if (comm_ == nullptr) {
    full.copy_from(shard);
    return;
  }
  comm_->all_gather(shard.flat(), full.flat()).wait();
}

void TPGroup::reduce_scatter_tokens(Tensor& shard, const Tensor& full) const {
  MT_CHECK(full.numel() == shard.numel() * size(),
           "sequence parallelism: reduce-scattering {} over a group of {} into {}", full.str(),
           size(), shard.str());
  if (comm_ == nullptr) {
    shard.copy_from(full);
    return;
  }
  comm_->reduce_scatter(full.flat(), shard.flat()).wait();
}

// ---- shards ----------------------------------------------------------------------------------

namespace {

// A tensor of full shape viewed as [outer, parts, size, piece] (row-major): shard r of block p
// under outer index o is row (o parts + p) size + r of [outer parts size, piece].
struct ShardGeometry {
  std::int64_t outer = 1, piece = 1;
};

ShardGeometry geometry(const Shape& full, int dim, int parts, int size) {
  MT_CHECK(dim >= 0 && dim < full.ndim(), "shard dimension {} is outside the {}-D shape {}", dim,
           full.ndim(), full.str());
  MT_CHECK(parts >= 1 && size >= 1, "shard parts ({}) and group size ({}) must be positive", parts,
           size);
  MT_CHECK(full[dim] % (static_cast<std::int64_t>(parts) * size) == 0,
           "dimension {} of {} ({}) cannot be split into {} blocks of {} equal shards", dim,
           full.str(), full[dim], parts, size);
  ShardGeometry g;
  for (int i = 0; i < dim; ++i) g.outer *= full[i];
  g.piece = full[dim] / (static_cast<std::int64_t>(parts) * size);
  for (int i = dim + 1; i < full.ndim(); ++i) g.piece *= full[i];
  return g;
}

// Copies every (outer, block) piece of rank's shard between the full and the shard tensors.
template <typename Fn>
void for_each_piece(const Shape& full, int dim, int parts, int rank, int size, Fn fn) {
  MT_CHECK(rank >= 0 && rank < size, "shard rank {} outside a group of {}", rank, size);
  const ShardGeometry g = geometry(full, dim, parts, size);
  for (std::int64_t o = 0; o < g.outer; ++o)
    for (int p = 0; p < parts; ++p)
      fn(((o * parts + p) * size + rank) * g.piece, (o * parts + p) * g.piece, g.piece);
}

}  // namespace

Shape shard_shape(const Shape& full, int dim, int parts, int size) {
  geometry(full, dim, parts, size);
  std::vector<std::int64_t> d = full.to_vector();
  d[static_cast<std::size_t>(dim)] /= size;
  return Shape(d);
}

void copy_shard(Tensor& shard, const Tensor& full, int dim, int parts, int rank, int size) {
  MT_CHECK(shard.shape() == shard_shape(full.shape(), dim, parts, size),
           "copy_shard: shard {} does not fit a {}-way split of {} along dimension {}", shard.str(),
           size, full.str(), dim);
  const Tensor f = full.flat(), s = shard.flat();
  for_each_piece(full.shape(), dim, parts, rank, size,
                 [&](std::int64_t at_full, std::int64_t at_shard, std::int64_t n) {
                   Tensor dst = s.slice(at_shard, n);
                   dst.copy_from(f.slice(at_full, n));
                 });
}

void place_shard(Tensor& full, const Tensor& shard, int dim, int parts, int rank, int size) {
  MT_CHECK(shard.shape() == shard_shape(full.shape(), dim, parts, size),
           "place_shard: shard {} does not fit a {}-way split of {} along dimension {}",
           shard.str(), size, full.str(), dim);
  const Tensor f = full.flat(), s = shard.flat();
  for_each_piece(full.shape(), dim, parts, rank, size,
                 [&](std::int64_t at_full, std::int64_t at_shard, std::int64_t n) {
                   Tensor dst = f.slice(at_full, n);
                   dst.copy_from(s.slice(at_shard, n));
                 });
}

Tensor gather_full(const Tensor& shard, const Shape& full_shape, int dim, int parts,
                   const TPGroup& tp, int replicas) {
  if (dim < 0 || tp.size() == 1) {
    MT_CHECK(shard.shape() == full_shape, "gather_full: {} is not the full shape {}", shard.str(),
             full_shape.str());
    return shard.clone();
  }
  const int k = tp.size();
  MT_CHECK(replicas >= 1 && k % replicas == 0,
           "gather_full: {} replicas of each shard over a group of {}", replicas, k);
  const int slices = k / replicas;
  MT_CHECK(shard.shape() == shard_shape(full_shape, dim, parts, slices),
           "gather_full: shard {} does not fit a {}-way split of {} along dimension {}",
           shard.str(), slices, full_shape.str(), dim);
  const std::int64_t n = shard.numel();
  Tensor all = Tensor::empty(Shape{n * k}, shard.dtype(), shard.device());
  tp.comm()->all_gather(shard.flat(), all).wait();
  Tensor full = Tensor::empty(full_shape, shard.dtype(), shard.device());
  for (int j = 0; j < slices; ++j)
    place_shard(full, all.slice(static_cast<std::int64_t>(j) * replicas * n, n).view(shard.shape()),
                dim, parts, j, slices);
  return full;
}

void copy_slot_shard(Tensor& shard, const Tensor& full, const ParamSlot& s, int rank, int size) {
  if (s.replicated() || size == 1) {
    shard.copy_from(full);
    return;
  }
  copy_shard(shard, full, s.shard_dim, s.shard_parts, s.shard_index(rank, size),
             s.shard_count(size));
}

Tensor gather_slot(const Tensor& shard, const ParamSlot& s, const TPGroup& tp) {
  return gather_full(shard, s.full_shape, s.shard_dim, s.shard_parts, tp, s.replicas(tp.size()));
}

// ---- gradient norm ---------------------------------------------------------------------------

double norm_squared_share(const Tensor& grads, std::int64_t lo, std::span<const ParamSlot> params,
                          int tp_rank, int tp_size) {
  const std::int64_t hi = lo + grads.numel();
  double sum = 0.0;
  // Adjacent counted parameters are summed as one run.
  std::int64_t run_lo = 0, run_hi = 0;
  auto flush = [&] {
    if (run_hi > run_lo) sum += ops::sum_of_squares(grads.slice(run_lo - lo, run_hi - run_lo));
    run_lo = run_hi = 0;
  };
  for (const ParamSlot& p : params) {
    const std::int64_t a = std::max(lo, p.offset), b = std::min(hi, p.offset + p.numel());
    if (b <= a) continue;
    if (!p.counted_on(tp_rank, tp_size)) {
      flush();
      continue;
    }
    if (run_hi == a) {
      run_hi = b;
    } else {
      flush();
      run_lo = a;
      run_hi = b;
    }
  }
  flush();
  return sum;
}

// ---- column- and row-parallel linear --------------------------------------------------------

void column_linear_forward(Tensor& y, const Tensor& x, const Tensor& w, const Tensor* bias) {
  ops::linear_forward(y, x, w, bias);
}

void column_linear_gelu_forward(Tensor& pre, Tensor& y, const Tensor& x, const Tensor& w,
                                const Tensor* bias) {
  ops::linear_gelu_forward(pre, y, x, w, bias);
}

void column_linear_backward(Tensor* dx, Tensor& dw, Tensor* dbias, const Tensor& dy,
                            const Tensor& x, const Tensor& w, const TPGroup& tp) {
  ops::linear_backward(dx, dw, dbias, dy, x, w);
  if (dx != nullptr) tp.allreduce(*dx);
}

void column_linear_backward_sp(Tensor& dx, Tensor& dx_full, Tensor& dw, Tensor* dbias,
                               const Tensor& dy, const Tensor& x_full, const Tensor& w,
                               const TPGroup& tp) {
  ops::linear_backward(&dx_full, dw, dbias, dy, x_full, w);
  tp.reduce_scatter_tokens(dx, dx_full);
}

void row_linear_forward(Tensor& y, const Tensor& x, const Tensor& w, const Tensor* bias,
                        const TPGroup& tp) {
  ops::linear_forward(y, x, w, tp.rank() == 0 ? bias : nullptr);
  tp.allreduce(y);
}

void row_linear_forward_sp(Tensor& y, Tensor& y_full, const Tensor& x, const Tensor& w,
                           const Tensor* bias, const TPGroup& tp) {
  ops::linear_forward(y_full, x, w, tp.rank() == 0 ? bias : nullptr);
  tp.reduce_scatter_tokens(y, y_full);
}

void accumulate_group_sum(Tensor& grad, const Tensor& partial, const TPGroup& tp) {
  MT_CHECK(grad.numel() == partial.numel() && partial.dtype() == DType::kF32,
           "accumulate_group_sum: partial {} for gradient {}", partial.str(), grad.str());
  tp.allreduce(partial);
  Tensor g = grad.flat();
  ops::add(g, g, partial.flat());
}

void row_linear_backward(Tensor* dx, Tensor& dw, Tensor* dbias, const Tensor& dy, const Tensor& x,
                         const Tensor& w) {
  ops::linear_backward(dx, dw, dbias, dy, x, w);
}

// ---- vocab-parallel embedding ----------------------------------------------------------------

void VocabParallelEmbedding::forward(Tensor& out, const std::vector<std::int32_t>& ids, int batch,
                                     int seq, const Tensor& wte, const Tensor& wpe,
                                     std::int64_t vocab_start, const TPGroup& tp, Tensor* shard) {
  MT_CHECK(wte.defined() && wte.ndim() == 2, "vocab-parallel embedding: wte must be [V/K, C]");
  const std::int64_t n = static_cast<std::int64_t>(batch) * seq, rows = wte.dim(0), c = wte.dim(1);
  MT_CHECK(static_cast<std::int64_t>(ids.size()) == n,
           "vocab-parallel embedding: {} token ids for a [{}, {}] batch", ids.size(), batch, seq);
  std::vector<std::int32_t> local(ids.size());
  masked_.clear();
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t id = ids[static_cast<std::size_t>(i)];
    if (id >= vocab_start && id < vocab_start + rows) {
      local[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(id - vocab_start);
    } else {
      local[static_cast<std::size_t>(i)] = 0;
      if (!masked_.empty() && masked_.back().second == i) {
        ++masked_.back().second;
      } else {
        masked_.emplace_back(i, i + 1);
      }
    }
  }
  local_ids_ = Tensor::from_ints(local, Shape{batch, seq}, wte.device());
  batch_ = batch;
  seq_ = seq;
  // The position embedding is added once, by rank 0; the allreduce sums one real row and zeros.
  const bool with_wpe = tp.rank() == 0 && wpe.defined();
  ops::embedding_forward(out, local_ids_, wte, with_wpe ? wpe : Tensor());
  Tensor rows_out = out.view(Shape{n, c});
  for (auto [lo, hi] : masked_) {
    if (!with_wpe) {
      rows_out.slice(lo, hi - lo).zero_();
      continue;
    }
    while (lo < hi) {  // runs may cross sequences: wpe rows restart at each sequence
      const std::int64_t t = lo % seq, len = std::min(hi - lo, seq - t);
      Tensor dst = rows_out.slice(lo, len);
      dst.copy_from(wpe.slice(t, len));
      lo += len;
    }
  }
  if (shard != nullptr) {
    tp.reduce_scatter_tokens(*shard, out);
  } else {
    tp.allreduce(out);
  }
}

void VocabParallelEmbedding::backward(Tensor& dwte, Tensor& dwpe, const Tensor& dout) {
  MT_CHECK(local_ids_.defined(), "vocab-parallel embedding: backward before forward");
  const std::int64_t n = static_cast<std::int64_t>(batch_) * seq_, c = dwte.dim(1);
  MT_CHECK(dout.numel() == n * c, "vocab-parallel embedding: dout {} for a [{}, {}, {}] forward",
           dout.str(), batch_, seq_, c);
  Tensor no_wpe;
  if (masked_.empty()) {
    ops::embedding_backward(dwte, no_wpe, dout, local_ids_);
  } else {
    if (!scratch_.defined() || scratch_.shape() != dout.shape() || scratch_.dtype() != dout.dtype())
      scratch_ = Tensor::empty(dout.shape(), dout.dtype(), dout.device());
    scratch_.copy_from(dout);
    Tensor rows = scratch_.view(Shape{n, c});
    for (auto [lo, hi] : masked_) rows.slice(lo, hi - lo).zero_();
    ops::embedding_backward(dwte, no_wpe, scratch_, local_ids_);
  }
  if (dwpe.defined()) {
    // dwpe[t] += sum over the batch of dout[b, t]: a bias gradient over [B, T x C].
    Tensor dpos = dwpe.slice(0, seq_).view(Shape{static_cast<std::int64_t>(seq_) * c});
    ops::bias_backward(dpos, dout.view(Shape{batch_, static_cast<std::int64_t>(seq_) * c}));
  }
}

// ---- vocab-parallel cross-entropy ------------------------------------------------------------

void VocabParallelCrossEntropy::forward(Tensor& losses, const Tensor& logits,
                                        const std::vector<std::int32_t>& targets,
                                        std::int64_t vocab_start, int vocab, const TPGroup& tp) {
  MT_CHECK(logits.defined() && logits.ndim() >= 2,
           "vocab-parallel cross-entropy: logits must be [N, V/K]");
  const std::int64_t cols = logits.dim(-1), n = logits.numel() / cols;
  MT_CHECK(static_cast<std::int64_t>(targets.size()) == n,
           "vocab-parallel cross-entropy: {} targets for {} rows", targets.size(), n);
  MT_CHECK(losses.dtype() == DType::kF32 && losses.numel() == n,
           "vocab-parallel cross-entropy: losses must be fp32 [{}], got {}", n, losses.str());
  vocab_start_ = vocab_start;
  vocab_ = vocab;
  const int k = tp.size(), rank = tp.rank();
  MT_CHECK(vocab_start_ == rank * cols,
           "vocab-parallel cross-entropy: rank {} of {} must hold columns from {} (it holds {} "
           "from {})",
           rank, k, rank * cols, cols, vocab_start_);
  MT_CHECK(vocab_ <= k * cols,
           "vocab-parallel cross-entropy: a vocabulary of {} over {} ranks of {} columns", vocab_,
           k, cols);
  const int valid = static_cast<int>(std::clamp<std::int64_t>(vocab_ - vocab_start_, 0, cols));
  std::vector<std::int32_t> local(static_cast<std::size_t>(n)), owner(static_cast<std::size_t>(n));
  for (std::int64_t r = 0; r < n; ++r) {
    const std::int32_t t = targets[static_cast<std::size_t>(r)];
    MT_CHECK(t < vocab_,
             "vocab-parallel cross-entropy: target {} at row {} is outside the vocabulary of {}", t,
             r, vocab_);
    const std::size_t i = static_cast<std::size_t>(r);
    if (t < 0) {
      local[i] = -2;
      owner[i] = -1;
    } else {
      const auto o = static_cast<std::int32_t>(t / cols);
      owner[i] = o;
      local[i] = o == rank ? static_cast<std::int32_t>(t - vocab_start_) : -1;
    }
  }
  Device& d = logits.device();
  local_ = Tensor::from_ints(local, Shape{n}, d);
  owner_ = Tensor::from_ints(owner, Shape{n}, d);
  auto ensure = [&](Tensor& t, std::int64_t numel) {
    if (!t.defined() || t.numel() != numel || &t.device() != &d)
      t = Tensor::empty(Shape{numel}, DType::kF32, d);
  };
  ensure(stats_, 2 * n);
  ensure(lse_, n);
  Tensor part_lse = stats_.slice(0, n), part_loss = stats_.slice(n, n);
  const Tensor logits2d = logits.view(Shape{n, cols});
  if (valid > 0) {
    // Local targets: negative (ignored here) where another rank holds the target.
    ops::cross_entropy_forward(part_loss, part_lse, logits2d, local_, valid);
  } else {
    // Only padding columns on this rank: exp(-inf) adds nothing to the log-sum-exp.
    std::vector<float> h(static_cast<std::size_t>(2 * n), 0.0f);
    std::fill(h.begin(), h.begin() + n, -std::numeric_limits<float>::infinity());
    stats_.copy_from(Tensor::wrap(h.data(), Shape{2 * n}, DType::kF32));
  }
  if (k > 1) {
    ensure(parts_, k * 2 * n);
    tp.comm()->all_gather(stats_, parts_).wait();
  } else {
    parts_ = stats_;
  }
  ops::cross_entropy_combine(losses, lse_, parts_.view(Shape{k, 2, n}), owner_);
}

void VocabParallelCrossEntropy::backward(Tensor& dlogits, const Tensor& logits, float dloss) {
  const std::int64_t cols = logits.dim(-1), n = logits.numel() / cols;
  MT_CHECK(lse_.defined() && lse_.numel() == n,
           "vocab-parallel cross-entropy: backward of {} rows after a forward of {}", n,
           lse_.defined() ? lse_.numel() : 0);
  const int valid = static_cast<int>(std::clamp<std::int64_t>(vocab_ - vocab_start_, 0, cols));
  Tensor d2 = dlogits.view(Shape{n, cols});
  ops::cross_entropy_backward_split(d2, logits.view(Shape{n, cols}), lse_, local_, valid, dloss);
}

}  // namespace meshtrain::parallel
