// launch/preflight.hpp: the host's memory as /proc and the cgroup files say (a fake tree), the
// budget of a rank, the refusal's figures and suggestions, and that the plan (estimate_memory)
// is what the Trainer allocates.
#include "launch/preflight.hpp"

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "launch/trainer.hpp"

namespace meshtrain::launch {
namespace {

namespace fs = std::filesystem;

#define EXPECT_HAS(text, part) EXPECT_NE((text).find(part), std::string::npos) << (text)

class PreflightTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() / ("mt_preflight_" + std::to_string(::getpid()));
    fs::create_directories(root_);
  }
  void TearDown() override { fs::remove_all(root_); }
  void put(const std::string& rel, const std::string& text) {
    fs::create_directories((root_ / rel).parent_path());
    std::ofstream(root_ / rel) << text;
  }
  fs::path root_;
};

TEST_F(PreflightTest, HostMemoryFromMeminfoAndCgroupV2) {
  put("proc/meminfo", "MemTotal: 4000 kB\nMemFree: 100 kB\nMemAvailable: 1000 kB\n");
  put("proc/self/cgroup", "0::/a/b\n");
  put("sys/fs/cgroup/a/b/memory.max", "800000\n");
  put("sys/fs/cgroup/a/b/memory.current", "300000\n");
  // The parent's limit is the tighter: 50000 bytes of room.
  put("sys/fs/cgroup/a/memory.max", "400000\n");
  put("sys/fs/cgroup/a/memory.current", "350000\n");
  put("sys/fs/cgroup/memory.max", "max\n");
  const HostMemory h = read_host_memory(root_.string());
  EXPECT_EQ(h.mem_available, 1000 * 1024);
  EXPECT_EQ(h.cgroup_room, 50000);
  EXPECT_HAS(h.cgroup, "a/memory.max");
  EXPECT_EQ(h.available(), 50000);
}

TEST_F(PreflightTest, HostMemoryCgroupV1AndUnlimited) {
  put("proc/meminfo", "MemAvailable: 2048 kB\n");
  put("proc/self/cgroup", "5:cpu,cpuacct:/x\n4:memory:/x\n");
  put("sys/fs/cgroup/memory/x/memory.limit_in_bytes", "1048576\n");
  put("sys/fs/cgroup/memory/x/memory.usage_in_bytes", "524288\n");
  HostMemory h = read_host_memory(root_.string());
  EXPECT_EQ(h.cgroup_room, 524288);
  EXPECT_EQ(h.available(), 524288);
  // v1's "no limit" is the largest page-aligned int64.
  put("sys/fs/cgroup/memory/x/memory.limit_in_bytes", "9223372036854771712\n");
  h = read_host_memory(root_.string());
  EXPECT_EQ(h.cgroup_room, -1);
  EXPECT_EQ(h.available(), 2048 * 1024);
  // Nothing readable: unknown, and nothing is checked.
  const HostMemory none = read_host_memory((root_ / "nothing").string());
  EXPECT_EQ(none.available(), -1);
  EXPECT_EQ(rank_budget(none, 4).bytes, -1);
}

TEST(Preflight, BudgetDividesTheNodeAmongItsRanks) {
  HostMemory h;
  h.mem_available = 8 << 20;
  const MemoryBudget b = rank_budget(h, 4);
  EXPECT_EQ(b.bytes, 2 << 20);
  EXPECT_HAS(b.source, "shared by the 4 ranks on this node");
  // On a GPU the rank has the GPU's free memory to itself.
  EXPECT_EQ(rank_budget(h, 4, 123456).bytes, 123456);
}

