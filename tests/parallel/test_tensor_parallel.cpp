// Tensor-parallel layers against the unsharded ops, with threads as ranks (loopback) at TP = 2,
// 3 and 4: shards follow the ParamInfo contract; column- and row-parallel linear, the
// vocab-parallel embedding and cross-entropy give the full layer's outputs and gradients.

#include <algorithm>
#include <cmath>

#include <gtest/gtest.h>

#include "comm/loopback.hpp"
#include "parallel/tensor_parallel.hpp"
#include "runtime/ops.hpp"
#include "runtime/rng.hpp"
#include "runtime/threads.hpp"

namespace meshtrain::parallel {
namespace {

Tensor random(const Shape& s, std::uint64_t stream, DType dt = DType::kF32) {
  Tensor t = Tensor::empty(s, dt);
  fill_uniform(t, Philox(99, stream), -1.0f, 1.0f);
  return t;
}

Tensor shard_of(const Tensor& full, int dim, int parts, int rank, int size) {
  Tensor s = Tensor::empty(shard_shape(full.shape(), dim, parts, size), full.dtype());
  copy_shard(s, full, dim, parts, rank, size);
  return s;
}

void expect_near(const Tensor& got, const Tensor& want, float tol, const char* what) {
  ASSERT_EQ(got.shape(), want.shape()) << what;
  const std::vector<float> g = got.to_floats(), w = want.to_floats();
  float worst = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < g.size(); ++i) {
    const float d = std::abs(g[i] - w[i]);
    if (!(d <= worst)) {
      worst = d;
      at = i;
    }
  }
  EXPECT_LE(worst, tol) << what << ": element " << at << " is " << g[at] << ", expected " << w[at];
}

class TensorParallel : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override { set_cpu_threads(1); }
};

TEST(Shards, FollowTheParamInfoContract) {
  // A [6, 2] tensor split 2 ways along 0 in 3 parts: rank r holds rows {r, 2 + r, 4 + r}.
  std::vector<float> v(12);
  for (int i = 0; i < 12; ++i) v[i] = static_cast<float>(i);
  const Tensor full = Tensor::from_floats(v, Shape{6, 2}, DType::kF32);
  EXPECT_EQ(shard_of(full, 0, 3, 1, 2).to_floats(), (std::vector<float>{2, 3, 6, 7, 10, 11}));
  // Along 1 of [2, 4], 2 ways: rank 1 holds columns 2, 3 of each row.
  const Tensor wide = Tensor::from_floats({0, 1, 2, 3, 4, 5, 6, 7}, Shape{2, 4}, DType::kF32);
  EXPECT_EQ(shard_of(wide, 1, 1, 1, 2).to_floats(), (std::vector<float>{2, 3, 6, 7}));
  EXPECT_EQ(shard_shape(Shape{12, 5}, 0, 3, 4), (Shape{3, 5}));
  EXPECT_THROW(shard_shape(Shape{12, 5}, 1, 1, 2), InvalidArgument);
  EXPECT_THROW(shard_shape(Shape{12, 5}, 2, 1, 2), InvalidArgument);
  // place_shard inverts copy_shard.
  Tensor back = Tensor::zeros(Shape{6, 2}, DType::kF32);
  for (int r = 0; r < 2; ++r) place_shard(back, shard_of(full, 0, 3, r, 2), 0, 3, r, 2);
  EXPECT_EQ(back.to_floats(), v);
}

TEST_P(TensorParallel, GatherFullReassemblesEveryShard) {
  const int k = GetParam();
  const Tensor full = random(Shape{3 * 4 * k, 5}, 1);
  comm::LoopbackWorld world(k);
  world.run([&](comm::Communicator& c) {
    const TPGroup tp(c);
    const Tensor s = shard_of(full, 0, 3, c.rank(), k);
    EXPECT_EQ(gather_full(s, full.shape(), 0, 3, tp).to_floats(), full.to_floats());
    const Tensor wide = random(Shape{7, 2 * k}, 2);
    const Tensor w = shard_of(wide, 1, 1, c.rank(), k);
    EXPECT_EQ(gather_full(w, wide.shape(), 1, 1, tp).to_floats(), wide.to_floats());
  });
}

