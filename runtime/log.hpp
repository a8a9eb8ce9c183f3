// Logging through spdlog, with the rank in every line: "[12:00:01.123] [rank 1/4] [info] ...".
// Thread-safe. The rank label is "-" until the communication bootstrap sets it.
#pragma once

#include <string>
#include <utility>

#include <spdlog/spdlog.h>

namespace meshtrain::log {

// Sets the rank shown in every line and in error messages from vendor checks.
void set_rank(int rank, int world_size);
// -1 until set_rank is called.
int rank();
// "rank 1/4", or "rank -" before set_rank.
std::string rank_label();
// trace, debug, info, warn, error, off. Throws InvalidArgument for anything else.
void set_level(const std::string& level);

spdlog::logger& logger();

template <typename... Args>
void debug(spdlog::format_string_t<Args...> fmt, Args&&... args) {
  logger().debug(fmt, std::forward<Args>(args)...);
}
template <typename... Args>
void info(spdlog::format_string_t<Args...> fmt, Args&&... args) {
  logger().info(fmt, std::forward<Args>(args)...);
}
template <typename... Args>
void warn(spdlog::format_string_t<Args...> fmt, Args&&... args) {
  logger().warn(fmt, std::forward<Args>(args)...);
}
template <typename... Args>
void error(spdlog::format_string_t<Args...> fmt, Args&&... args) {
  logger().error(fmt, std::forward<Args>(args)...);
}

}  // namespace meshtrain::log
