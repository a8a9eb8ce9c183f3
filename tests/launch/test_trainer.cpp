// The Trainer API: determinism, gradient accumulation, the per-step callback, what it writes
// into the run directory, and that bad input stops it before anything is written.
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "launch/trainer.hpp"
#include "launch/weights.hpp"
#include "runtime/config.hpp"
#include "runtime/data.hpp"
#if MESHTRAIN_HAS_CUDA
#include "runtime/cuda/cuda_device.hpp"
#endif

namespace meshtrain::launch {
namespace {

namespace fs = std::filesystem;

#define EXPECT_HAS(text, part) EXPECT_NE((text).find(part), std::string::npos) << (text)

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("mt_trainer_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
    std::ofstream out(path("corpus.txt"));
    const char* lines[] = {"the quick brown fox jumps over the lazy dog\n",
                           "a stitch in time saves nine\n", "to be or not to be\n"};
    for (int i = 0; i < 200; ++i) out << lines[(i * 7) % 3];
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  TrainConfig tiny(const std::string& run) const {
    TrainConfig c;
    c.model_preset = "gpt-tiny";
    c.train_files = {path("corpus.txt")};
    c.val_fraction = 0.1;
    c.steps = 4;
    c.batch_size = 2;
    c.seq_len = 32;
    c.warmup_steps = 2;
    c.eval_every = 2;
    c.eval_batches = 2;
    c.sample_tokens = 16;
    c.threads = 1;
    c.run_dir = path(run);
    return c;
  }

  static std::vector<float> losses(const TrainConfig& c) {
    Trainer t(c);
    t.set_verbose(false);
    std::vector<float> out;
    t.on_step([&](const StepMetrics& m) { out.push_back(m.loss); });
    t.run();
    return out;
  }

  fs::path dir_;
};

bool bit_identical(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST_F(TrainerTest, SameSeedGivesBitIdenticalLosses) {
  for (const char* precision : {"fp32", "bf16"}) {
    TrainConfig c = tiny(std::string("a_") + precision);
    c.precision = precision;
    const std::vector<float> first = losses(c);
    c.run_dir = path(std::string("b_") + precision);
    const std::vector<float> second = losses(c);
    ASSERT_EQ(first.size(), 4u);
    EXPECT_TRUE(bit_identical(first, second)) << precision;
    // And the seed matters, so the comparison above can fail.
    c.seed += 1;
    c.run_dir = path(std::string("c_") + precision);
    EXPECT_FALSE(bit_identical(first, losses(c))) << precision;
  }
}

// Two micro-batches of 2 draw the same windows as one batch of 4 (sample g = step x global
// batch + row), so the losses agree to fp32 rounding.
TEST_F(TrainerTest, GradientAccumulationMatchesALargerBatch) {
  TrainConfig c = tiny("accum");
  c.precision = "fp32";
  c.grad_accum = 2;
  const std::vector<float> accum = losses(c);
  c.grad_accum = 1;
  c.batch_size = 4;
  c.run_dir = path("big");
  const std::vector<float> big = losses(c);
  ASSERT_EQ(accum.size(), big.size());
  for (std::size_t i = 0; i < big.size(); ++i)
    EXPECT_NEAR(accum[i], big[i], 1e-5 * std::fabs(big[i])) << "step " << i + 1;
}

TEST_F(TrainerTest, CallbacksAndRunDirectory) {
  TrainConfig c = tiny("run");
  Trainer t(c);
  t.set_verbose(false);
  std::vector<StepMetrics> steps;
  std::vector<EvalMetrics> evals;
  t.on_step([&](const StepMetrics& m) { steps.push_back(m); });
  t.on_eval([&](const EvalMetrics& m) { evals.push_back(m); });
  const TrainResult r = t.run();

  ASSERT_EQ(steps.size(), 4u);
  const LrSchedule sched{c.schedule,     c.lr,    c.min_lr_ratio,
                         c.warmup_steps, c.steps, c.decay_fraction};
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(steps[i].step, i + 1);
    EXPECT_EQ(steps[i].total_steps, 4);
    EXPECT_DOUBLE_EQ(steps[i].lr, sched.at(i));
    EXPECT_TRUE(std::isfinite(steps[i].loss) && steps[i].grad_norm > 0 &&
                steps[i].tokens_per_s > 0);
    EXPECT_FALSE(steps[i].skipped);
  }
  // eval.every = 2: after step 2, and the final evaluation after step 4.
  ASSERT_EQ(evals.size(), 2u);
  EXPECT_EQ(evals[0].step, 2);
  EXPECT_EQ(evals[1].step, 4);
  EXPECT_EQ(r.steps, 4);
  EXPECT_EQ(r.first_loss, steps[0].loss);
  EXPECT_FLOAT_EQ(r.final_val_loss, evals[1].val_loss);
  EXPECT_EQ(r.sample.size(), 1u + 16u);  // the default prompt (a newline) and 16 bytes

  // config.toml reads back as the config.
  const TrainConfig saved = load_config(path("run/config.toml"), {});
  EXPECT_EQ(to_toml(saved), to_toml(c));
  // metrics.jsonl: one JSON object per line: 4 steps, 2 evaluations, 1 sample.
  std::ifstream in(path("run/metrics.jsonl"));
  int step_lines = 0, val_lines = 0, sample_lines = 0;
  for (std::string line; std::getline(in, line);) {
    const nlohmann::json j = nlohmann::json::parse(line);  // throws on a malformed line
    ASSERT_TRUE(j.is_object() && j.contains("step")) << line;
    step_lines += j.contains("loss");
    val_lines += j.contains("val_loss");
    sample_lines += j.contains("sample");
  }
  EXPECT_EQ(step_lines, 4);
  EXPECT_EQ(val_lines, 2);
  EXPECT_EQ(sample_lines, 1);
  // model.safetensors loads into a fresh model that computes exactly what the trained one does.
  models::Decoder fresh(model_config(saved), PrecisionPolicy::parse(saved.precision));
  fresh.set_weights(load_weights(fresh, path("run/model.safetensors")));
  const Tensor tokens = Tensor::from_ints(std::vector<std::int32_t>(32, 'e'), Shape{1, 32});
  const Tensor targets = Tensor::from_ints(std::vector<std::int32_t>(32, 't'), Shape{1, 32});
  EXPECT_EQ(fresh.forward(tokens, targets), t.model().forward(tokens, targets));
  EXPECT_FALSE(fs::exists(path("run/model.safetensors.tmp")));
}

TEST_F(TrainerTest, LoadWeightsRejectsAnotherModel) {
  TrainConfig c = tiny("run");
  c.steps = 1;
  c.sample_tokens = 0;
  {
    Trainer t(c);
    t.set_verbose(false);
    t.run();
  }
  models::GPTConfig other = model_config(c).gpt;
  other.n_embd = 32;
  models::Decoder model(other, PrecisionPolicy::parse("fp32"));
  try {
    load_weights(model, path("run/model.safetensors"));
    ADD_FAILURE() << "no error";
  } catch (const InvalidArgument& e) {
    EXPECT_HAS(std::string(e.what()),
               "tensor 'wte.weight' has shape [256, 64], the model expects [256, 32]");
  }
}

// Bad data stops the Trainer before it creates or writes anything in the run directory.
// train.device = "cuda": on a GPU the fp32 losses follow the CPU's (the same model, data and
// seed; sums in another order); without one, or in a build without CUDA, a clear error before
// anything is written.
TEST_F(TrainerTest, CudaDeviceFollowsTheCpuOrSaysWhyNot) {
  TrainConfig c = tiny("gpu");
  c.precision = "fp32";
  c.device = "cuda";
#if MESHTRAIN_HAS_CUDA
  const bool have_gpu = cuda::device_count() > 0;
#else
  const bool have_gpu = false;
#endif
  if (!have_gpu) {
    std::string error = "(no error)";
    try {
      Trainer t(c);
    } catch (const Error& e) {
      error = e.what();
    }
    EXPECT_HAS(error, MESHTRAIN_HAS_CUDA ? "no CUDA device is visible" : "built without CUDA");
    EXPECT_FALSE(fs::exists(path("gpu")));
    return;
  }
  const std::vector<float> gpu = losses(c);
  c.device = "cpu";
  c.run_dir = path("cpu");
  const std::vector<float> cpu = losses(c);
  ASSERT_EQ(gpu.size(), cpu.size());
  for (std::size_t i = 0; i < gpu.size(); ++i)
    EXPECT_NEAR(gpu[i], cpu[i], 1e-3 * std::abs(cpu[i])) << "step " << i + 1;
}

// comm.backend = "nccl" moves GPU memory: with the CPU device it is refused before anything is
// written, whatever the build.
TEST_F(TrainerTest, NcclBackendNeedsTheCudaDevice) {
  TrainConfig c = tiny("nccl_cpu");
  c.comm_backend = "nccl";
  std::string error = "(no error)";
  try {
    Trainer t(c);
  } catch (const Error& e) {
    error = e.what();
  }
  EXPECT_HAS(error, "comm.backend = \"nccl\" needs train.device = \"cuda\"");
  EXPECT_FALSE(fs::exists(path("nccl_cpu")));
  c.comm_backend = "mpi";  // and the others run
  EXPECT_EQ(losses(c).size(), static_cast<std::size_t>(c.steps));
}

// comm.backend's decision from the ranks' GPUs (by world rank) and the layout: the logic that
// one lent GPU cannot exercise (it needs several GPUs, or ranks on distinct ones).
TEST(CommChoice, NcclWhereNoGroupSharesAGpu) {
  auto choose = [](const char* want, std::vector<std::string> gpus, int tp) {
    return choose_comm_backend(want, gpus, tp);
  };
  CommChoice c = choose("auto", {"a", "a"}, 1);  // two ranks on one GPU
  EXPECT_FALSE(c.dp_nccl);
  EXPECT_FALSE(c.tp_nccl);
  EXPECT_EQ(c.summary, "DP over MPI (world ranks 0 and 1 both drive a)");
  c = choose("auto", {"a", "b"}, 1);
  EXPECT_TRUE(c.dp_nccl);
  EXPECT_EQ(c.summary, "DP over NCCL");
  // Two GPUs, TP 2 inside each: the TP groups {0, 1} and {2, 3} share, the DP groups do not.
  c = choose("auto", {"a", "a", "b", "b"}, 2);
  EXPECT_TRUE(c.dp_nccl);
  EXPECT_FALSE(c.tp_nccl);
  EXPECT_EQ(c.summary, "DP over NCCL, TP over MPI (world ranks 0 and 1 both drive a)");
  // Two GPUs, TP 2 across them: the DP groups {0, 2} and {1, 3} share.
  c = choose("auto", {"a", "b", "a", "b"}, 2);
  EXPECT_FALSE(c.dp_nccl);
  EXPECT_TRUE(c.tp_nccl);
  EXPECT_EQ(c.summary, "DP over MPI (world ranks 0 and 2 both drive a), TP over NCCL");
  c = choose("auto", {"a", "b", "c", "d", "e", "f"}, 3);
  EXPECT_TRUE(c.dp_nccl && c.tp_nccl);
  EXPECT_EQ(c.summary, "DP over NCCL, TP over NCCL");
  // Groups of one rank do not communicate under auto; nccl reduces through NCCL anyway.
  c = choose("auto", {"a"}, 1);
  EXPECT_FALSE(c.dp_nccl || c.tp_nccl);
  EXPECT_EQ(c.summary, "");
  c = choose("nccl", {"a"}, 1);
  EXPECT_TRUE(c.dp_nccl);
  EXPECT_EQ(c.summary, "DP over NCCL");
  c = choose("nccl", {"a", "b"}, 2);
  EXPECT_TRUE(c.dp_nccl && c.tp_nccl);
  c = choose("mpi", {"a", "b"}, 1);
  EXPECT_FALSE(c.dp_nccl || c.tp_nccl);
  EXPECT_EQ(c.summary, "DP over MPI");
  auto error_of = [&](const char* want, std::vector<std::string> gpus, int tp) {
    try {
      choose(want, gpus, tp);
    } catch (const InvalidArgument& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_HAS(error_of("nccl", {"a", "b", "a", "b"}, 2),
             "comm.backend = \"nccl\": world ranks 0 and 2 both drive a (a DP group); NCCL "
             "allows one rank per GPU in a communicator");
  EXPECT_HAS(error_of("nccl", {"a", "a"}, 2), "world ranks 0 and 1 both drive a (a TP group)");
  EXPECT_HAS(error_of("nccl", {"a", "b", "c", "a"}, 1), "world ranks 0 and 3 both drive a");
  EXPECT_HAS(error_of("gloo", {"a"}, 1), "comm.backend = \"gloo\": expected auto, nccl or mpi");
  EXPECT_HAS(error_of("auto", {"a", "b", "c"}, 2), "3 ranks do not split into TP = 2");
}

TEST_F(TrainerTest, BadDataWritesNothing) {
  auto error_of = [&](const TrainConfig& c) -> std::string {
    try {
      Trainer t(c);
    } catch (const Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  TrainConfig c = tiny("bad");
  c.train_files = {path("missing.txt")};
  EXPECT_HAS(error_of(c), "cannot open data file '" + path("missing.txt") + "'");
  EXPECT_FALSE(fs::exists(path("bad")));

  std::vector<std::uint16_t> toks(500);
  for (std::size_t i = 0; i < toks.size(); ++i) toks[i] = static_cast<std::uint16_t>(i % 300);
  data::write_token_shard(path("big_ids.bin"), toks);
  c.train_files = {path("big_ids.bin")};
  {
    // The file, the first id outside, its index and byte offset (1024-byte header + 2 x 256),
    // the largest id, and the advice for a byte-vocabulary model given GPT-2 shards.
    const std::string e = error_of(c);
    EXPECT_HAS(e, "token shard '" + path("big_ids.bin") +
                      "' holds token id 256 at token 256 (byte offset 1536), outside the model's "
                      "vocabulary of 256");
    EXPECT_HAS(e, "its largest id is 299");
    EXPECT_HAS(e, "GPT-2 token shards need model.vocab = \"gpt2\"");
  }
  EXPECT_FALSE(fs::exists(path("bad")));

  std::ofstream(path("garbage.bin"), std::ios::binary) << std::string(2048, 'x');
  c.train_files = {path("garbage.bin")};
  EXPECT_HAS(error_of(c), "is not an llm.c token shard: magic");
  EXPECT_FALSE(fs::exists(path("bad")));

  c = tiny("bad");
  c.seq_len = 65;
  EXPECT_HAS(error_of(c), "train.seq_len (65) exceeds the model's block size (64)");
  EXPECT_FALSE(fs::exists(path("bad")));
}

}  // namespace
}  // namespace meshtrain::launch