TEST_P(TensorParallel, ColumnParallelLinearMatchesTheFullLayer) {
  const int k = GetParam();
  const std::int64_t rows = 6, in = 8, out = 3 * 2 * k;  // QKV-like: 3 parts
  const Tensor x = random(Shape{2, rows / 2, in}, 1), w = random(Shape{out, in}, 2),
               b = random(Shape{out}, 3), dy = random(Shape{2, rows / 2, out}, 4);
  Tensor y = Tensor::empty(Shape{2, rows / 2, out}, DType::kF32),
         dx = Tensor::empty(x.shape(), DType::kF32);
  Tensor dw = Tensor::zeros(w.shape(), DType::kF32), db = Tensor::zeros(b.shape(), DType::kF32);
  ops::linear_forward(y, x, w, &b);
  ops::linear_backward(&dx, dw, &db, dy, x, w);
  comm::LoopbackWorld world(k);
  world.run([&](comm::Communicator& c) {
    const TPGroup tp(c);
    const int r = c.rank();
    const Tensor ws = shard_of(w, 0, 3, r, k), bs = shard_of(b, 0, 3, r, k);
    // dy's columns are this rank's outputs: the same split as the weight's rows.
    const Tensor dys =
        shard_of(dy.view(Shape{rows, out}), 1, 3, r, k).view(Shape{2, rows / 2, out / k});
    Tensor ys = Tensor::empty(Shape{2, rows / 2, out / k}, DType::kF32);
    column_linear_forward(ys, x, ws, &bs);
    expect_near(ys.view(Shape{rows, out / k}), shard_of(y.view(Shape{rows, out}), 1, 3, r, k),
                1e-6f, "y");
    Tensor dxs = Tensor::empty(x.shape(), DType::kF32);
    Tensor dws = Tensor::zeros(ws.shape(), DType::kF32),
           dbs = Tensor::zeros(bs.shape(), DType::kF32);
    column_linear_backward(&dxs, dws, &dbs, dys, x, ws, tp);
    expect_near(dxs, dx, 1e-5f, "dx (allreduced)");
    expect_near(dws, shard_of(dw, 0, 3, r, k), 1e-6f, "dw");
    expect_near(dbs, shard_of(db, 0, 3, r, k), 1e-6f, "db");
  });
}

TEST_P(TensorParallel, RowParallelLinearMatchesTheFullLayer) {
  const int k = GetParam();
  const std::int64_t rows = 5, in = 4 * k, out = 7;
  const Tensor x = random(Shape{rows, in}, 1), w = random(Shape{out, in}, 2),
               b = random(Shape{out}, 3), dy = random(Shape{rows, out}, 4);
  Tensor y = Tensor::empty(Shape{rows, out}, DType::kF32),
         dx = Tensor::empty(x.shape(), DType::kF32);
  Tensor dw = Tensor::zeros(w.shape(), DType::kF32), db = Tensor::zeros(b.shape(), DType::kF32);
  ops::linear_forward(y, x, w, &b);
  ops::linear_backward(&dx, dw, &db, dy, x, w);
  comm::LoopbackWorld world(k);
  world.run([&](comm::Communicator& c) {
    const TPGroup tp(c);
    const int r = c.rank();
    const Tensor xs = shard_of(x, 1, 1, r, k), ws = shard_of(w, 1, 1, r, k);
    Tensor ys = Tensor::empty(Shape{rows, out}, DType::kF32);
    row_linear_forward(ys, xs, ws, &b, tp);
    expect_near(ys, y, 1e-5f, "y (bias added once)");
    Tensor dxs = Tensor::empty(xs.shape(), DType::kF32);
    Tensor dws = Tensor::zeros(ws.shape(), DType::kF32),
           dbs = Tensor::zeros(b.shape(), DType::kF32);
    row_linear_backward(&dxs, dws, &dbs, dy, xs, ws);
    expect_near(dxs, shard_of(dx, 1, 1, r, k), 1e-6f, "dx");
    expect_near(dws, shard_of(dw, 1, 1, r, k), 1e-6f, "dw");
    expect_near(dbs, db, 0.0f, "db (replicated)");
  });
}

TEST_P(TensorParallel, VocabParallelEmbeddingMatchesTheFullLookup) {
  const int k = GetParam();
  const int b = 3, t = 5;
  const std::int64_t vocab = 128 * k, c = 8;
  const Tensor wte = random(Shape{vocab, c}, 1), wpe = random(Shape{t + 2, c}, 2),
               dout = random(Shape{b, t, c}, 3);
  std::vector<std::int32_t> ids(b * t);
  Philox rng(5, 5);
  for (std::size_t i = 0; i < ids.size(); ++i)
    ids[i] = static_cast<std::int32_t>(rng.u32(i) % static_cast<std::uint32_t>(vocab));
  ids[3] = ids[4] = 0;  // a run of ids that every rank but 0 masks
  const Tensor tokens = Tensor::from_ints(ids, Shape{b, t});
  Tensor out = Tensor::empty(Shape{b, t, c}, DType::kF32);
  ops::embedding_forward(out, tokens, wte, wpe);
  Tensor dwte = Tensor::zeros(wte.shape(), DType::kF32),
         dwpe = Tensor::zeros(wpe.shape(), DType::kF32);
  ops::embedding_backward(dwte, dwpe, dout, tokens);
  comm::LoopbackWorld world(k);
  world.run([&](comm::Communicator& c2) {
    const TPGroup tp(c2);
    const int r = c2.rank();
    const Tensor ws = shard_of(wte, 0, 1, r, k);
    VocabParallelEmbedding emb;
    Tensor outs = Tensor::empty(Shape{b, t, c}, DType::kF32);
    emb.forward(outs, ids, b, t, ws, wpe, (vocab / k) * r, tp);
    expect_near(outs, out, 0.0f, "embedding output");
    Tensor dws = Tensor::zeros(ws.shape(), DType::kF32),
           dps = Tensor::zeros(wpe.shape(), DType::kF32);
    emb.backward(dws, dps, dout);
    expect_near(dws, shard_of(dwte, 0, 1, r, k), 1e-6f, "dwte shard");
    expect_near(dps, dwpe, 1e-6f, "dwpe (replicated)");
  });
}

