// A tensor shape: up to kMaxDims extents, row-major.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace meshtrain {

class Shape {
 public:
  static constexpr int kMaxDims = 6;

  Shape() = default;
  Shape(std::initializer_list<std::int64_t> dims);
  explicit Shape(const std::vector<std::int64_t>& dims);

  int ndim() const { return ndim_; }
  // Negative indices count from the end, as in PyTorch. Throws on an out-of-range index.
  std::int64_t operator[](int i) const;
  std::int64_t numel() const;
  std::vector<std::int64_t> to_vector() const;

  bool operator==(const Shape& o) const;
  bool operator!=(const Shape& o) const { return !(*this == o); }

  // "[4, 256, 384]"
  std::string str() const;

 private:
  std::array<std::int64_t, kMaxDims> dims_{};
  int ndim_ = 0;
};

}  // namespace meshtrain
