#include "runtime/allocator.hpp"

#include <bit>

#include "runtime/log.hpp"

namespace meshtrain {

CachingAllocator::CachingAllocator(RawAlloc raw_alloc, RawFree raw_free, bool caching)
    : raw_alloc_(std::move(raw_alloc)), raw_free_(std::move(raw_free)), caching_(caching) {}

CachingAllocator::~CachingAllocator() {
  empty_cache();
  if (stats_.in_use_bytes != 0)
    log::warn("allocator destroyed with {} bytes still in use", stats_.in_use_bytes);
}

std::size_t CachingAllocator::round_size(std::size_t nbytes) {
  if (nbytes == 0) nbytes = 1;
  if (nbytes <= 4096) return (nbytes + 63) & ~std::size_t{63};
  const std::size_t pow2 = std::bit_floor(nbytes);
  const std::size_t step = pow2 / 8;
  return (nbytes + step - 1) / step * step;
}

void* CachingAllocator::allocate(std::size_t nbytes) {
  const std::size_t size = round_size(nbytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(size);
    if (it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      stats_.cached_bytes -= size;
      stats_.in_use_bytes += size;
      if (stats_.in_use_bytes > stats_.peak_in_use_bytes)
        stats_.peak_in_use_bytes = stats_.in_use_bytes;
      return p;
    }
  }
  void* p = raw_alloc_(size);
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.system_allocations;
  stats_.in_use_bytes += size;
  if (stats_.in_use_bytes > stats_.peak_in_use_bytes)
    stats_.peak_in_use_bytes = stats_.in_use_bytes;
  return p;
}

void CachingAllocator::deallocate(void* ptr, std::size_t nbytes) noexcept {
  if (ptr == nullptr) return;
  const std::size_t size = round_size(nbytes);
  std::lock_guard<std::mutex> lock(mu_);
  stats_.in_use_bytes -= size;
  if (!caching_) {
    raw_free_(ptr);
    return;
  }
  try {
    free_[size].push_back(ptr);
    stats_.cached_bytes += size;
  } catch (...) {
    raw_free_(ptr);  // out of memory for the free list itself: give the block back
  }
}

MemoryStats CachingAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void CachingAllocator::reset_peak() {
  std::lock_guard<std::mutex> lock(mu_);
  stats_.peak_in_use_bytes = stats_.in_use_bytes;
}

void CachingAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [size, blocks] : free_)
    for (void* p : blocks) raw_free_(p);
  free_.clear();
  stats_.cached_bytes = 0;
}

}  // namespace meshtrain
