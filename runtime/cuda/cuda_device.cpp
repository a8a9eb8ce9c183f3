// The CUDA device: stream, caching allocator over cudaMalloc, host copies through a pinned
// staging buffer, and the choice of GPU from the local rank its caller passes.
#include <cstring>
#include <new>
#include <utility>

#include "runtime/cuda/cuda_backend.hpp"
#include "runtime/cuda/cuda_check.hpp"
#include "runtime/log.hpp"
#include "runtime/settings.hpp"

namespace meshtrain::cuda {
namespace {

// Host copies up to this size go through the pinned staging buffer (one memcpy on the host,
// then an asynchronous DMA); larger ones let the driver stage pageable memory itself.
constexpr std::size_t kStagingBytes = std::size_t{4} << 20;

int select_device(int index) {
  const int n = device_count();
  if (n == 0)
    throw CudaError("no CUDA device is visible to this process (" + log::rank_label() + ")");
  MT_CHECK(index >= 0 && index < n, "CUDA device {} does not exist: {} visible", index, n);
  MT_CUDA_CHECK(cudaSetDevice(index));
  return index;
}

std::string mib(std::size_t bytes) {
  return fmt::format("{:.1f} MiB", bytes / 1048576.0);
}

}  // namespace

// ---- PinnedBuffer, DeviceGuard --------------------------------------------------------------

PinnedBuffer::PinnedBuffer(std::size_t nbytes) : nbytes_(nbytes) {
  if (nbytes > 0) MT_CUDA_CHECK(cudaMallocHost(&ptr_, nbytes));
}

PinnedBuffer::~PinnedBuffer() {
  if (ptr_ != nullptr) MT_CUDA_LOG(cudaFreeHost(ptr_));
}

PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& o) noexcept {
  std::swap(ptr_, o.ptr_);
  std::swap(nbytes_, o.nbytes_);
  return *this;
}

DeviceGuard::DeviceGuard(int index) {
  MT_CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ != index) {
    MT_CUDA_CHECK(cudaSetDevice(index));
    changed_ = true;
  }
}

DeviceGuard::~DeviceGuard() {
  if (changed_) MT_CUDA_LOG(cudaSetDevice(previous_));
}

// ---- DeviceBuffer, GrowingScratch -----------------------------------------------------------

DeviceBuffer::DeviceBuffer(Device& device, std::size_t nbytes)
    : device_(&device), ptr_(device.allocate(nbytes)), nbytes_(nbytes) {}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept
    : device_(o.device_), ptr_(o.ptr_), nbytes_(o.nbytes_) {
  o.ptr_ = nullptr;
  o.nbytes_ = 0;
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    reset();
    device_ = o.device_;
    ptr_ = std::exchange(o.ptr_, nullptr);
    nbytes_ = std::exchange(o.nbytes_, 0);
  }
  return *this;
}

void DeviceBuffer::reset() noexcept {
  if (ptr_ != nullptr) device_->deallocate(ptr_, nbytes_);
  ptr_ = nullptr;
  nbytes_ = 0;
}

void* GrowingScratch::get(std::size_t nbytes) {
  if (nbytes > buffer_.size()) {
    // The old block returns to the caching allocator; work already queued on the stream that
    // uses it runs before anything that reuses it, since there is one stream.
    buffer_.reset();
    buffer_ = DeviceBuffer(device_, nbytes + nbytes / 4);
  }
  return buffer_.data();
}

// ---- CudaDevice -----------------------------------------------------------------------------

CudaDevice::CudaDevice(int index)
    : index_(select_device(index)),
      stream_(0),
      allocator_(
          [index](std::size_t n) {
            DeviceGuard guard(index);
            void* p = nullptr;
            if (MT_CUDA_ALLOW(cudaMalloc(&p, n), cudaErrorMemoryAllocation) != cudaSuccess) {
              // Clears the error (not sticky, but it would surface at the next launch check):
              // the caller retries after emptying the cache.
              (void)cudaGetLastError();
              throw std::bad_alloc();
            }
            return p;
          },
          [](void* p) {
            // Blocks are freed only once the stream has finished with them (empty_cache and
            // the destructor synchronize first); cudaFree also synchronizes the device.
            MT_CUDA_LOG(cudaFree(p));
          },
          settings().allocator_cache),
      staging_(kStagingBytes) {
  backend_ = std::make_unique<CudaBackend>(*this);
}

CudaDevice::~CudaDevice() {
  // Work that failed before the device closed is logged.
  MT_CUDA_LOG(cudaStreamSynchronize(stream_.get()));
  backend_.reset();
  allocator_.empty_cache();
}

