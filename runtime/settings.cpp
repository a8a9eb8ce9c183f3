#include "runtime/settings.hpp"

#include <charconv>
#include <cmath>
#include <cstdlib>

#include "runtime/error.hpp"

extern char** environ;

namespace meshtrain {

const std::vector<SettingInfo>& setting_table() {
  static const std::vector<SettingInfo> table = {
      {"MESHTRAIN_THREADS", "int >= 0", "0",
       "CPU threads per rank; 0 divides the cores evenly among the ranks on a node"},
      {"MESHTRAIN_LOG_LEVEL", "trace|debug|info|warn|error|off", "info", "log verbosity"},
      {"MESHTRAIN_COMM_TIMEOUT", "seconds > 0", "600",
       "a collective that has not completed after this long fails on every rank"},
      {"MESHTRAIN_COMM_DEBUG", "0|1", "0",
       "check before each collective that all ranks call the same op, shape and dtype"},
      {"MESHTRAIN_COMM_PROGRESS", "thread|caller", "thread",
       "MPI collectives advance in a background thread while the rank computes (thread), or only "
       "when the caller tests or waits (caller)"},
      {"MESHTRAIN_COMM_POLL_US", "auto|int 10..100000", "auto",
       "while a collective is in flight, the longest the progress thread sleeps between polls, "
       "in us (ten times as often right after one that moved data); auto: 2000 when every rank "
       "is on one node, 400 when the job spans nodes"},
      {"MESHTRAIN_ALLOCATOR_CACHE", "0|1", "1",
       "0 returns every freed block to the system (for memory debuggers)"},
      {"MESHTRAIN_MEMORY_CHECK", "0|1", "1",
       "1 refuses a job whose planned memory per rank exceeds what the machine gives it (the "
       "host's available memory and cgroup limit shared by the node's ranks, or the GPU's free "
       "memory) before anything is allocated; 0 skips the check (overcommit, swap)"},
  };
  return table;
}

namespace {

int parse_int(const std::string& name, const std::string& v, int lo) {
  int out = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  MT_CHECK(ec == std::errc() && p == v.data() + v.size() && out >= lo,
           "environment variable {}='{}' is not an integer >= {}", name, v, lo);
  return out;
}

double parse_positive(const std::string& name, const std::string& v) {
  char* end = nullptr;
  const double d = std::strtod(v.c_str(), &end);
  MT_CHECK(!v.empty() && end == v.c_str() + v.size() && std::isfinite(d) && d > 0,
           "environment variable {}='{}' is not a positive number of seconds", name, v);
  return d;
}

bool parse_bool(const std::string& name, const std::string& v) {
  if (v == "1" || v == "true" || v == "on" || v == "yes") return true;
  if (v == "0" || v == "false" || v == "off" || v == "no") return false;
  MT_FAIL("environment variable {}='{}' is not a boolean: expected 0 or 1", name, v);
}

}  // namespace

Settings Settings::parse(const std::map<std::string, std::string>& env) {
  Settings s;
  for (const auto& [name, value] : env) {
    if (name == "MESHTRAIN_THREADS") {
      s.threads = parse_int(name, value, 0);
    } else if (name == "MESHTRAIN_LOG_LEVEL") {
      static const char* kLevels[] = {"trace", "debug", "info", "warn", "error", "off"};
      bool ok = false;
      for (const char* l : kLevels) ok = ok || value == l;
      MT_CHECK(ok, "environment variable {}='{}': expected trace, debug, info, warn, error or off",
               name, value);
      s.log_level = value;
    } else if (name == "MESHTRAIN_COMM_TIMEOUT") {
      s.comm_timeout_s = parse_positive(name, value);
    } else if (name == "MESHTRAIN_COMM_DEBUG") {
      s.comm_debug = parse_bool(name, value);
    } else if (name == "MESHTRAIN_COMM_PROGRESS") {
      MT_CHECK(value == "thread" || value == "caller",
               "environment variable {}='{}': expected thread or caller", name, value);
      s.comm_progress = value;
    } else if (name == "MESHTRAIN_COMM_POLL_US") {
      s.comm_poll_us = value == "auto" ? 0 : parse_int(name, value, 10);
      MT_CHECK(s.comm_poll_us <= 100000,
               "environment variable {}='{}' is above 100000 (0.1 s between polls would stall "
               "every collective)",
               name, value);
    } else if (name == "MESHTRAIN_ALLOCATOR_CACHE") {
      s.allocator_cache = parse_bool(name, value);
    } else if (name == "MESHTRAIN_MEMORY_CHECK") {
      s.memory_check = parse_bool(name, value);
    } else if (name.rfind("MESHTRAIN_", 0) == 0) {
      s.unknown.push_back(name);
    }
  }
  return s;
}

std::map<std::string, std::string> Settings::from_environment() {
  std::map<std::string, std::string> env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string kv = *e;
    if (kv.rfind("MESHTRAIN_", 0) != 0) continue;
    const auto eq = kv.find('=');
    if (eq == std::string::npos) continue;
    env[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  return env;
}

const Settings& settings() {
  static const Settings s = Settings::parse(Settings::from_environment());
  return s;
}

}  // namespace meshtrain