TEST(Preflight, RefusalNamesThePlanTheBudgetAndWhatWouldFit) {
  TrainConfig cfg;
  cfg.model_preset = "gpt-small";
  cfg.batch_size = 8;
  cfg.seq_len = 128;
  const models::ModelConfig m = model_config(cfg);
  const PrecisionPolicy p = PrecisionPolicy::parse("bf16");
  const auto full = models::estimate_memory(m, p, 8, 128);
  const auto one = models::estimate_memory(m, p, 1, 128);
  MemoryBudget b{full.total(), "test"};
  EXPECT_EQ(memory_refusal(cfg, m, p, 1, b), "");
  b.bytes = one.total() * 10 / 9 + 16;  // with a tenth spare, only a micro-batch of 1 fits
  ASSERT_GT(models::estimate_memory(m, p, 2, 128).total(), b.bytes - b.bytes / 10);
  std::string e = memory_refusal(cfg, m, p, 1, b);
  EXPECT_HAS(e, "not enough memory: the plan needs " + human_bytes(full.total()) + " per rank");
  EXPECT_HAS(e, "activations " + human_bytes(full.activations));
  EXPECT_HAS(e, "but this rank has " + human_bytes(b.bytes) + " (test)");
  EXPECT_HAS(e, "train.batch_size = 1 with train.grad_accum = 8");
  EXPECT_HAS(e, "Nothing was allocated or written");
  // Over 4 DP ranks, ZeRO-1 is the first suggestion when it fits.
  const auto z = models::estimate_memory(m, p, 8, 128, 1, 4, true);
  b.bytes = z.total() * 10 / 9 + 16;
  e = memory_refusal(cfg, m, p, 4, b);
  EXPECT_HAS(e,
             "train.zero = 1 (ZeRO-1 over the 4 data-parallel ranks): " + human_bytes(z.total()));
  // Only the model split over more ranks fits: the smallest TP that divides the heads.
  TrainConfig t2 = cfg;
  t2.tp = 2;
  const models::ModelConfig m2 = model_config(t2);
  const auto split = models::estimate_memory(m2, p, 8, 128, 2);
  b.bytes = split.total() * 10 / 9 + 16;
  ASSERT_GT(one.total(), b.bytes - b.bytes / 10);  // no micro-batch fits at TP 1
  e = memory_refusal(cfg, m, p, 1, b);
  EXPECT_HAS(e, "--tp 2 on 2 ranks (DP 1 x TP 2)");
  // Nothing fits: said so.
  b.bytes = 1024;
  EXPECT_HAS(memory_refusal(cfg, m, p, 1, b), "No layout within reach fits");
  // An unknown budget checks nothing.
  EXPECT_EQ(memory_refusal(cfg, m, p, 1, MemoryBudget{}), "");
}

// The plan is what the Trainer allocates: parameters, gradients, master weights and AdamW state
// exactly, activations (allocated by the first forward) within 10%.
TEST(Preflight, PlanMatchesTheTrainersAllocation) {
  const fs::path dir = fs::temp_directory_path() / ("mt_plan_" + std::to_string(::getpid()));
  for (const char* precision : {"fp32", "bf16"}) {
    for (int batch : {1, 4}) {
      TrainConfig cfg;
      cfg.model_preset = "gpt-tiny";
      cfg.precision = precision;
      cfg.batch_size = batch;
      cfg.seq_len = 48;
      cfg.steps = 1;
      cfg.sample_tokens = 0;
      cfg.eval_every = 0;
      cfg.threads = 1;
      cfg.run_dir = (dir / fmt::format("{}_{}", precision, batch)).string();
      Trainer t(cfg);
      t.set_verbose(false);
      t.run();
      const auto plan =
          models::estimate_memory(model_config(cfg), PrecisionPolicy::parse(precision), batch, 48);
      const std::string what = fmt::format("{} batch {}", precision, batch);
      EXPECT_EQ(plan.parameters, static_cast<std::int64_t>(t.model().flat_params().nbytes()))
          << what;
      EXPECT_EQ(plan.gradients, static_cast<std::int64_t>(t.model().flat_grads().nbytes())) << what;
      EXPECT_EQ(plan.master_weights, t.optimizer().master_bytes()) << what;
      EXPECT_EQ(plan.optimizer_state, t.optimizer().moment_bytes()) << what;
      const double acts = static_cast<double>(t.model().activation_bytes());
      EXPECT_NEAR(static_cast<double>(plan.activations), acts, 0.10 * acts) << what;
    }
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace meshtrain::launch
