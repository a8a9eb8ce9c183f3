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

// Runs f(begin, end) over [0, n) in a fixed number of chunks (chunk_count with kParallelGrain)
// whose bounds are multiples of `lanes` (but the last, which ends at n), in parallel when there
// is more than one: vector kernels see whole vectors but for the tail.
template <typename F>
void for_lane_chunks(std::int64_t n, F&& f, std::int64_t lanes = 16) {
  const std::int64_t chunks = chunk_count(n, kParallelGrain, 1024);
  const auto begin = [&](std::int64_t c) { return chunk_begin(c, n / lanes, chunks) * lanes; };
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (std::int64_t c = 0; c < chunks; ++c) f(begin(c), c + 1 == chunks ? n : begin(c + 1));
}

}  // namespace meshtrain::cpu
