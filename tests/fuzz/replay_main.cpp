// The fuzz targets without libFuzzer (the normal build): runs a target on files, so that ctest
// replays every corpus file, and writes the seed files with meshtrain's own writers.
//
//   fuzz_replay_NAME [--seeds-valid] PATH...   files, or directories of files; a finding aborts.
//                                              --seeds-valid: files named seed-* must be accepted
//   fuzz_replay_NAME --make-seeds DIR          writes the seed-* files into DIR
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "tests/fuzz/fuzz.hpp"

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv);
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace fs = std::filesystem;
using namespace meshtrain;

int main(int argc, char** argv) {
  LLVMFuzzerInitialize(&argc, &argv);
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() == 2 && args[0] == "--make-seeds") {
    fs::create_directories(args[1]);
    fuzz::write_seeds(args[1]);
    return 0;
  }
  bool seeds_valid = false;
  std::vector<fs::path> files;
  for (const std::string& a : args) {
    if (a == "--seeds-valid") {
      seeds_valid = true;
    } else if (fs::is_directory(a)) {
      for (const auto& e : fs::directory_iterator(a))
        if (e.is_regular_file()) files.push_back(e.path());
    } else if (fs::is_regular_file(a)) {
      files.emplace_back(a);
    } else {
      std::fprintf(stderr, "%s: no such file or directory: %s\n", argv[0], a.c_str());
      return 2;
    }
  }
  if (files.empty()) {
    std::fprintf(stderr, "usage: %s [--seeds-valid] PATH... | --make-seeds DIR\n", argv[0]);
    return 2;
  }
  std::sort(files.begin(), files.end());
  int refused_seeds = 0;
  for (const fs::path& f : files) {
    const std::string bytes = fuzz::read_file(f.string());
    std::printf("%s\n", f.string().c_str());
    std::fflush(stdout);
    fuzz::g_accepted = false;
    LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
    if (seeds_valid && f.filename().string().rfind("seed-", 0) == 0 && !fuzz::g_accepted) {
      std::fprintf(stderr, "seed file %s was refused (a valid seed must load)\n", f.c_str());
      ++refused_seeds;
    }
  }
  std::printf("%zu inputs replayed, no findings\n", files.size());
  return refused_seeds == 0 ? 0 : 1;
}
