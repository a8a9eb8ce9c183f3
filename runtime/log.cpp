#include "runtime/log.hpp"

#include <atomic>
#include <mutex>

#include <spdlog/sinks/stdout_color_sinks.h>

#include "runtime/error.hpp"

namespace meshtrain::log {
namespace {
std::atomic<int> g_rank{-1};
std::atomic<int> g_world{0};

std::string pattern_for(const std::string& label) {
  return "[%H:%M:%S.%e] [" + label + "] [%^%l%$] %v";
}
}  // namespace

spdlog::logger& logger() {
  // Logs go to stderr so that stdout stays clean for a command's own output.
  static std::shared_ptr<spdlog::logger> instance = [] {
    auto l = spdlog::stderr_color_mt("meshtrain");
    l->set_pattern(pattern_for(rank_label()));
    l->set_level(spdlog::level::info);
    return l;
  }();
  return *instance;
}

void set_rank(int rank, int world_size) {
  g_rank = rank;
  g_world = world_size;
  logger().set_pattern(pattern_for(rank_label()));
}

int rank() {
  return g_rank.load();
}

std::string rank_label() {
  const int r = g_rank.load();
  if (r < 0) return "rank -";
  return "rank " + std::to_string(r) + "/" + std::to_string(g_world.load());
}

void set_level(const std::string& level) {
  static const char* kLevels[] = {"trace", "debug", "info", "warn", "error", "off"};
  for (const char* l : kLevels) {
    if (level == l) {
      logger().set_level(spdlog::level::from_str(level));
      return;
    }
  }
  MT_FAIL("unknown log level '{}': expected trace, debug, info, warn, error or off", level);
}

}  // namespace meshtrain::log
