// The Trainer under data parallelism, with threads as ranks (loopback): DP = N with micro-batch
// B trains like one rank with batch N x B (fp32: to float32 rounding; bf16: within its
// tolerance), gradient accumulation composes with DP, and the same seed gives bit-identical
// runs. The CLI under mpirun is checked by launch_cli_mpi.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>

#include <gtest/gtest.h>

#include "comm/loopback.hpp"
#include "launch/trainer.hpp"

namespace meshtrain::launch {
namespace {

namespace fs = std::filesystem;

struct DpRun {
  std::vector<float> losses;
  std::vector<double> norms;
  std::vector<float> weights;  // rank 0's fp32 master weights at the end
  bool replicas_equal = true;  // every rank ended with rank 0's weights, bit for bit
};

class TrainerDp : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("mt_trainer_dp_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
    std::ofstream out((dir_ / "corpus.txt").string());
    const char* lines[] = {"the quick brown fox jumps over the lazy dog\n",
                           "a stitch in time saves nine\n", "to be or not to be\n"};
    for (int i = 0; i < 400; ++i) out << lines[(i * 7) % 3];
  }
  void TearDown() override { fs::remove_all(dir_); }

  TrainConfig config(int batch, int accum, const std::string& precision, int zero = 0,
                     const std::string& reduce_dtype = "fp32") const {
    TrainConfig c;
    c.model_preset = "gpt-tiny";
    c.train_files = {(dir_ / "corpus.txt").string()};
    c.val_fraction = 0.1;
    c.steps = 20;
    c.batch_size = batch;
    c.grad_accum = accum;
    c.seq_len = 32;
    c.warmup_steps = 2;
    c.eval_every = 0;
    c.eval_batches = 1;
    c.sample_tokens = 0;
    c.threads = 1;
    c.precision = precision;
    c.zero = zero;
    c.dp_reduce_dtype = reduce_dtype;
    c.dp_bucket_mb = 0.05;  // several buckets for gpt-tiny
    c.run_dir = (dir_ / ("run_" + std::to_string(counter_++))).string();
    return c;
  }

  // n ranks (threads); n = 1 runs without a communicator, as a plain process does.
  // `check` runs on every rank after construction, before training.
  static DpRun train(const TrainConfig& cfg, int n,
                     const std::function<void(Trainer&, int rank)>& check = {}) {
    DpRun run;
    std::mutex mu;
    std::vector<std::vector<float>> finals(n);
    auto body = [&](comm::Communicator* c) {
      Trainer t(cfg, c);
      t.set_verbose(false);
      const int rank = c ? c->rank() : 0;
      if (check) check(t, rank);
      if (rank == 0) {
        t.on_step([&](const StepMetrics& m) {
          run.losses.push_back(m.loss);
          run.norms.push_back(m.grad_norm);
        });
      }
      t.run();
      const float* w = t.master_weights().data_as<float>();
      std::lock_guard<std::mutex> lock(mu);
      finals[rank].assign(w, w + t.model().num_parameters());
    };
    if (n == 1) {
      body(nullptr);
    } else {
      comm::LoopbackWorld world(n);
      world.run([&](comm::Communicator& c) { body(&c); });
    }
    run.weights = finals[0];
    for (int r = 1; r < n; ++r) run.replicas_equal &= finals[r] == finals[0];
    return run;
  }

  static void expect_close(const DpRun& got, const DpRun& want, float loss_rel, float weight_abs) {
    EXPECT_TRUE(got.replicas_equal) << "the ranks' replicas diverged";
    ASSERT_EQ(got.losses.size(), want.losses.size());
    for (std::size_t s = 0; s < got.losses.size(); ++s) {
      EXPECT_NEAR(got.losses[s], want.losses[s], loss_rel * want.losses[s]) << "step " << s + 1;
      EXPECT_NEAR(got.norms[s], want.norms[s], 10 * loss_rel * want.norms[s]) << "step " << s + 1;
    }
    ASSERT_EQ(got.weights.size(), want.weights.size());
    float d = 0;
    for (std::size_t i = 0; i < got.weights.size(); ++i)
      d = std::max(d, std::abs(got.weights[i] - want.weights[i]));
    EXPECT_LE(d, weight_abs);
  }

