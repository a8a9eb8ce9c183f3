// What a job writes, and when: nothing until everything it could refuse has been checked on
// every rank (the config, the data and its vocabulary, model.init, the memory plan, the
// checkpoint resumed from), then the run directory. And the output directories of `meshtrain
// import` and `export`, which must not silently replace another run's files.
#pragma once

#include <exception>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "launch/config.hpp"
#include "runtime/file_io.hpp"

namespace meshtrain::launch {

// Collective over `world` (null or one rank: this process alone): every rank says whether it
// failed (`mine` holds its exception, or is null). Throws on every rank if any failed: the
// rank's own exception where it has one, else InvalidArgument naming the ranks that refused
// ("rank(s) 1, 3 refused to start; their errors say why") and `what` (the step). Returns on
// every rank only when all succeeded, so that no rank goes on to write while another refuses.
void agree_or_throw(comm::Communicator* world, std::exception_ptr mine, const char* what);

// The built-in corpus as a file only this process sees: an anonymous memory file (memfd), read
// through `path` (/proc/self/fd/N) while `fd` is open. Nothing is written to disk.
struct MemoryFile {
  Fd fd;
  std::string path;
};
MemoryFile builtin_corpus_file();

// Creates the run directory, copies data.tokenizer into it as tokenizer.json and, for a run on
// the built-in corpus, writes RUN_DIR/default_corpus.txt (durably; kept when it is already there
// with the same size, as on a resume). Throws IoError naming the path and the errno text (EROFS,
// EACCES, ENOSPC).
void prepare_run_dir(const TrainConfig& cfg, bool builtin_corpus);

// The output directory of `meshtrain import` / `export` (`command`): created if missing;
// refused when it exists and is not empty, unless `force`, which then returns the lines saying
// what is replaced (the files of `outputs` that exist) and what stays (the other entries, such
// as a run's checkpoints and metrics). Refused always when it is not a directory. Throws
// InvalidArgument (or IoError) naming the directory.
std::vector<std::string> prepare_output_dir(const std::string& dir, bool force,
                                            const std::string& command,
                                            const std::vector<std::string>& outputs);

}  // namespace meshtrain::launch
