// The helpers of the op argument-error tests, declared in ops_errors_util.hpp.
#include "tests/runtime/ops_errors_util.hpp"

#include <gtest/gtest.h>

#include <random>

#include "runtime/error.hpp"

namespace meshtrain {

// Random values (never zeros), so that a valid call computes something real.
Tensor rnd(const Shape& shape, DType dtype) {
  static std::mt19937 gen(7);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  if (dtype == kI32) {
    std::vector<std::int32_t> v(static_cast<std::size_t>(shape.numel()));
    for (auto& x : v) x = static_cast<std::int32_t>(gen() % 5);
    return Tensor::from_ints(v, shape);
  }
  std::vector<float> v(static_cast<std::size_t>(shape.numel()));
  for (float& x : v) x = dist(gen);
  return Tensor::from_floats(v, shape, dtype);
}

Tensor ints(const std::vector<std::int32_t>& v, const Shape& shape) {
  return Tensor::from_ints(v, shape);
}

void expect_errors(const std::vector<ErrorCase>& cases) {
  for (const ErrorCase& c : cases) {
    try {
      c.call();
      ADD_FAILURE() << c.label << ": accepted";
    } catch (const InvalidArgument& e) {
      const std::string msg = e.what();
      for (const std::string& f : c.fragments)
        EXPECT_NE(msg.find(f), std::string::npos)
            << c.label << ": expected '" << f << "' in: " << msg;
    } catch (const std::exception& e) {
      ADD_FAILURE() << c.label << ": expected InvalidArgument, got " << e.what();
    }
  }
}

// The valid call must succeed, or fail only because its kernel is not written yet.
void expect_valid(const std::function<void()>& call, const char* op) {
  try {
    call();
  } catch (const InvalidArgument& e) {
    const std::string msg = e.what();
    if (msg.find("not implemented yet") == std::string::npos)
      ADD_FAILURE() << op << ": the valid call was refused: " << msg;
  }
}

}  // namespace meshtrain
