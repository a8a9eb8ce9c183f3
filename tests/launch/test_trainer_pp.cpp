// The Trainer under pipeline parallelism, with threads as ranks (loopback): PP = 2, 3 and 4,
// alone and with TP and DP (ZeRO-1 too), under gpipe and 1f1b, with 1, P and 2P + 1
// micro-batches and a 5-layer model (uneven stages), trains like one rank on the same global
// batch for 20 steps: losses, gradient norms and every parameter to float32 rounding (fp32), bf16
// within its tolerance. The tied embedding's two copies stay bit-identical. The interleaved
// schedule (pp.virtual_stages V chunks per stage) at P = 2 with V = 2 and 3 and at P = 4 with
// V = 2, with TP and with DP + ZeRO-1, likewise (12 steps); a checkpoint it writes resumes under
// plain 1F1B. The same for the Llama family (llama-tiny with 5 layers, tied and untied LM head;
// 10 steps) at PP = 2 and 3, with TP and DP. mpirun: launch_cli_pp.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>

#include <gtest/gtest.h>

#include "comm/loopback.hpp"
#include "launch/pipeline_driver.hpp"
#include "launch/trainer.hpp"
#include "runtime/config.hpp"
#include "runtime/safetensors.hpp"
#if MESHTRAIN_HAS_CUDA
#include "runtime/cuda/cuda_device.hpp"
#endif

namespace meshtrain::launch {
namespace {

namespace fs = std::filesystem;

struct PpRun {
  std::vector<float> losses;
  std::vector<double> norms;
  std::map<std::string, std::vector<float>> weights;  // full tensors by name (world rank 0)
  // The last stage's copy of the tied embedding is the first stage's, bit for bit.
  bool tied_copies_equal = true;
  int tied_copies = 0;  // how many last-stage ranks held a copy
  float val_loss = 0;
};

class TrainerPp : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("mt_trainer_pp_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
    std::ofstream out((dir_ / "corpus.txt").string());
    const char* lines[] = {"the quick brown fox jumps over the lazy dog\n",
                           "a stitch in time saves nine\n", "to be or not to be\n"};
    for (int i = 0; i < 400; ++i) out << lines[(i * 7) % 3];
  }
  void TearDown() override { fs::remove_all(dir_); }

  // model: "gpt" (gpt-tiny), "llama-tied" or "llama-untied" (llama-tiny, the LM head tied to
  // the embedding or not); each with 5 layers.
  TrainConfig config(int pp, int tp, int batch, int accum, const std::string& schedule,
                     const std::string& precision = "fp32", int zero = 0,
                     const std::string& model = "gpt") const {
    TrainConfig c;
    c.model_preset = model == "gpt" ? "gpt-tiny" : "llama-tiny";
    if (model != "gpt") c.tie_embeddings = model == "llama-tied" ? "true" : "false";
    // Ten steps for the Llama cases, which run twice GPT's (tied and untied).
    c.steps = model == "gpt" ? 20 : 10;
    c.n_layer = 5;
    c.train_files = {(dir_ / "corpus.txt").string()};
    c.val_fraction = 0.1;
    c.batch_size = batch;
    c.grad_accum = accum;
    c.seq_len = 16;
    c.warmup_steps = 2;
    c.grad_clip = 1.0;  // the global norm across stages decides every step's clipping
    c.eval_every = 0;
    c.eval_batches = 2;
    c.sample_tokens = 0;
    c.threads = 1;
    c.precision = precision;
    c.zero = zero;
    c.pp = pp;
    c.tp = tp;
    c.pp_schedule = schedule;
    c.dp_bucket_mb = 0.02;
    c.run_dir = (dir_ / ("run_" + std::to_string(counter_++))).string();
    return c;
  }

  // Interleaved: V chunks per stage of a model of `layers` layers (a multiple of V x P), 12
  // steps; the one-rank reference is interleaved(1, 1, ...) (plain 1F1B of one stage).
  TrainConfig interleaved(int pp, int v, int tp, int batch, int accum, int layers,
                          int zero = 0) const {
    TrainConfig c = config(pp, tp, batch, accum, pp > 1 ? "interleaved" : "1f1b", "fp32", zero);
    c.pp_virtual_stages = v;
    c.n_layer = layers;
    c.steps = 12;
    return c;
  }

