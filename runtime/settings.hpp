// The one typed table of MESHTRAIN_* environment settings. Nothing else in meshtrain reads
// the environment (where a process sits on its node, which launchers put in variables such as
// OMPI_COMM_WORLD_LOCAL_RANK, comes from the MPI session). A malformed value throws InvalidArgument
// naming the variable, its value and what is expected; an unknown MESHTRAIN_* variable is reported
// as a likely typo.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace meshtrain {

struct Settings {
  int threads = 0;  // MESHTRAIN_THREADS: CPU threads per rank; 0 = cores / local ranks
  std::string log_level = "info";  // MESHTRAIN_LOG_LEVEL
  double comm_timeout_s = 600.0;   // MESHTRAIN_COMM_TIMEOUT: seconds before a collective fails
  bool comm_debug = false;         // MESHTRAIN_COMM_DEBUG: check every collective's signature
  // MESHTRAIN_COMM_PROGRESS: "thread" (a background thread advances MPI collectives while the
  // caller computes) or "caller" (only test() and wait() advance them).
  std::string comm_progress = "thread";
  // MESHTRAIN_COMM_POLL_US: the progress thread's longest sleep between polls while a collective
  // is in flight; it starts at a tenth of it after a poll that moved data. 0 (auto): chosen by
  // comm/ from where the ranks are (comm/mpi/progress.hpp).
  int comm_poll_us = 0;
  bool allocator_cache = true;  // MESHTRAIN_ALLOCATOR_CACHE: 0 passes allocations through
  // MESHTRAIN_MEMORY_CHECK: refuse a job whose planned memory exceeds the machine's
  // (launch/memory_check.hpp); 0 skips the check.
  bool memory_check = true;
  std::vector<std::string> unknown;  // MESHTRAIN_* names that are not in the table

  // Parses from a name -> value map (the environment, or a test's).
  static Settings parse(const std::map<std::string, std::string>& env);
  // Every MESHTRAIN_* variable of this process's environment.
  static std::map<std::string, std::string> from_environment();
};

struct SettingInfo {
  const char* name;
  const char* type;
  const char* default_value;
  const char* help;
};
// The table, for `meshtrain env` and the docs.
const std::vector<SettingInfo>& setting_table();

// The process's settings, parsed on first use. Throws on a malformed value.
const Settings& settings();

}  // namespace meshtrain
