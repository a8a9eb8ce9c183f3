// Helpers for deterministic parallel loops: work is cut into a fixed number of chunks that
// does not depend on the thread count, and per-chunk partial results are combined in chunk
// order, so that reductions give bit-identical results with 1 or 16 threads.
#pragma once

#include <algorithm>
#include <cstdint>

namespace meshtrain::cpu {

// Loops smaller than this run on one thread: an OpenMP fork costs more than the work.
inline constexpr std::int64_t kParallelGrain = 1 << 15;

// Number of chunks for n items: at most max_chunks, each at least min_chunk items.
inline std::int64_t chunk_count(std::int64_t n, std::int64_t min_chunk, std::int64_t max_chunks) {
  return std::clamp<std::int64_t>(n / std::max<std::int64_t>(min_chunk, 1), 1, max_chunks);
}

// [begin, end) of chunk i of n items split into chunks pieces.
inline std::int64_t chunk_begin(std::int64_t i, std::int64_t n, std::int64_t chunks) {
  return n * i / chunks;
}

}  // namespace meshtrain::cpu
