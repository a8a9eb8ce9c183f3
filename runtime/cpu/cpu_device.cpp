#include <cstdlib>
#include <cstring>
#include <new>

#include "runtime/allocator.hpp"
#include "runtime/cpu/cpu_backend.hpp"
#include "runtime/settings.hpp"

namespace meshtrain {
namespace {

void* aligned_host_alloc(std::size_t nbytes) {
  // 64-byte alignment for AVX-512 loads; page alignment for large blocks.
  const std::size_t align = nbytes >= (1u << 20) ? 4096 : 64;
  void* p = std::aligned_alloc(align, (nbytes + align - 1) / align * align);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

class CpuDevice final : public Device {
 public:
  CpuDevice()
      : allocator_(
            aligned_host_alloc, [](void* p) { std::free(p); }, settings().allocator_cache) {}

  DeviceType type() const override { return DeviceType::kCPU; }
  int index() const override { return 0; }
  std::string name() const override { return "cpu"; }

  void* allocate(std::size_t nbytes) override { return allocator_.allocate(nbytes); }
  void deallocate(void* ptr, std::size_t nbytes) noexcept override {
    allocator_.deallocate(ptr, nbytes);
  }
  MemoryStats memory_stats() const override { return allocator_.stats(); }
  void reset_peak_memory() override { allocator_.reset_peak(); }
  void empty_cache() override { allocator_.empty_cache(); }

  void copy_from_host(void* dst, const void* src, std::size_t n) override { copy(dst, src, n); }
  void copy_to_host(void* dst, const void* src, std::size_t n) override { copy(dst, src, n); }
  void copy_within(void* dst, const void* src, std::size_t n) override { copy(dst, src, n); }
  void fill_zero(void* dst, std::size_t n) override {
    if (n) std::memset(dst, 0, n);
  }
  void synchronize() override {}
  Backend& backend() override { return backend_; }

 private:
  static void copy(void* dst, const void* src, std::size_t n) {
    if (n && dst != src) std::memmove(dst, src, n);
  }

  CachingAllocator allocator_;
  cpu::CpuBackend backend_;
};

}  // namespace

Device& cpu_device() {
  // Owns host memory only. Never destroyed, so that a tensor released during static
  // destruction (in any order) still has an allocator to return its block to.
  static CpuDevice* device = new CpuDevice;
  return *device;
}

}  // namespace meshtrain
