#include "runtime/error.hpp"

#include <cstring>

#include "runtime/log.hpp"

namespace meshtrain::detail {

std::string source_location(const char* file, int line) {
  // __FILE__ is absolute with some generators; keep the part from the layer folder on.
  std::string f = file;
  for (const char* layer :
       {"/runtime/", "/comm/", "/parallel/", "/models/", "/launch/", "/tests/", "/bench/"}) {
    auto pos = f.rfind(layer);
    if (pos != std::string::npos) {
      f = f.substr(pos + 1);
      break;
    }
  }
  return fmt::format("{}:{}", f, line);
}

void fail_check(const char* file, int line, const char* cond, const std::string& msg) {
  // The message is for the user and already says what and where in their input; our source
  // location would only be noise there. It is kept for debug logs.
  (void)cond;
  if (log::logger().should_log(spdlog::level::debug))
    log::debug("check failed at {}: {}", source_location(file, line), msg);
  throw InvalidArgument(msg);
}

void fail_assert(const char* file, int line, const char* cond, const std::string& msg) {
  throw InternalError(
      fmt::format("internal error (a bug in meshtrain): assertion '{}' failed at {}{}{}", cond,
                  source_location(file, line), msg.empty() ? "" : ": ", msg));
}

}  // namespace meshtrain::detail
