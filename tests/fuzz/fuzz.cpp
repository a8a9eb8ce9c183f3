#include "tests/fuzz/fuzz.hpp"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "runtime/log.hpp"

namespace meshtrain::fuzz {

bool g_accepted = false;

namespace {
std::string g_scratch;

void remove_scratch() {
  std::error_code ec;
  if (!g_scratch.empty()) std::filesystem::remove_all(g_scratch, ec);
}
}  // namespace

void init() {
  static bool done = false;
  if (done) return;
  done = true;
  ::setenv("MESHTRAIN_ALLOCATOR_CACHE", "0", 1);
  log::set_level("error");
  scratch_dir();
}

void finding(const std::string& what) {
  std::fprintf(stderr, "\n==meshtrain fuzz finding== %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

const std::string& scratch_dir() {
  if (g_scratch.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/meshtrain-fuzz-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) {
      std::perror("mkdtemp");
      std::abort();
    }
    g_scratch = pattern;
    std::atexit(remove_scratch);
  }
  return g_scratch;
}

void write_file(const std::string& path, const void* data, std::size_t size) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
  f.close();
  if (!f) {
    std::fprintf(stderr, "fuzz harness: cannot write '%s'\n", path.c_str());
    std::abort();
  }
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

}  // namespace meshtrain::fuzz
