// What the fuzz targets share: what counts as a finding, scratch files, and seed writing.
//
// Every target feeds its input to a reader's real entry point. A meshtrain::Error other than
// InternalError, whose message names the file (or other place) the input came from, is the
// expected outcome for bad input. Everything else is a finding and aborts, so that libFuzzer
// (or the replay driver) reports it: a sanitizer report, another exception, an InternalError
// (an MT_ASSERT: a bug of ours), an error that does not say where, or a broken invariant of
// what a reader accepted (FUZZ_EXPECT).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <string_view>

#include "runtime/error.hpp"

namespace meshtrain::fuzz {

// Once per process, before the first input: no caching allocator (ASan sees every block), quiet
// logging.
void init();

[[noreturn]] void finding(const std::string& what);

#define FUZZ_EXPECT(cond, ...)                                                               \
  do {                                                                                       \
    if (!(cond))                                                                             \
      ::meshtrain::fuzz::finding(fmt::format("invariant '{}' broken at {}:{}: {}", #cond,    \
                                             __FILE__, __LINE__, fmt::format(__VA_ARGS__))); \
  } while (0)

// Runs f(). Returns true when it returned, false when it threw a meshtrain::Error that is not
// an InternalError and whose message contains `where`; anything else is a finding.
template <typename F>
bool accepts(std::string_view where, F&& f) {
  try {
    f();
    return true;
  } catch (const InternalError& e) {
    finding(std::string("internal error: ") + e.what());
  } catch (const Error& e) {
    const std::string_view msg = e.what();
    if (!where.empty() && msg.find(where) == std::string_view::npos)
      finding(fmt::format("error message does not say where ('{}'): {}", where, msg));
    return false;
  } catch (const std::exception& e) {
    finding(fmt::format("uncaught exception (not meshtrain::Error): {}", e.what()));
  }
}

// A scratch directory of this process (under $TMPDIR), removed at exit.
const std::string& scratch_dir();
// Writes bytes to path (replacing it); aborts on failure (the harness's own problem).
void write_file(const std::string& path, const void* data, std::size_t size);
std::string read_file(const std::string& path);

// Whether the last input was accepted by the reader (the replay driver checks that seed files
// are). Each target sets it.
extern bool g_accepted;

// Writes this target's seed inputs into dir, made with meshtrain's own writers (defined by each
// target; the replay driver's --make-seeds calls it).
void write_seeds(const std::string& dir);

}  // namespace meshtrain::fuzz
