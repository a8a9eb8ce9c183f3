#include "launch/schedule.hpp"

#include <algorithm>
#include <cmath>

#include "runtime/error.hpp"

namespace meshtrain::launch {

double LrSchedule::at(int step) const {
  MT_CHECK(step >= 0, "learning-rate schedule: step {} is negative", step);
  if (step < warmup_steps) return lr * static_cast<double>(step + 1) / warmup_steps;
  const double min_lr = lr * min_lr_ratio;
  const int last = std::max(total_steps - 1, 1);
  if (kind == "constant") return lr;
  if (kind == "cosine") {
    const double span = std::max(last - warmup_steps, 1);
    const double progress = std::clamp((step - warmup_steps) / span, 0.0, 1.0);
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(M_PI * progress));
  }
  if (kind == "wsd") {
    const int decay_steps = static_cast<int>(std::ceil(decay_fraction * total_steps));
    const int decay_start = std::max(warmup_steps, total_steps - decay_steps);
    if (step < decay_start || decay_steps == 0) return lr;
    const double progress = std::clamp(
        static_cast<double>(step - decay_start) / std::max(last - decay_start, 1), 0.0, 1.0);
    return lr + (min_lr - lr) * progress;
  }
  MT_FAIL("unknown learning-rate schedule '{}': expected cosine, constant or wsd", kind);
}

}  // namespace meshtrain::launch