void* CudaDevice::allocate(std::size_t nbytes) {
  try {
    return allocator_.allocate(nbytes);
  } catch (const std::bad_alloc&) {
  }
  // Out of memory: give the cached blocks back and try once more.
  synchronize();
  allocator_.empty_cache();
  try {
    return allocator_.allocate(nbytes);
  } catch (const std::bad_alloc&) {
    std::size_t free_b = 0, total_b = 0;
    MT_CUDA_LOG(cudaMemGetInfo(&free_b, &total_b));  // the out-of-memory error matters more
    const MemoryStats s = allocator_.stats();
    throw CudaError(fmt::format(
        "out of GPU memory on {} ({}): asked for {}; {} in use by tensors, {} free of {} on the "
        "device",
        name(), log::rank_label(), mib(nbytes), mib(s.in_use_bytes), mib(free_b), mib(total_b)));
  }
}

void CudaDevice::deallocate(void* ptr, std::size_t nbytes) noexcept {
  allocator_.deallocate(ptr, nbytes);
}

void CudaDevice::empty_cache() {
  synchronize();
  allocator_.empty_cache();
}

void CudaDevice::copy_from_host(void* dst, const void* src, std::size_t n) {
  if (n == 0) return;
  DeviceGuard guard(index_);
  if (n <= staging_.size()) {
    std::lock_guard<std::mutex> lock(staging_mu_);
    std::memcpy(staging_.data(), src, n);
    MT_CUDA_CHECK(cudaMemcpyAsync(dst, staging_.data(), n, cudaMemcpyHostToDevice, stream()));
    MT_CUDA_CHECK(cudaStreamSynchronize(stream()));
    return;
  }
  MT_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, stream()));
  MT_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

void CudaDevice::copy_to_host(void* dst, const void* src, std::size_t n) {
  if (n == 0) return;
  DeviceGuard guard(index_);
  if (n <= staging_.size()) {
    std::lock_guard<std::mutex> lock(staging_mu_);
    MT_CUDA_CHECK(cudaMemcpyAsync(staging_.data(), src, n, cudaMemcpyDeviceToHost, stream()));
    MT_CUDA_CHECK(cudaStreamSynchronize(stream()));
    std::memcpy(dst, staging_.data(), n);
    return;
  }
  MT_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, stream()));
  MT_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

void CudaDevice::copy_within(void* dst, const void* src, std::size_t n) {
  if (n == 0 || dst == src) return;
  DeviceGuard guard(index_);
  MT_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, stream()));
}

void CudaDevice::fill_zero(void* dst, std::size_t n) {
  if (n == 0) return;
  DeviceGuard guard(index_);
  MT_CUDA_CHECK(cudaMemsetAsync(dst, 0, n, stream()));
}

void CudaDevice::synchronize() {
  DeviceGuard guard(index_);
  MT_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

cudaStream_t stream_of(Device& device) {
  auto* d = dynamic_cast<CudaDevice*>(&device);
  MT_CHECK(d != nullptr, "{} is not a CUDA device", device.name());
  return d->stream();
}

void* compute_stream(Device& device) {
  return stream_of(device);
}

namespace {
int cuda_index(Device& device) {
  MT_CHECK(device.type() == DeviceType::kCUDA, "{} is not a CUDA device", device.name());
  return device.index();
}
}  // namespace

std::string device_uuid(Device& device) {
  cudaDeviceProp prop{};
  MT_CUDA_CHECK(cudaGetDeviceProperties(&prop, cuda_index(device)));
  std::string hex;
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) hex += '-';
    hex += fmt::format("{:02x}", static_cast<unsigned char>(prop.uuid.bytes[i]));
  }
  return "GPU-" + hex;
}

DeviceMemory device_memory(Device& device) {
  DeviceGuard guard(cuda_index(device));
  std::size_t free_b = 0, total_b = 0;
  MT_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return DeviceMemory{static_cast<std::int64_t>(free_b), static_cast<std::int64_t>(total_b)};
}

std::string device_pci_bus_id(Device& device) {
  char id[32] = {};
  MT_CUDA_CHECK(cudaDeviceGetPCIBusId(id, static_cast<int>(sizeof(id)), cuda_index(device)));
  return id;
}

// ---- opening devices ------------------------------------------------------------------------

std::unique_ptr<Device> open_device(int index) {
  return std::make_unique<CudaDevice>(index);
}

std::unique_ptr<Device> open_local_device(int local_rank) {
  return open_device(device_for_local_rank(local_rank));
}

}  // namespace meshtrain::cuda
