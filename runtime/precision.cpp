#include "runtime/precision.hpp"

#include <algorithm>
#include <cmath>

#include "runtime/error.hpp"

namespace meshtrain {

PrecisionPolicy PrecisionPolicy::make(Precision p) {
  PrecisionPolicy policy;
  policy.precision = p;
  switch (p) {
    case Precision::kFP32:
      policy.param = policy.activation = DType::kF32;
      break;
    case Precision::kBF16:
      policy.param = policy.activation = DType::kBF16;
      break;
    case Precision::kFP16:
      policy.param = policy.activation = DType::kF16;
      policy.loss_scaling = true;
      break;
  }
  return policy;
}

PrecisionPolicy PrecisionPolicy::parse(std::string_view name) {
  if (name == "fp32") return make(Precision::kFP32);
  if (name == "bf16") return make(Precision::kBF16);
  if (name == "fp16") return make(Precision::kFP16);
  MT_FAIL("unknown precision policy '{}': expected fp32, bf16 or fp16", name);
}

std::string_view PrecisionPolicy::name() const {
  switch (precision) {
    case Precision::kFP32:
      return "fp32";
    case Precision::kBF16:
      return "bf16";
    case Precision::kFP16:
      return "fp16";
  }
  return "?";
}

DynamicLossScaler::DynamicLossScaler(float init_scale, float growth_factor, float backoff_factor,
                                     int growth_interval, float min_scale)
    : scale_(init_scale),
      growth_factor_(growth_factor),
      backoff_factor_(backoff_factor),
      growth_interval_(growth_interval),
      min_scale_(min_scale) {
  MT_CHECK(std::isfinite(init_scale) && init_scale > 0, "loss scale must be positive, got {}",
           init_scale);
  MT_CHECK(growth_factor > 1, "loss scale growth factor must exceed 1, got {}", growth_factor);
  MT_CHECK(backoff_factor > 0 && backoff_factor < 1,
           "loss scale backoff factor must be in (0, 1), got {}", backoff_factor);
  MT_CHECK(growth_interval >= 1, "loss scale growth interval must be at least 1, got {}",
           growth_interval);
  MT_CHECK(min_scale > 0 && min_scale <= init_scale,
           "minimum loss scale must be in (0, initial scale], got {}", min_scale);
}

bool DynamicLossScaler::update(bool found_non_finite) {
  if (found_non_finite) {
    scale_ = std::max(min_scale_, scale_ * backoff_factor_);
    clean_ = 0;
    ++skipped_;
    return false;
  }
  if (++clean_ >= growth_interval_) {
    const float grown = scale_ * growth_factor_;
    if (std::isfinite(grown)) scale_ = grown;
    clean_ = 0;
  }
  return true;
}

void DynamicLossScaler::restore(float scale, int clean_steps_in_a_row, int skipped_steps) {
  MT_CHECK(std::isfinite(scale) && scale > 0, "restored loss scale must be positive, got {}",
           scale);
  MT_CHECK(clean_steps_in_a_row >= 0 && skipped_steps >= 0,
           "restored loss scaler counters must be non-negative");
  scale_ = scale;
  clean_ = clean_steps_in_a_row;
  skipped_ = skipped_steps;
}

}  // namespace meshtrain
