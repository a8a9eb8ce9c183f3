// Learning-rate schedules: linear warm-up, then cosine, constant, or warmup-stable-decay.
#pragma once

#include <string>

namespace meshtrain::launch {

struct LrSchedule {
  std::string kind = "cosine";  // cosine, constant, wsd
  double lr = 1e-3;
  double min_lr_ratio = 0.1;
  int warmup_steps = 0;
  int total_steps = 1;
  double decay_fraction = 0.2;  // wsd only

  // The learning rate of optimizer step `step` (0-based). Warm-up rises linearly to lr over
  // warmup_steps (step 0 gets lr / warmup_steps); cosine decays from lr to lr x min_lr_ratio at
  // the last step; wsd holds lr, then decays linearly over the last decay_fraction of steps.
  double at(int step) const;
};

}  // namespace meshtrain::launch
