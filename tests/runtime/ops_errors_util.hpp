// The helpers of the op argument-error tests (test_ops_errors*.cpp, one binary): random
// inputs, and the checks that a valid call succeeds and that each bad one throws InvalidArgument
// naming what is wrong. Defined in ops_errors_util.cpp.
#pragma once

#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "runtime/tensor.hpp"

namespace meshtrain {

constexpr DType kF32 = DType::kF32, kBF16 = DType::kBF16, kF16 = DType::kF16, kI32 = DType::kI32;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Random values (never zeros), so that a valid call computes something real.
Tensor rnd(const Shape& shape, DType dtype = kF32);
Tensor ints(const std::vector<std::int32_t>& v, const Shape& shape);

struct ErrorCase {
  std::string label;
  std::function<void()> call;
  std::vector<std::string> fragments;  // all must appear in the message
};

void expect_errors(const std::vector<ErrorCase>& cases);
// The valid call must succeed, or fail only because its kernel is not written yet.
void expect_valid(const std::function<void()>& call, const char* op);

}  // namespace meshtrain
