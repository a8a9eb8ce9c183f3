#include "runtime/threads.hpp"

#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <thread>

#include "runtime/error.hpp"
#include "runtime/settings.hpp"

namespace meshtrain {

void set_cpu_threads(int n) {
  MT_CHECK(n >= 1, "thread count must be at least 1, got {}", n);
  omp_set_num_threads(n);
}

int cpu_threads() {
  return omp_get_max_threads();
}

int default_cpu_threads(int local_ranks) {
  if (settings().threads > 0) return settings().threads;
  // Cores this process may run on (respects taskset, cgroups' cpusets and mpirun binding).
  // A launcher that bound this rank to fewer cores than the machine has (mpirun --bind-to,
  // Slurm's cpusets) has already divided them: use all of ours. Otherwise share evenly.
  const int machine = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  cpu_set_t set;
  CPU_ZERO(&set);
  const int mine = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : machine;
  if (mine < machine) return std::max(1, mine);
  return std::max(1, machine / std::max(1, local_ranks));
}

}  // namespace meshtrain
