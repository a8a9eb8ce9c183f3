// The device interface: memory, copies and the op backend of one compute device.
//
// A Device is what c10 calls a DeviceGuardImpl plus an allocator: code that may not be linked
// (CUDA) sits behind this interface, so nothing outside the CUDA library sees cuda_runtime.h.
// Lifetime: a Device outlives every Tensor allocated on it. The CPU device lives for the whole
// process and owns only host memory; CUDA devices are created by the CUDA library and owned
// by whoever opened them (the trainer), never by a static.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace meshtrain {

class Backend;

enum class DeviceType : std::uint8_t { kCPU, kCUDA };

struct MemoryStats {
  std::size_t in_use_bytes = 0;        // held by live tensors (rounded to the allocator's blocks)
  std::size_t peak_in_use_bytes = 0;   // maximum of in_use_bytes since the last reset
  std::size_t cached_bytes = 0;        // held by the allocator's free lists, ready for reuse
  std::size_t system_allocations = 0;  // calls to the system allocator since start
};

class Device {
 public:
  virtual ~Device() = default;
  Device() = default;
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  virtual DeviceType type() const = 0;
  virtual int index() const = 0;
  // "cpu" or "cuda:0".
  virtual std::string name() const = 0;

  // Memory from the device's caching allocator: in steady state a training step reuses
  // blocks and makes no system allocation. Thread-safe.
  virtual void* allocate(std::size_t nbytes) = 0;
  virtual void deallocate(void* ptr, std::size_t nbytes) noexcept = 0;
  virtual MemoryStats memory_stats() const = 0;
  virtual void reset_peak_memory() = 0;
  // Returns cached blocks to the system.
  virtual void empty_cache() = 0;

  // Copies ordered on the device's compute stream; the host copies return when complete.
  virtual void copy_from_host(void* dst, const void* src, std::size_t nbytes) = 0;
  virtual void copy_to_host(void* dst, const void* src, std::size_t nbytes) = 0;
  virtual void copy_within(void* dst, const void* src, std::size_t nbytes) = 0;
  virtual void fill_zero(void* dst, std::size_t nbytes) = 0;
  // Waits for all work queued on the device.
  virtual void synchronize() = 0;

  // The ops for tensors on this device.
  virtual Backend& backend() = 0;

  bool is_cpu() const { return type() == DeviceType::kCPU; }
};

// The process-wide CPU device.
Device& cpu_device();

}  // namespace meshtrain
