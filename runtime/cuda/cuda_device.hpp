// Opening CUDA devices. This header is plain C++ (no cuda_runtime.h), so that the trainer and
// the tests can open a GPU through the Device interface without seeing CUDA types.
//
// A CUDA Device owns one compute stream (every op, copy and fill on that device is ordered on
// it), a caching allocator over cudaMalloc (freed blocks are reused in stream order, so a
// training step makes no cudaMalloc once its sizes have been seen), a pinned staging buffer
// for host copies, and the op backend (cuBLASLt, cuDNN and our kernels). Whoever opens a
// device owns it and must destroy it after every tensor on it; nothing static owns one.
// Thread-safety: allocation is thread-safe; ops and copies are meant to be issued by one
// thread (the rank's), as on the CPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "runtime/device.hpp"

namespace meshtrain::cuda {

// Number of visible GPUs; 0 when there is no driver or no device (never throws for that).
int device_count();

// Opens GPU `index` (makes it this thread's current device). Throws CudaError when there is
// no such device.
std::unique_ptr<Device> open_device(int index);
// Opens the GPU of the rank that is `local_rank`-th among the processes of its node: local_rank
// modulo the number of visible GPUs. The caller knows its local rank from the MPI session
// (comm::MpiSession::local_rank()); runtime/ reads no launcher's variables.
std::unique_ptr<Device> open_local_device(int local_rank);

// The compute stream of a CUDA device, as a cudaStream_t behind void* (for code that orders
// its own CUDA work with the ops without seeing CUDA types here: NCCL's compute_stream
// option). Throws InvalidArgument for a device that is not CUDA.
void* compute_stream(Device& device);

// The GPU's UUID as nvidia-smi prints it ("GPU-8c1e6f2a-...") and its PCI bus id
// ("0000:3b:00.0"), for telling whether two ranks drive the same physical GPU (device indices
// do not: each rank may see a different CUDA_VISIBLE_DEVICES). Throws InvalidArgument for a
// device that is not CUDA, CudaError when the driver cannot say.
std::string device_uuid(Device& device);
std::string device_pci_bus_id(Device& device);

// The GPU's free and total memory in bytes (cudaMemGetInfo): what a job checks its planned
// memory against before allocating. Throws InvalidArgument for a device that is not CUDA.
struct DeviceMemory {
  std::int64_t free_bytes = 0, total_bytes = 0;
};
DeviceMemory device_memory(Device& device);

// Page-locked host memory (cudaMallocHost), for fast and asynchronous host <-> device copies.
// Move-only; the destructor never throws.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(std::size_t nbytes);
  ~PinnedBuffer();
  PinnedBuffer(PinnedBuffer&& o) noexcept : ptr_(o.ptr_), nbytes_(o.nbytes_) {
    o.ptr_ = nullptr;
    o.nbytes_ = 0;
  }
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  void* data() const { return ptr_; }
  std::size_t size() const { return nbytes_; }

 private:
  void* ptr_ = nullptr;
  std::size_t nbytes_ = 0;
};

// Makes a device current for its scope and restores the previous one (c10's DeviceGuard).
class DeviceGuard {
 public:
  explicit DeviceGuard(int index);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool changed_ = false;
};

}  // namespace meshtrain::cuda