  static PpRun train(const TrainConfig& cfg, int n) {
    PpRun run;
    std::mutex mu;
    // (pp, dp, tp) -> the tied embedding's values on the first and the last stage.
    std::map<std::tuple<int, int, int>, std::vector<float>> wte;
    auto body = [&](comm::Communicator* c) {
      Trainer t(cfg, c);
      t.set_verbose(false);
      const int rank = c ? c->rank() : 0;
      if (rank == 0) {
        t.on_step([&](const StepMetrics& m) {
          run.losses.push_back(m.loss);
          run.norms.push_back(m.grad_norm);
        });
      }
      const TrainResult r = t.run();
      if (rank == 0) run.val_loss = r.final_val_loss;
      const Tensor master = t.master_weights();
      std::lock_guard<std::mutex> lock(mu);
      if (const int e = t.model().embedding_group_param(); e >= 0) {
        const models::ParamInfo& p = t.model().params()[static_cast<std::size_t>(e)];
        const float* w = master.data_as<float>() + p.offset;
        wte[{t.mesh().pp_rank(), t.mesh().dp_rank(), t.mesh().tp_rank()}].assign(w, w + p.numel());
      }
    };
    if (n == 1) {
      body(nullptr);
    } else {
      comm::LoopbackWorld world(n);
      world.run([&](comm::Communicator& c) { body(&c); });
    }
    // The weights as model.safetensors holds them (gathered over TP and PP by world rank 0).
    const SafetensorsFile f =
        load_safetensors((fs::path(cfg.run_dir) / "model.safetensors").string());
    for (const auto& [name, t] : f.tensors) run.weights[name] = t.to_floats();
    const int last = cfg.pp - 1;
    for (const auto& [key, v] : wte) {
      if (std::get<0>(key) != last || last == 0) continue;
      ++run.tied_copies;
      run.tied_copies_equal &= v == wte[{0, std::get<1>(key), std::get<2>(key)}];
    }
    return run;
  }

  // same_eval: both runs evaluate the same rows (evaluation reads train.batch_size rows per
  // batch, which DP changes).
  static void expect_close(const PpRun& got, const PpRun& want, float loss_rel, float weight_abs,
                           bool same_eval = true) {
    EXPECT_TRUE(got.tied_copies_equal) << "the tied embedding's copies diverged";
    ASSERT_EQ(got.losses.size(), want.losses.size());
    for (std::size_t s = 0; s < got.losses.size(); ++s) {
      EXPECT_NEAR(got.losses[s], want.losses[s], loss_rel * want.losses[s]) << "step " << s + 1;
      EXPECT_NEAR(got.norms[s], want.norms[s], 10 * loss_rel * want.norms[s]) << "step " << s + 1;
    }
    if (same_eval) {
      EXPECT_NEAR(got.val_loss, want.val_loss, loss_rel * want.val_loss);
    }
    ASSERT_EQ(got.weights.size(), want.weights.size());
    float d = 0;
    std::string worst;
    for (const auto& [name, w] : want.weights) {
      auto it = got.weights.find(name);
      ASSERT_NE(it, got.weights.end()) << name;
      ASSERT_EQ(it->second.size(), w.size()) << name;
      for (std::size_t i = 0; i < w.size(); ++i) {
        const float e = std::abs(it->second[i] - w[i]);
        if (e > d) {
          d = e;
          worst = name;
        }
      }
    }
    EXPECT_LE(d, weight_abs) << "worst: " << worst;
  }

