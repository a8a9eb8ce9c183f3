// Helpers shared by the C++ benchmarks: a millisecond clock, medians, and the common
// [--reps N] [--threads N] command line.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace meshtrain::bench {

inline double now_ms() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double, std::milli>(clock::now().time_since_epoch()).count();
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  if (n == 0) return 0.0;
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Parses [--reps N] [--threads N] into reps and threads (left at their defaults when absent).
// Returns false, after printing usage, on anything else or on a value below 1.
inline bool parse_reps_threads(int argc, char** argv, int& reps, int& threads) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
      reps = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--reps N] [--threads N]\n", argv[0]);
      return false;
    }
  }
  if (reps < 1 || threads < 1) {
    std::fprintf(stderr, "--reps and --threads must be at least 1\n");
    return false;
  }
  return true;
}

}  // namespace meshtrain::bench
