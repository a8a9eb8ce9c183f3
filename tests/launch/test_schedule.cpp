// Learning-rate schedules: warm-up, cosine end points, constant, warmup-stable-decay.
#include <cmath>

#include <gtest/gtest.h>

#include "launch/schedule.hpp"
#include "runtime/error.hpp"

namespace meshtrain::launch {
namespace {

LrSchedule make(const std::string& kind, int warmup, int total) {
  LrSchedule s;
  s.kind = kind;
  s.lr = 1e-3;
  s.min_lr_ratio = 0.1;
  s.warmup_steps = warmup;
  s.total_steps = total;
  s.decay_fraction = 0.2;
  return s;
}

TEST(Schedule, WarmupRisesLinearlyToThePeak) {
  for (const char* kind : {"cosine", "constant", "wsd"}) {
    const LrSchedule s = make(kind, 10, 100);
    for (int i = 0; i < 10; ++i) EXPECT_DOUBLE_EQ(s.at(i), 1e-3 * (i + 1) / 10) << kind << " " << i;
    EXPECT_DOUBLE_EQ(s.at(9), 1e-3) << kind;
  }
}

TEST(Schedule, CosineEndPointsAndMidpoint) {
  const LrSchedule s = make("cosine", 10, 100);
  EXPECT_DOUBLE_EQ(s.at(10), 1e-3);  // first step after warm-up: the peak
  EXPECT_DOUBLE_EQ(s.at(99), 1e-4);  // the last step: lr x min_lr_ratio
  // Step 54 is 44 of the 89 steps from the peak (step 10) to the floor (step 99).
  EXPECT_NEAR(s.at(54), 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + std::cos(M_PI * 44 / 89.0)), 1e-15);
  for (int i = 11; i < 100; ++i) EXPECT_LT(s.at(i), s.at(i - 1)) << i;
  EXPECT_DOUBLE_EQ(s.at(150), 1e-4);  // past the end it stays at the floor
  // Without warm-up, step 0 is the peak.
  EXPECT_DOUBLE_EQ(make("cosine", 0, 50).at(0), 1e-3);
  EXPECT_DOUBLE_EQ(make("cosine", 0, 50).at(49), 1e-4);
}

TEST(Schedule, ConstantHoldsThePeak) {
  const LrSchedule s = make("constant", 5, 100);
  for (int i = 5; i < 120; ++i) EXPECT_DOUBLE_EQ(s.at(i), 1e-3) << i;
}

TEST(Schedule, WarmupStableDecay) {
  // 100 steps, decay over the last 20%: stable up to step 79, then linear to the floor at 99.
  const LrSchedule s = make("wsd", 10, 100);
  for (int i = 10; i <= 80; ++i) EXPECT_DOUBLE_EQ(s.at(i), 1e-3) << i;
  EXPECT_DOUBLE_EQ(s.at(99), 1e-4);
  EXPECT_NEAR(s.at(90), 1e-3 + (1e-4 - 1e-3) * 10.0 / 19.0, 1e-15);
  for (int i = 81; i < 100; ++i) EXPECT_LT(s.at(i), s.at(i - 1)) << i;
  // decay_fraction 0: no decay at all.
  LrSchedule flat = make("wsd", 0, 100);
  flat.decay_fraction = 0;
  EXPECT_DOUBLE_EQ(flat.at(99), 1e-3);
}

TEST(Schedule, BadInputThrows) {
  LrSchedule s = make("linear", 0, 10);
  try {
    s.at(3);
    ADD_FAILURE() << "no error for an unknown schedule";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("unknown learning-rate schedule 'linear'"),
              std::string::npos);
  }
  EXPECT_THROW(make("cosine", 0, 10).at(-1), InvalidArgument);
}

}  // namespace
}  // namespace meshtrain::launch
