// A caching allocator over any raw allocator: freed blocks go to a free list keyed by their
// rounded size and are handed out again, so a training loop that allocates the same sizes
// every step makes no system allocation after its first step. Thread-safe.
#pragma once

#include <cstddef>
#include <functional>
#include <map>
#include <mutex>
#include <vector>

#include "runtime/device.hpp"

namespace meshtrain {

class CachingAllocator {
 public:
  using RawAlloc = std::function<void*(std::size_t)>;  // throws on failure
  using RawFree = std::function<void(void*)>;

  // caching=false passes every call through (for sanitizer runs that want to see each block).
  CachingAllocator(RawAlloc raw_alloc, RawFree raw_free, bool caching);
  ~CachingAllocator();
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  void* allocate(std::size_t nbytes);
  void deallocate(void* ptr, std::size_t nbytes) noexcept;
  MemoryStats stats() const;
  void reset_peak();
  void empty_cache();

  // The block size a request is served from: 64-byte multiples up to 4 KiB, then steps of
  // 1/8 of the power of two below (so at most 12.5% of a block is slack).
  static std::size_t round_size(std::size_t nbytes);

 private:
  RawAlloc raw_alloc_;
  RawFree raw_free_;
  bool caching_;
  mutable std::mutex mu_;
  std::map<std::size_t, std::vector<void*>> free_;
  MemoryStats stats_;
};

}  // namespace meshtrain
