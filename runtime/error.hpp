// The error hierarchy and the check macros.
//
// Host code throws; library code never exits. MT_CHECK is for what the caller got wrong (bad
// shapes, bad input files, bad settings): its message must say what, where and what was
// expected. MT_ASSERT is for meshtrain's own invariants: when it fires, it is a bug in meshtrain.
#pragma once

#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace meshtrain {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// The caller passed something wrong: arguments, a file, a config key, an environment variable.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// A file or directory could not be read or written (the operating system said no).
class IoError : public Error {
 public:
  using Error::Error;
};

// An invariant of meshtrain itself was broken.
class InternalError : public Error {
 public:
  using Error::Error;
};

class CudaError : public Error {
 public:
  using Error::Error;
};

class NcclError : public Error {
 public:
  using Error::Error;
};

class MpiError : public Error {
 public:
  using Error::Error;
};

// A collective did not complete within the communication timeout.
class CommTimeout : public Error {
 public:
  using Error::Error;
};

namespace detail {
[[noreturn]] void fail_check(const char* file, int line, const char* cond, const std::string& msg);
[[noreturn]] void fail_assert(const char* file, int line, const char* cond, const std::string& msg);
// "file:line" with the path trimmed to the repository-relative part.
std::string source_location(const char* file, int line);
}  // namespace detail

}  // namespace meshtrain

#define MT_CHECK(cond, ...)                                                                   \
  do {                                                                                        \
    if (!(cond)) [[unlikely]]                                                                 \
      ::meshtrain::detail::fail_check(__FILE__, __LINE__, #cond, ::fmt::format(__VA_ARGS__)); \
  } while (0)

#define MT_ASSERT(cond, ...)                                                                      \
  do {                                                                                            \
    if (!(cond)) [[unlikely]]                                                                     \
      ::meshtrain::detail::fail_assert(__FILE__, __LINE__, #cond, ::fmt::format("" __VA_ARGS__)); \
  } while (0)

// Throws InvalidArgument unconditionally; for the places where the condition is a switch.
#define MT_FAIL(...) \
  ::meshtrain::detail::fail_check(__FILE__, __LINE__, nullptr, ::fmt::format(__VA_ARGS__))
