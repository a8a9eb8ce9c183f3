// Embeds meshtrain's Trainer as a cluster workflow would: a config built in code, a per-step
// callback, two steps on the built-in corpus. Exits non-zero unless both steps report a
// finite loss.
//
//   consumer RUN_DIR
#include <cmath>
#include <cstdio>
#include <vector>

#include "launch/trainer.hpp"
#include "runtime/config.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: consumer RUN_DIR\n");
    return 2;
  }
  try {
    meshtrain::launch::TrainConfig cfg;
    cfg.model_preset = "gpt-tiny";
    cfg.steps = 2;
    cfg.batch_size = 2;
    cfg.seq_len = 32;
    cfg.warmup_steps = 0;
    cfg.threads = 1;
    cfg.sample_tokens = 0;
    cfg.run_dir = argv[1];
    meshtrain::launch::Trainer trainer(cfg);
    trainer.set_verbose(false);
    std::vector<float> losses;
    trainer.on_step([&](const meshtrain::launch::StepMetrics& m) {
      std::printf("step %d/%d loss %.4f\n", m.step, m.total_steps, m.loss);
      losses.push_back(m.loss);
    });
    trainer.run();
    if (losses.size() != 2 || !std::isfinite(losses[0]) || !std::isfinite(losses[1])) {
      std::fprintf(stderr, "consumer: expected 2 finite losses from on_step, got %zu\n",
                   losses.size());
      return 1;
    }
    std::printf("consumer: meshtrain %s trained 2 steps\n", MESHTRAIN_VERSION);
    return 0;
  } catch (const meshtrain::Error& e) {
    std::fprintf(stderr, "consumer: %s\n", e.what());
    return 1;
  }
}
