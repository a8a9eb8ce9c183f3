#include "launch/run_dir.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "launch/default_corpus.hpp"
#include "launch/run_log.hpp"
#include "runtime/error.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain::launch {
namespace {
namespace fs = std::filesystem;
}  // namespace

void agree_or_throw(comm::Communicator* world, std::exception_ptr mine, const char* what) {
  const int n = world != nullptr && world->valid() ? world->size() : 1;
  if (n == 1) {
    if (mine) std::rethrow_exception(mine);
    return;
  }
  Tensor all = Tensor::zeros(Shape{n}, DType::kF32);
  world->all_gather(Tensor::from_floats({mine ? 1.0f : 0.0f}, Shape{1}, DType::kF32), all).wait();
  if (mine) std::rethrow_exception(mine);
  std::string failed;
  for (int r = 0; r < n; ++r)
    if (all.data_as<float>()[r] != 0.0f) failed += (failed.empty() ? "" : ", ") + std::to_string(r);
  MT_CHECK(failed.empty(), "{}: rank(s) {} refused (their errors say why); nothing was written",
           what, failed);
}

MemoryFile builtin_corpus_file() {
  const int raw = ::memfd_create("meshtrain-default-corpus", MFD_CLOEXEC);
  if (raw < 0)
    throw IoError(fmt::format("memfd_create for the built-in corpus failed: {} (errno {})",
                              std::strerror(errno), errno));
  MemoryFile f{Fd(raw), fmt::format("/proc/self/fd/{}", raw)};
  const std::string_view text = default_corpus();
  write_all(f.fd.get(), f.path, text.data(), text.size());
  return f;
}

void prepare_run_dir(const TrainConfig& cfg, bool builtin_corpus) {
  create_run_dir(cfg.run_dir);
  std::error_code ec;
  // The run keeps its tokenizer: generate and export --hf find it there.
  if (!cfg.data_tokenizer.empty()) {
    const std::string kept = (fs::path(cfg.run_dir) / "tokenizer.json").string();
    if (!fs::equivalent(cfg.data_tokenizer, kept, ec))
      write_file_atomic(kept, read_file(cfg.data_tokenizer, std::uint64_t{1} << 30));
  }
  if (!builtin_corpus) return;
  const std::string path = (fs::path(cfg.run_dir) / "default_corpus.txt").string();
  // A resumed run finds it already there: leave the run directory as it is.
  if (fs::is_regular_file(path, ec) && fs::file_size(path, ec) == default_corpus().size() && !ec)
    return;
  write_file_atomic(path, default_corpus());
}

std::vector<std::string> prepare_output_dir(const std::string& dir, bool force,
                                            const std::string& command,
                                            const std::vector<std::string>& outputs) {
  std::error_code ec;
  const fs::file_status st = fs::status(dir, ec);
  if (fs::exists(st)) {
    MT_CHECK(fs::is_directory(st), "{}: '{}' exists and is not a directory", command, dir);
    std::vector<std::string> replaced, kept;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      const std::string name = e.path().filename().string();
      bool ours = false;
      for (const std::string& o : outputs) ours = ours || o == name;
      (ours ? replaced : kept).push_back(name);
    }
    MT_CHECK(!ec, "{}: cannot list '{}': {}", command, dir, ec.message());
    std::sort(replaced.begin(), replaced.end());
    std::sort(kept.begin(), kept.end());
    if (replaced.empty() && kept.empty()) return {};
    auto join = [](const std::vector<std::string>& v) {
      std::string s;
      for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
      return s;
    };
    MT_CHECK(force,
             "{}: '{}' is not empty (it holds {}); writing there would replace {} and leave the "
             "rest beside files that no longer match it. Choose an empty or new directory, or "
             "pass --force to replace them",
             command, dir, join([&] {
               std::vector<std::string> all = replaced;
               all.insert(all.end(), kept.begin(), kept.end());
               return all;
             }()),
             replaced.empty() ? std::string("nothing") : join(replaced));
    std::vector<std::string> said;
    if (!replaced.empty())
      said.push_back(
          fmt::format("{}: --force: replacing {} in '{}'", command, join(replaced), dir));
    if (!kept.empty())
      said.push_back(
          fmt::format("{}: --force: left as they are in '{}': {}", command, dir, join(kept)));
    return said;
  }
  fs::create_directories(dir, ec);
  if (ec)
    throw IoError(fmt::format("{}: cannot create '{}': {} (errno {})", command, dir, ec.message(),
                              ec.value()));
  return {};
}

}  // namespace meshtrain::launch
