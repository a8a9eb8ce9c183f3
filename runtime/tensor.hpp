// Tensor: a shape, a dtype and a view into reference-counted device storage.
//
// Tensors are always contiguous and row-major; a view is a reshape or a range of the first
// dimension, sharing storage. Copying a Tensor copies the handle, not the data (as in PyTorch);
// clone() copies data. Not thread-safe for concurrent mutation of the same data.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "runtime/device.hpp"
#include "runtime/dtype.hpp"
#include "runtime/error.hpp"
#include "runtime/shape.hpp"

namespace meshtrain {

// A block of device memory. Owning storage returns its block to the device's allocator;
// non-owning storage wraps memory that someone else keeps alive (a mapped file, a user buffer).
class Storage {
 public:
  Storage(Device& device, std::size_t nbytes);                  // owning, from the allocator
  Storage(Device& device, void* external, std::size_t nbytes);  // non-owning
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return ptr_; }
  std::size_t nbytes() const { return nbytes_; }
  Device& device() const { return *device_; }
  bool owns() const { return owns_; }

 private:
  Device* device_;
  void* ptr_;
  std::size_t nbytes_;
  bool owns_;
};

class Tensor {
 public:
  Tensor() = default;  // undefined: no storage

  // Uninitialised memory.
  static Tensor empty(const Shape& shape, DType dtype, Device& device = cpu_device());
  static Tensor zeros(const Shape& shape, DType dtype, Device& device = cpu_device());
  // Copies host values (fp32 converted to dtype, or int32 for kI32) to a new tensor.
  static Tensor from_floats(const std::vector<float>& values, const Shape& shape, DType dtype,
                            Device& device = cpu_device());
  static Tensor from_ints(const std::vector<std::int32_t>& values, const Shape& shape,
                          Device& device = cpu_device());
  // Wraps memory owned elsewhere; it must outlive the tensor and its views.
  static Tensor wrap(void* data, const Shape& shape, DType dtype, Device& device = cpu_device());

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return shape_.ndim(); }
  std::int64_t dim(int i) const { return shape_[i]; }
  std::int64_t numel() const { return shape_.numel(); }
  DType dtype() const { return dtype_; }
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype_); }
  Device& device() const;
  bool is_cpu() const { return device().is_cpu(); }

  void* data() const;
  // Typed pointer; throws if T does not match dtype().
  template <typename T>
  T* data_as() const {
    MT_CHECK(DTypeOf<T>::value == dtype_, "tensor {} accessed as {}", str(),
             dtype_name(DTypeOf<T>::value));
    return static_cast<T*>(data());
  }

  // Same data, new shape with the same number of elements.
  Tensor view(const Shape& shape) const;
  // Rows [start, start + length) of the first dimension.
  Tensor slice(std::int64_t start, std::int64_t length) const;
  // The whole tensor as 1-D.
  Tensor flat() const { return view(Shape{numel()}); }

  // A new tensor with a copy of the data, optionally on another device or in another dtype.
  Tensor clone() const;
  Tensor to(Device& device) const;
  Tensor to(DType dtype) const;
  // Copies src into this tensor (same numel; dtype converted; any devices).
  void copy_from(const Tensor& src);
  void zero_();

  // Host copies of the values, converted to fp32 (float dtypes) or int32.
  std::vector<float> to_floats() const;
  std::vector<std::int32_t> to_ints() const;

  // "bf16[4, 256] on cpu"
  std::string str() const;

 private:
  std::shared_ptr<Storage> storage_;
  std::size_t offset_ = 0;  // bytes into storage_
  Shape shape_;
  DType dtype_ = DType::kF32;
};

}  // namespace meshtrain
