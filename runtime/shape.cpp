#include "runtime/shape.hpp"

#include "runtime/error.hpp"

namespace meshtrain {

Shape::Shape(std::initializer_list<std::int64_t> dims) : Shape(std::vector<std::int64_t>(dims)) {}

Shape::Shape(const std::vector<std::int64_t>& dims) {
  MT_CHECK(dims.size() <= static_cast<std::size_t>(kMaxDims),
           "a shape has at most {} dimensions, got {}", kMaxDims, dims.size());
  for (std::size_t i = 0; i < dims.size(); ++i) {
    MT_CHECK(dims[i] >= 0, "shape dimension {} is negative ({})", i, dims[i]);
    dims_[i] = dims[i];
  }
  ndim_ = static_cast<int>(dims.size());
}

std::int64_t Shape::operator[](int i) const {
  const int j = i < 0 ? i + ndim_ : i;
  MT_CHECK(j >= 0 && j < ndim_, "dimension index {} out of range for shape {}", i, str());
  return dims_[j];
}

std::int64_t Shape::numel() const {
  std::int64_t n = 1;
  for (int i = 0; i < ndim_; ++i) n *= dims_[i];
  return n;
}

std::vector<std::int64_t> Shape::to_vector() const {
  return std::vector<std::int64_t>(dims_.begin(), dims_.begin() + ndim_);
}

bool Shape::operator==(const Shape& o) const {
  if (ndim_ != o.ndim_) return false;
  for (int i = 0; i < ndim_; ++i)
    if (dims_[i] != o.dims_[i]) return false;
  return true;
}

std::string Shape::str() const {
  std::string s = "[";
  for (int i = 0; i < ndim_; ++i) s += (i ? ", " : "") + std::to_string(dims_[i]);
  return s + "]";
}

}  // namespace meshtrain
