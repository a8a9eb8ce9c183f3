// Precision policies (DESIGN.md, "Precision") and the dynamic loss scaler for fp16.
#pragma once

#include <string>
#include <string_view>

#include "runtime/dtype.hpp"

namespace meshtrain {

enum class Precision { kFP32, kBF16, kFP16 };

struct PrecisionPolicy {
  Precision precision = Precision::kBF16;
  DType param = DType::kBF16;       // parameters as used in compute
  DType activation = DType::kBF16;  // activations and their gradients
  DType grad = DType::kF32;         // parameter gradients, as reduced across ranks
  DType master = DType::kF32;       // master weights and Adam state
  bool loss_scaling = false;        // dynamic loss scaling (fp16 only)

  static PrecisionPolicy make(Precision p);
  // "fp32", "bf16" or "fp16"; anything else throws InvalidArgument naming the text.
  static PrecisionPolicy parse(std::string_view name);
  std::string_view name() const;
  // True when master weights are separate from the compute parameters.
  bool has_master_copy() const { return param != master; }
};

// Dynamic loss scaling as torch.cuda.amp.GradScaler: multiply the loss by scale(); after
// backward, if any gradient is non-finite, skip the step and multiply the scale by
// backoff_factor; after growth_interval clean steps in a row, multiply it by growth_factor.
class DynamicLossScaler {
 public:
  explicit DynamicLossScaler(float init_scale = 65536.0f, float growth_factor = 2.0f,
                             float backoff_factor = 0.5f, int growth_interval = 2000,
                             float min_scale = 1.0f);

  float scale() const { return scale_; }
  // Records the outcome of one step; returns true when the optimizer step should run.
  bool update(bool found_non_finite);
  int skipped_steps() const { return skipped_; }
  int clean_steps_in_a_row() const { return clean_; }
  // For checkpoints: restore the state exactly.
  void restore(float scale, int clean_steps_in_a_row, int skipped_steps);

 private:
  float scale_;
  float growth_factor_;
  float backoff_factor_;
  int growth_interval_;
  float min_scale_;
  int clean_ = 0;
  int skipped_ = 0;
};

}  // namespace meshtrain