  fs::path dir_;
  mutable int counter_ = 0;
};

// Adam divides by sqrt(v): a weight whose gradient is near zero moves by up to lr either way, so
// float32 rounding of a gradient shows in the weights as a fraction of one update (lr = 1e-3).
constexpr float kFp32Loss = 1e-5f, kFp32Weights = 2e-4f;

TEST_F(TrainerDp, Fp32TwoRanksMatchOneRankWithTheGlobalBatch) {
  expect_close(train(config(2, 1, "fp32"), 2), train(config(4, 1, "fp32"), 1), kFp32Loss,
               kFp32Weights);
}

TEST_F(TrainerDp, Fp32ThreeRanksMatchOneRankWithTheGlobalBatch) {
  expect_close(train(config(1, 1, "fp32"), 3), train(config(3, 1, "fp32"), 1), kFp32Loss,
               kFp32Weights);
}

TEST_F(TrainerDp, AccumulationOnTwoRanksMatchesTheGlobalBatch) {
  expect_close(train(config(1, 2, "fp32"), 2), train(config(4, 1, "fp32"), 1), kFp32Loss,
               kFp32Weights);
}

TEST_F(TrainerDp, SameSeedGivesBitIdenticalRuns) {
  const DpRun a = train(config(2, 2, "bf16"), 2), b = train(config(2, 2, "bf16"), 2);
  EXPECT_TRUE(a.replicas_equal);
  EXPECT_EQ(a.losses, b.losses);
  EXPECT_EQ(a.weights, b.weights);
}

TEST_F(TrainerDp, Bf16TwoRanksAgreeWithOneRankWithinTolerance) {
  const DpRun dp = train(config(2, 1, "bf16"), 2), one = train(config(4, 1, "bf16"), 1);
  EXPECT_TRUE(dp.replicas_equal);
  ASSERT_EQ(dp.losses.size(), one.losses.size());
  for (std::size_t s = 0; s < dp.losses.size(); ++s)
    EXPECT_NEAR(dp.losses[s], one.losses[s], 2e-2 * one.losses[s]) << "step " << s + 1;
}

// ZeRO-1 differs from plain DP only in where the reduction and the norm's sum happen: float32
// rounding. Three ranks pad gpt-tiny's parameter count to a multiple of 3.
TEST_F(TrainerDp, ZeroOneMatchesPlainDataParallel) {
  for (int n : {2, 3, 4}) {
    SCOPED_TRACE(n);
    expect_close(train(config(1, 2, "fp32", 1), n), train(config(1, 2, "fp32", 0), n), kFp32Loss,
                 kFp32Weights);
  }
}

TEST_F(TrainerDp, Fp32FourRanksMatchOneRankWithTheGlobalBatch) {
  expect_close(train(config(1, 1, "fp32"), 4), train(config(4, 1, "fp32"), 1), kFp32Loss,
               kFp32Weights);
}

// dp.reduce_dtype = "bf16": gradients averaged in bf16 follow the fp32 reduction within bf16's
// rounding, on an odd world size too, with and without ZeRO-1; and they differ from it.
TEST_F(TrainerDp, Bf16ReductionAgreesWithFp32Reduction) {
  for (int n : {2, 3}) {
    for (int zero : {0, 1}) {
      SCOPED_TRACE(testing::Message() << n << " ranks, zero " << zero);
      const DpRun low = train(config(1, 1, "fp32", zero, "bf16"), n);
      const DpRun ref = train(config(1, 1, "fp32", zero, "fp32"), n);
      expect_close(low, ref, 5e-3f, 2e-2f);
      EXPECT_NE(low.weights, ref.weights);
    }
  }
}

// Under ZeRO-1 with a 16-bit policy a rank holds no whole fp32 master copy: only its shard of
// the master weights and of the AdamW state.
TEST_F(TrainerDp, ZeroOneHoldsOnlyItsShards) {
  for (int n : {2, 3}) {
    SCOPED_TRACE(n);
    std::mutex mu;
    std::int64_t total_state = 0, np = 0;
    const DpRun z = train(config(2, 1, "bf16", 1), n, [&](Trainer& t, int) {
      std::lock_guard<std::mutex> lock(mu);
      EXPECT_FALSE(t.optimizer().holds_whole_master());
      np = t.model().num_parameters();
      EXPECT_LE(t.optimizer().state_numel(), (np + n - 1) / n + 1);
      total_state += t.optimizer().state_numel();
    });
    EXPECT_GE(total_state, np);  // together the shards cover every parameter
    const DpRun p = train(config(2, 1, "bf16", 0), n, [&](Trainer& t, int) {
      EXPECT_TRUE(t.optimizer().holds_whole_master());
      EXPECT_EQ(t.optimizer().state_numel(), t.model().num_parameters());
    });
    // The same training up to the norm's summation order, which bf16 parameters amplify (a
    // master weight that moves across a bf16 rounding boundary changes every later step).
    expect_close(z, p, 1e-2f, 1e-2f);
  }
}

TEST_F(TrainerDp, ZeroOneBf16AgreesWithPlainDataParallel) {
  const DpRun z = train(config(2, 1, "bf16", 1), 3), p = train(config(2, 1, "bf16", 0), 3);
  EXPECT_TRUE(z.replicas_equal);
  ASSERT_EQ(z.losses.size(), p.losses.size());
  for (std::size_t s = 0; s < z.losses.size(); ++s)
    EXPECT_NEAR(z.losses[s], p.losses[s], 2e-2 * p.losses[s]) << "step " << s + 1;
}

}  // namespace
}  // namespace meshtrain::launch
