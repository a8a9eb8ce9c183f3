#include "runtime/tensor.hpp"

#include "runtime/backend.hpp"

namespace meshtrain {

Storage::Storage(Device& device, std::size_t nbytes)
    : device_(&device), ptr_(device.allocate(nbytes)), nbytes_(nbytes), owns_(true) {}

Storage::Storage(Device& device, void* external, std::size_t nbytes)
    : device_(&device), ptr_(external), nbytes_(nbytes), owns_(false) {}

Storage::~Storage() {
  if (owns_) device_->deallocate(ptr_, nbytes_);
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device& device) {
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.storage_ = std::make_shared<Storage>(device, t.nbytes());
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device& device) {
  Tensor t = empty(shape, dtype, device);
  t.zero_();
  return t;
}

Tensor Tensor::from_floats(const std::vector<float>& values, const Shape& shape, DType dtype,
                           Device& device) {
  MT_CHECK(static_cast<std::int64_t>(values.size()) == shape.numel(),
           "from_floats: {} values for shape {} ({} elements)", values.size(), shape.str(),
           shape.numel());
  MT_CHECK(is_floating(dtype), "from_floats: dtype must be a float type, got {}",
           dtype_name(dtype));
  Tensor t = empty(shape, dtype, device);
  std::vector<std::uint8_t> host(t.nbytes());
  convert_host(host.data(), dtype, values.data(), DType::kF32, values.size());
  device.copy_from_host(t.data(), host.data(), host.size());
  return t;
}

Tensor Tensor::from_ints(const std::vector<std::int32_t>& values, const Shape& shape,
                         Device& device) {
  MT_CHECK(static_cast<std::int64_t>(values.size()) == shape.numel(),
           "from_ints: {} values for shape {} ({} elements)", values.size(), shape.str(),
           shape.numel());
  Tensor t = empty(shape, DType::kI32, device);
  device.copy_from_host(t.data(), values.data(), t.nbytes());
  return t;
}

Tensor Tensor::wrap(void* data, const Shape& shape, DType dtype, Device& device) {
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.storage_ = std::make_shared<Storage>(device, data, t.nbytes());
  return t;
}

Device& Tensor::device() const {
  MT_CHECK(defined(), "use of an undefined tensor");
  return storage_->device();
}

void* Tensor::data() const {
  MT_CHECK(defined(), "use of an undefined tensor");
  return static_cast<std::uint8_t*>(storage_->data()) + offset_;
}

Tensor Tensor::view(const Shape& shape) const {
  MT_CHECK(defined(), "view of an undefined tensor");
  MT_CHECK(shape.numel() == numel(), "cannot view {} as shape {}: {} vs {} elements", str(),
           shape.str(), numel(), shape.numel());
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::slice(std::int64_t start, std::int64_t length) const {
  MT_CHECK(defined() && ndim() >= 1, "slice needs a defined tensor with a dimension, got {}",
           str());
  MT_CHECK(start >= 0 && length >= 0 && start + length <= shape_[0],
           "slice [{}, {}) out of range for {}", start, start + length, str());
  const std::int64_t row = numel() / std::max<std::int64_t>(shape_[0], 1);
  std::vector<std::int64_t> dims = shape_.to_vector();
  dims[0] = length;
  Tensor t = *this;
  t.shape_ = Shape(dims);
  t.offset_ += static_cast<std::size_t>(start * row) * dtype_size(dtype_);
  return t;
}

Tensor Tensor::clone() const {
  return to(device());
}

Tensor Tensor::to(Device& dev) const {
  Tensor t = empty(shape_, dtype_, dev);
  t.copy_from(*this);
  return t;
}

Tensor Tensor::to(DType dtype) const {
  Tensor t = empty(shape_, dtype, device());
  t.copy_from(*this);
  return t;
}

void Tensor::copy_from(const Tensor& src) {
  MT_CHECK(defined() && src.defined(), "copy_from with an undefined tensor");
  MT_CHECK(numel() == src.numel(), "copy_from: {} into {} (element counts differ)", src.str(),
           str());
  Device& dst_dev = device();
  Device& src_dev = src.device();
  if (dtype_ != src.dtype_) {
    MT_CHECK(is_floating(dtype_) && is_floating(src.dtype_), "copy_from: cannot convert {} to {}",
             dtype_name(src.dtype_), dtype_name(dtype_));
    if (&dst_dev == &src_dev) {
      Tensor self = *this;
      dst_dev.backend().convert(self, src);
      return;
    }
    // Convert on the source device, then move the bytes.
    Tensor tmp = src.to(dtype_);
    copy_from(tmp);
    return;
  }
  if (&dst_dev == &src_dev) {
    dst_dev.copy_within(data(), src.data(), nbytes());
  } else if (src_dev.is_cpu()) {
    dst_dev.copy_from_host(data(), src.data(), nbytes());
  } else if (dst_dev.is_cpu()) {
    src_dev.copy_to_host(data(), src.data(), nbytes());
  } else {
    std::vector<std::uint8_t> host(nbytes());
    src_dev.copy_to_host(host.data(), src.data(), nbytes());
    dst_dev.copy_from_host(data(), host.data(), nbytes());
  }
}

void Tensor::zero_() {
  device().fill_zero(data(), nbytes());
}

std::vector<float> Tensor::to_floats() const {
  MT_CHECK(is_floating(dtype_), "to_floats on a {} tensor", dtype_name(dtype_));
  std::vector<std::uint8_t> host(nbytes());
  device().copy_to_host(host.data(), data(), nbytes());
  std::vector<float> out(static_cast<std::size_t>(numel()));
  convert_host(out.data(), DType::kF32, host.data(), dtype_, out.size());
  return out;
}

std::vector<std::int32_t> Tensor::to_ints() const {
  MT_CHECK(dtype_ == DType::kI32, "to_ints on a {} tensor", dtype_name(dtype_));
  std::vector<std::int32_t> out(static_cast<std::size_t>(numel()));
  device().copy_to_host(out.data(), data(), nbytes());
  return out;
}

std::string Tensor::str() const {
  if (!defined()) return "undefined tensor";
  return fmt::format("{}{} on {}", dtype_name(dtype_), shape_.str(), device().name());
}

}  // namespace meshtrain