  fs::path dir_;
  mutable int counter_ = 0;
};

// As test_trainer_dp: float32 rounding of a gradient moves an Adam weight by a fraction of lr.
constexpr float kFp32Loss = 1e-5f, kFp32Weights = 2e-4f;

TEST_F(TrainerPp, PipelineAloneMatchesOneRank) {
  for (int p : {2, 3, 4}) {
    for (int m : {1, p, 2 * p + 1}) {
      const PpRun one = train(config(1, 1, 1, m, "1f1b"), 1);
      for (const char* s : {"1f1b", "gpipe"}) {
        SCOPED_TRACE(testing::Message() << "PP " << p << " " << s << " M " << m);
        expect_close(train(config(p, 1, 1, m, s), p), one, kFp32Loss, kFp32Weights);
      }
    }
  }
}

TEST_F(TrainerPp, PipelineWithTensorParallelMatchesOneRank) {
  // PP 2 x TP 2 (4 ranks), 5 micro-batches.
  const PpRun one = train(config(1, 1, 1, 5, "1f1b"), 1);
  for (const char* s : {"1f1b", "gpipe"}) {
    SCOPED_TRACE(s);
    expect_close(train(config(2, 2, 1, 5, s), 4), one, kFp32Loss, kFp32Weights);
  }
}

TEST_F(TrainerPp, PipelineWithDataParallelMatchesOneRank) {
  // DP 2 x PP 2 with batch 1 per replica = one rank with batch 2; ZeRO-1 per stage too.
  const PpRun one = train(config(1, 1, 2, 3, "1f1b"), 1);
  for (int zero : {0, 1}) {
    SCOPED_TRACE(zero);
    expect_close(train(config(2, 1, 1, 3, "1f1b", "fp32", zero), 4), one, kFp32Loss, kFp32Weights,
                 false);
  }
}

TEST_F(TrainerPp, Bf16AgreesWithOneRankWithinTolerance) {
  const PpRun pp = train(config(2, 1, 1, 3, "1f1b", "bf16"), 2);
  const PpRun one = train(config(1, 1, 1, 3, "1f1b", "bf16"), 1);
  EXPECT_TRUE(pp.tied_copies_equal);
  ASSERT_EQ(pp.losses.size(), one.losses.size());
  for (std::size_t s = 0; s < pp.losses.size(); ++s)
    EXPECT_NEAR(pp.losses[s], one.losses[s], 2e-2 * one.losses[s]) << "step " << s + 1;
}

// GPT's cases for the Llama family: PP = 2 and 3 (5 layers: stages of 3 + 2 and 2 + 2 + 1
// layers), 1f1b and gpipe, 1, P and 2P + 1 micro-batches with the LM head tied (the last stage's
// copy summed over the embedding group), and 2P + 1 untied (no embedding-group sum).
TEST_F(TrainerPp, LlamaPipelineAloneMatchesOneRank) {
  for (const char* model : {"llama-tied", "llama-untied"}) {
    for (int p : {2, 3}) {
      for (int m : {1, p, 2 * p + 1}) {
        if (std::string(model) == "llama-untied" && m != 2 * p + 1) continue;
        const PpRun one = train(config(1, 1, 1, m, "1f1b", "fp32", 0, model), 1);
        for (const char* s : {"1f1b", "gpipe"}) {
          SCOPED_TRACE(testing::Message() << model << " PP " << p << " " << s << " M " << m);
          const PpRun pp = train(config(p, 1, 1, m, s, "fp32", 0, model), p);
          EXPECT_EQ(pp.tied_copies, std::string(model) == "llama-tied" ? 1 : 0);
          expect_close(pp, one, kFp32Loss, kFp32Weights);
        }
      }
    }
  }
}

TEST_F(TrainerPp, LlamaPipelineWithTensorAndDataParallelMatchesOneRank) {
  for (const char* model : {"llama-tied", "llama-untied"}) {
    SCOPED_TRACE(model);
    // PP 2 x TP 2 (4 ranks; llama-tiny's 2 KV heads split 2 ways), 5 micro-batches.
    const PpRun one = train(config(1, 1, 1, 5, "1f1b", "fp32", 0, model), 1);
    for (const char* s : {"1f1b", "gpipe"}) {
      SCOPED_TRACE(s);
      expect_close(train(config(2, 2, 1, 5, s, "fp32", 0, model), 4), one, kFp32Loss, kFp32Weights);
    }
    // DP 2 x PP 2 with batch 1 per replica = one rank with batch 2; ZeRO-1 per stage too.
    const PpRun two = train(config(1, 1, 2, 3, "1f1b", "fp32", 0, model), 1);
    for (int zero : {0, 1}) {
      SCOPED_TRACE(zero);
      expect_close(train(config(2, 1, 1, 3, "1f1b", "fp32", zero, model), 4), two, kFp32Loss,
                   kFp32Weights, false);
    }
  }
}

// `meshtrain plan --pp` and preflight's memory check for a Llama stage are what each stage's
// Trainer allocates: parameters (the last stage's tied copy included) and optimizer state exactly,
// activations (the schedule's in-flight slots) within 10%.
TEST_F(TrainerPp, LlamaStagePlanMatchesTheAllocation) {
  for (const char* model : {"llama-tied", "llama-untied"}) {
    const TrainConfig cfg = config(2, 1, 2, 3, "1f1b", "bf16", 0, model);
    std::mutex mu;
    std::vector<std::string> failures;
    comm::LoopbackWorld world(2);
    world.run([&](comm::Communicator& c) {
      Trainer t(cfg, &c);
      t.set_verbose(false);
      t.run();
      const int s = t.mesh().pp_rank();
      const models::MemoryEstimate plan = models::estimate_stage_memory(
          model_config(cfg), PrecisionPolicy::parse("bf16"), cfg.batch_size, cfg.seq_len, 1, 1,
          false, parallel::stage_range(5, 2, s),
          PipelineDriver::slots_for(parallel::PipeSchedule::k1F1B, 2, s, 3));
      const auto acts = static_cast<double>(t.model().activation_bytes());
      std::lock_guard<std::mutex> lock(mu);
      const std::string what = fmt::format("{} stage {}", model, s);
      if (plan.parameters != static_cast<std::int64_t>(t.model().flat_params().nbytes()) ||
          plan.gradients != static_cast<std::int64_t>(t.model().flat_grads().nbytes()) ||
          plan.master_weights != t.optimizer().master_bytes() ||
          plan.optimizer_state != t.optimizer().moment_bytes())
        failures.push_back(what + ": parameters or optimizer state");
      if (std::abs(static_cast<double>(plan.activations) - acts) > 0.10 * acts)
        failures.push_back(
            fmt::format("{}: activations planned {}, allocated {}", what, plan.activations, acts));
    });
    EXPECT_TRUE(failures.empty()) << ::testing::PrintToString(failures);
  }
}

// The same pipeline code on the GPU (two stages as threads on one GPU; activations and gradients
// cross stages through the loopback communicator, staged through the host): fp32 losses follow
// the CPU pipeline's. Run by scripts/gpu_check.sh; skipped without a GPU.
TEST_F(TrainerPp, CudaPipelineFollowsTheCpu) {
#if MESHTRAIN_HAS_CUDA
  const bool have_gpu = cuda::device_count() > 0;
#else
  const bool have_gpu = false;
#endif
  if (!have_gpu) GTEST_SKIP() << "no GPU (or a build without CUDA)";
  TrainConfig c = config(2, 1, 1, 3, "1f1b");
  c.device = "cuda";
  const PpRun gpu = train(c, 2);
  const PpRun cpu = train(config(2, 1, 1, 3, "1f1b"), 2);
  EXPECT_TRUE(gpu.tied_copies_equal);
  ASSERT_EQ(gpu.losses.size(), cpu.losses.size());
  for (std::size_t s = 0; s < gpu.losses.size(); ++s)
    EXPECT_NEAR(gpu.losses[s], cpu.losses[s], 1e-3 * cpu.losses[s]) << "step " << s + 1;
}

TEST_F(TrainerPp, InterleavedMatchesOneRank) {
  struct Case {
    int p, v, m;
  };
  for (const Case k : {Case{2, 2, 2}, Case{2, 2, 4}, Case{2, 3, 4}, Case{4, 2, 4}}) {
    SCOPED_TRACE(testing::Message() << "PP " << k.p << " V " << k.v << " M " << k.m);
    const int layers = k.p * k.v;
    const PpRun one = train(interleaved(1, 1, 1, 1, k.m, layers), 1);
    expect_close(train(interleaved(k.p, k.v, 1, 1, k.m, layers), k.p), one, kFp32Loss,
                 kFp32Weights);
  }
}

TEST_F(TrainerPp, InterleavedWithTensorAndDataParallelMatchesOneRank) {
  {
    SCOPED_TRACE("PP 2 x V 2 x TP 2");
    const PpRun one = train(interleaved(1, 1, 1, 1, 2, 4), 1);
    expect_close(train(interleaved(2, 2, 2, 1, 2, 4), 4), one, kFp32Loss, kFp32Weights);
  }
  {
    // DP 2 x PP 2 (V 2) with batch 1 per replica = one rank with batch 2; ZeRO-1 per stage.
    SCOPED_TRACE("DP 2 x PP 2 x V 2, ZeRO-1");
    const PpRun one = train(interleaved(1, 1, 1, 2, 2, 4), 1);
    expect_close(train(interleaved(2, 2, 1, 1, 2, 4, 1), 4), one, kFp32Loss, kFp32Weights, false);
  }
}

TEST_F(TrainerPp, InterleavedCheckpointResumesUnderOneFOneB) {
  // 12 interleaved steps with a checkpoint at 6; from it, 6 more steps as plain 1F1B over two
  // stages and as one rank: checkpoint names are the whole model's, so each layout finds its
  // layers, and the resumed runs end where the interleaved one did.
  TrainConfig a = interleaved(2, 2, 1, 1, 2, 4);
  a.ckpt_every = 6;
  a.ckpt_keep = 0;
  const PpRun full = train(a, 2);
  const std::string ckpt = (fs::path(a.run_dir) / "checkpoints" / "step_00000006").string();
  ASSERT_TRUE(fs::exists(ckpt)) << ckpt;
  for (int p : {2, 1}) {
    SCOPED_TRACE(testing::Message() << "resumed at PP " << p);
    TrainConfig b = config(p, 1, 1, 2, "1f1b");
    b.n_layer = 4;
    b.steps = 12;
    b.resume = ckpt;
    const PpRun resumed = train(b, p);
    ASSERT_EQ(resumed.losses.size(), 6u);
    for (std::size_t s = 0; s < 6; ++s)
      EXPECT_NEAR(resumed.losses[s], full.losses[6 + s], kFp32Loss * full.losses[6 + s])
          << "step " << s + 7;
    PpRun tail = full;
    tail.losses.erase(tail.losses.begin(), tail.losses.begin() + 6);
    tail.norms.erase(tail.norms.begin(), tail.norms.begin() + 6);
    expect_close(resumed, tail, kFp32Loss, kFp32Weights);
  }
}

TEST_F(TrainerPp, LayoutErrorsNameTheKeys) {
  // PP not dividing the world.
  try {
    comm::LoopbackWorld world(3);
    world.run([&](comm::Communicator& c) { Trainer t(config(2, 1, 1, 2, "1f1b"), &c); });
    FAIL() << "PP 2 on 3 ranks";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("train.pp = 2"), std::string::npos) << e.what();
  }
  // More stages than layers.
  TrainConfig c = config(6, 1, 1, 2, "1f1b");
  try {
    comm::LoopbackWorld world(6);
    world.run([&](comm::Communicator& cm) { Trainer t(c, &cm); });
    FAIL() << "6 stages of 5 layers";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("model.n_layer"), std::string::npos) << e.what();
  }
  // The same for a Llama model (the family's pipeline is wired: only the layer count refuses).
  try {
    comm::LoopbackWorld world(6);
    world.run([&](comm::Communicator& cm) {
      Trainer t(config(6, 1, 1, 2, "1f1b", "fp32", 0, "llama-untied"), &cm);
    });
    FAIL() << "6 stages of a 5-layer Llama";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("model.n_layer"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("train.pp = 6"), std::string::npos) << e.what();
  }
  // A Llama stage does not run sequence parallelism yet: refused by key before any rank starts.
  TrainConfig sp = config(2, 2, 1, 2, "1f1b", "fp32", 0, "llama-untied");
  sp.tp_sequence_parallel = true;
  try {
    model_config(sp);
    FAIL() << "PP 2 x TP 2 with sequence parallelism for a Llama";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("tp.sequence_parallel"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("train.pp = 2"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace meshtrain::launch