TEST_P(TensorParallel, VocabParallelCrossEntropyMatchesTheFullLoss) {
  const int k = GetParam();
  for (DType dt : {DType::kF32, DType::kBF16}) {
    const std::int64_t n = 12, padded = 64 * k;
    // A vocabulary that leaves the last rank's columns mostly (or, at k = 4, all) padding.
    const int vocab = static_cast<int>(padded - 40 - (k == 4 ? 64 : 0));
    const Tensor logits = random(Shape{n, padded}, 1, dt);
    std::vector<std::int32_t> tg(n);
    for (std::int64_t i = 0; i < n; ++i) tg[i] = static_cast<std::int32_t>((i * 37) % vocab);
    tg[2] = -1;  // ignored
    tg[5] = vocab - 1;
    const Tensor targets = Tensor::from_ints(tg, Shape{n});
    Tensor losses = Tensor::empty(Shape{n}, DType::kF32),
           lse = Tensor::empty(Shape{n}, DType::kF32);
    ops::cross_entropy_forward(losses, lse, logits, targets, vocab);
    Tensor dlogits = Tensor::empty(logits.shape(), dt);
    ops::cross_entropy_backward(dlogits, logits, lse, targets, vocab, 0.25f);
    const float tol = dt == DType::kF32 ? 1e-6f : 1e-2f;
    comm::LoopbackWorld world(k);
    world.run([&](comm::Communicator& c) {
      const TPGroup tp(c);
      const int r = c.rank();
      Tensor ls = shard_of(logits, 1, 1, r, k);
      VocabParallelCrossEntropy ce;
      Tensor loss_s = Tensor::empty(Shape{n}, DType::kF32);
      ce.forward(loss_s, ls, tg, (padded / k) * r, vocab, tp);
      expect_near(loss_s, losses, 2e-6f, "losses");
      ce.backward(ls, ls, 0.25f);  // in place, as GPT does
      expect_near(ls, shard_of(dlogits, 1, 1, r, k), tol, "dlogits");
    });
  }
}

// On one rank (no group) it is the plain cross-entropy.
TEST(VocabParallelOps, OneRankIsThePlainLoss) {
  const std::int64_t n = 9, padded = 128;
  const int vocab = 100;
  const Tensor logits = random(Shape{n, padded}, 7);
  std::vector<std::int32_t> tg(n);
  for (std::int64_t i = 0; i < n; ++i) tg[i] = static_cast<std::int32_t>((i * 31) % vocab);
  tg[4] = -3;  // ignored (any negative)
  const Tensor targets = Tensor::from_ints(tg, Shape{n});
  Tensor losses = Tensor::empty(Shape{n}, DType::kF32), lse = Tensor::empty(Shape{n}, DType::kF32);
  ops::cross_entropy_forward(losses, lse, logits, targets, vocab);
  Tensor dlogits = Tensor::empty(logits.shape(), DType::kF32);
  ops::cross_entropy_backward(dlogits, logits, lse, targets, vocab, 0.5f);
  VocabParallelCrossEntropy ce;
  Tensor got = Tensor::empty(Shape{n}, DType::kF32);
  ce.forward(got, logits, tg, 0, vocab, TPGroup());
  expect_near(got, losses, 2e-6f, "losses");
  Tensor d = logits.clone();
  ce.backward(d, d, 0.5f);
  expect_near(d, dlogits, 1e-7f, "dlogits");
}

TEST_P(TensorParallel, VocabParallelCrossEntropyRejectsTargetsOutsideTheVocabulary) {
  const int k = GetParam();
  comm::LoopbackWorld world(k);
  EXPECT_THROW(world.run([&](comm::Communicator& c) {
    const TPGroup tp(c);
    Tensor logits = random(Shape{2, 64}, 1);
    Tensor losses = Tensor::empty(Shape{2}, DType::kF32);
    VocabParallelCrossEntropy ce;
    ce.forward(losses, logits, {3, 64 * k - 1}, 64 * c.rank(), 64 * k - 10, tp);
  }),
               InvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Ranks, TensorParallel, ::testing::Values(2, 3, 4),
                         [](const auto& info) { return "tp" + std::to_string(info.param); });

}  // namespace
}  // namespace meshtrain::parallel
