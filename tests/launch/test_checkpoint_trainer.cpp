// The Trainer's checkpoint behaviour that needs the API: rolling back to the last checkpoint
// when non-finite steps keep coming (checkpoint.rollback_after), and giving up after
// checkpoint.max_rollbacks.
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "launch/checkpointing.hpp"
#include "launch/trainer.hpp"
#include "parallel/checkpoint_manifest.hpp"
#include "runtime/error.hpp"

namespace meshtrain::launch {
namespace {

namespace fs = std::filesystem;

class CheckpointTrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("mt_ckpt_trainer_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  TrainConfig tiny() const {
    TrainConfig c;
    c.model_preset = "gpt-tiny";
    c.steps = 12;
    c.batch_size = 2;
    c.seq_len = 32;
    c.precision = "fp32";
    c.eval_every = 0;
    c.sample_tokens = 0;
    c.threads = 1;
    c.run_dir = (dir_ / "run").string();
    c.ckpt_every = 4;
    c.rollback_after = 2;
    c.max_bad_steps = 5;
    return c;
  }
  // Poisons the weights (NaN) after optimizer step `at`: every later step is non-finite until
  // the weights are replaced. (fp32: the parameters are the master weights.)
  static void poison(Trainer& t) {
    Tensor& w = t.model().flat_params();
    w.slice(0, 1).copy_from(
        Tensor::from_floats({std::numeric_limits<float>::quiet_NaN()}, Shape{1}, DType::kF32));
  }
  fs::path dir_;
};

TEST_F(CheckpointTrainerTest, RollsBackToTheLastCheckpointAndSkipsTheData) {
  Trainer t(tiny());
  t.set_verbose(false);
  std::vector<StepMetrics> seen;
  bool poisoned = false;
  t.on_step([&](const StepMetrics& m) {
    seen.push_back(m);
    if (m.step == 6 && !poisoned) {
      poisoned = true;
      poison(t);
    }
  });
  const TrainResult r = t.run();
  EXPECT_TRUE(std::isfinite(r.final_loss));
  // Steps 1-6 run, 7 and 8 are skipped, then steps 5 to 12 again from the step-4 checkpoint.
  std::vector<int> steps;
  for (const auto& m : seen) steps.push_back(m.step);
  EXPECT_EQ(steps, (std::vector<int>{1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 7, 8, 9, 10, 11, 12}));
  EXPECT_TRUE(seen[6].skipped && seen[7].skipped);
  for (std::size_t i = 8; i < seen.size(); ++i) EXPECT_FALSE(seen[i].skipped) << seen[i].step;
  // The redone steps saw other data than the first time (the batches of steps 9 on).
  EXPECT_NE(seen[8].loss, seen[4].loss);
  bool logged = false;
  std::ifstream metrics(dir_ / "run" / "metrics.jsonl");
  for (std::string line; std::getline(metrics, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("rollback_to")) {
      logged = true;
      EXPECT_EQ(j["rollback_to"], 4);
      EXPECT_EQ(j["step"], 8);
      EXPECT_EQ(j["data_skip_steps"], 4);
    }
  }
  EXPECT_TRUE(logged);
}

TEST_F(CheckpointTrainerTest, GivesUpAfterMaxRollbacks) {
  TrainConfig c = tiny();
  c.max_rollbacks = 2;
  Trainer t(c);
  t.set_verbose(false);
  t.on_step([&](const StepMetrics& m) {
    if (m.step == 6) poison(t);
  });
  try {
    t.run();
    ADD_FAILURE() << "expected the run to stop";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("after 2 rollbacks"), std::string::npos) << e.what();
  }
}

TEST_F(CheckpointTrainerTest, WithoutRollbackStopsAtMaxBadSteps) {
  TrainConfig c = tiny();
  c.rollback_after = 0;
  Trainer t(c);
  t.set_verbose(false);
  t.on_step([&](const StepMetrics& m) {
    if (m.step == 6) poison(t);
  });
  try {
    t.run();
    ADD_FAILURE() << "expected the run to stop";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("train.max_bad_steps"), std::string::npos) << e.what();
  }
}

TEST_F(CheckpointTrainerTest, RollbackMustComeBeforeMaxBadSteps) {
  EXPECT_THROW(load_config("", {"checkpoint.rollback_after=5", "train.max_bad_steps=5"}),
               InvalidArgument);
}

// The trainer's state in a manifest, parsed before anything is loaded (found by fuzzing, target
// checkpoint): a loss scale beyond float's range was converted unchecked, and the data fields
// were read only after the weights had been replaced.
TEST_F(CheckpointTrainerTest, CheckpointStateIsCheckedBeforeLoading) {
  models::GPTConfig m = models::GPTConfig::preset("gpt-tiny");
  CheckpointState st;
  st.model = m;
  st.loss_scale = 1024.0f;
  st.batch_size = 2;
  st.grad_accum = 1;
  st.seq_len = 32;
  st.dp = 1;
  const std::string good = checkpoint_state_json(st);
  const CheckpointState back = parse_checkpoint_state("ck", good, m);
  EXPECT_EQ(back.loss_scale, 1024.0f);
  EXPECT_EQ(back.batch_size, 2);
  auto error = [&](const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json j = nlohmann::json::parse(good);
    edit(j);
    try {
      parse_checkpoint_state("ck", j.dump(), m);
    } catch (const InvalidArgument& e) {
      return std::string(e.what());
    }
    ADD_FAILURE() << "accepted " << j.dump();
    return std::string();
  };
  std::string e = error([](nlohmann::json& j) { j["loss_scaler"]["scale"] = 1e300; });
  EXPECT_NE(e.find("checkpoint 'ck': state.loss_scaler.scale must be a finite single-precision "
                   "number, got 1e+300"),
            std::string::npos)
      << e;
  e = error([](nlohmann::json& j) { j["data"].erase("dp"); });
  EXPECT_NE(e.find("checkpoint 'ck': state.data.dp is missing"), std::string::npos) << e;
  e = error([](nlohmann::json& j) { j["data"]["seq_len"] = -1; });
  EXPECT_NE(e.find("state.data.seq_len must be a non-negative integer"), std::string::npos) << e;
  e = error([](nlohmann::json& j) { j["model"]["n_embd"] = 65; });
  EXPECT_NE(e.find("holds another model: model.n_embd is 65 there and 64 here"), std::string::npos)
      << e;
}

// A resumed run whose saved global batch is batch_size x grad_accum x dp of the largest ints: the
// comparison with this run's batch is done in 64 bits (it overflowed int, undefined behaviour).
TEST_F(CheckpointTrainerTest, ResumesWhateverTheSavedBatchSize) {
  TrainConfig c = tiny();
  c.steps = 4;
  c.rollback_after = 0;
  {
    Trainer t(c);
    t.set_verbose(false);
    t.run();
  }
  const fs::path mf = dir_ / "run" / "checkpoints" / "step_00000004" / "manifest.json";
  nlohmann::json j;
  {
    std::ifstream in(mf);
    j = nlohmann::json::parse(in);
  }
  for (const char* k : {"batch_size", "grad_accum", "dp"}) j["state"]["data"][k] = 2147483647;
  // Sealed: a deliberate edit (an unsealed one is refused by the manifest's checksum).
  std::ofstream(mf, std::ios::trunc) << parallel::ckpt::seal_manifest(j.dump(1));
  c.steps = 5;
  c.resume = "latest";
  Trainer t(c);
  t.set_verbose(false);
  EXPECT_EQ(t.start_step(), 4);
  EXPECT_EQ(t.run().steps, 5);
}

}  // namespace
}  // namespace meshtrain::launch
