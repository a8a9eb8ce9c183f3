// Durable file I/O: every file meshtrain writes (tensors, checkpoints, token shards, configs,
// metrics) goes through here, so that one set of guarantees holds for all of them.
//
// Errors: a failing system call throws IoError at the first failure, naming the call, the path
// and the operating system's reason with its errno ("write of 'ckpt/x.tmp' failed: No space
// left on device (errno 28)"). Only EINTR is retried. Content that is not what the caller
// expects (not a regular file, too large) throws InvalidArgument.
//
// Atomic replacement: the data goes to `path.tmp` beside `path`, which is fsynced, renamed over
// `path`, and the directory is fsynced, so that after a crash `path` holds the old bytes or the
// new ones, never a mix, and a completed write survives power loss. On failure the temporary is
// removed and `path` is left as it was. Two writers to one path at once are not supported (they
// share `path.tmp`); a `path.tmp` left by a crash is overwritten by the next write.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace meshtrain {

// An owned file descriptor. Move-only; the destructor closes it and logs a failure (never
// throws). close() closes now and reports the result, which is where a delayed write error
// (NFS, a full disk) can surface.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) noexcept : fd_(fd) {}
  ~Fd();
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;

  int get() const noexcept { return fd_; }
  bool valid() const noexcept { return fd_ >= 0; }
  // Gives up ownership: the caller closes the descriptor.
  int release() noexcept;
  // Closes now; throws IoError naming `path` if close(2) fails. No-op when not valid.
  void close(const std::string& path);

 private:
  int fd_ = -1;
};

// open(2) with O_CLOEXEC added. Throws IoError naming `path`.
Fd open_file(const std::string& path, int flags, unsigned mode = 0644);

// Writes all n bytes to fd, continuing after short writes. Throws IoError naming `path`.
void write_all(int fd, const std::string& path, const void* data, std::size_t n);

// Reads up to n bytes at `offset` into data, continuing after short reads; returns fewer than
// n only at the end of the file. Throws IoError naming `path`.
std::size_t read_at(int fd, const std::string& path, void* data, std::size_t n,
                    std::uint64_t offset);

// fsync(2) of fd. Throws IoError naming `path`.
void fsync_fd(int fd, const std::string& path);
// Flushes a directory's entries (a file created, renamed or removed in it) to disk.
void fsync_dir(const std::string& dir);

// Opens `path` for reading only if it is a regular file: a directory, a FIFO (which open(2)
// would block on until a writer came), a device (/dev/zero) or a socket is refused with
// InvalidArgument saying which it is, e.g. "config file 'x': a directory, not a regular file".
// `what` names the file's role in messages ("config file", "data file"; empty: "file"). Throws
// IoError (with the errno text) when it cannot be opened. Never blocks.
Fd open_regular_file(const std::string& path, const char* what = "");
// What kind of file `mode` (struct stat's st_mode) is: "a regular file", "a directory",
// "a FIFO", "a character device", ...
const char* file_kind(unsigned mode);

// A whole regular file of at most max_bytes (open_regular_file's checks). Throws IoError if it
// cannot be read, InvalidArgument if it is not a regular file or is larger than max_bytes.
std::string read_file(const std::string& path, std::uint64_t max_bytes, const char* what = "");

// Writes `data` to `path` atomically and durably (see the top of this file). Throws IoError
// naming the path and the errno text (ENOSPC, EROFS, EACCES, ...). Leaves no temporary behind
// on failure.
void write_file_atomic(const std::string& path, std::string_view data);

// Writes `data` to `path` in place (created or truncated) and fsyncs it: no temporary, no
// rename, no directory fsync. For files inside a directory that is itself published atomically
// (a checkpoint is written into a temporary directory that is renamed when complete).
void write_file_durable(const std::string& path, std::string_view data);

// The streaming form of write_file_atomic, for files too large to hold in memory: every write
// goes to `path.tmp` and is checked; commit() fsyncs it, renames it over `path` and fsyncs the
// directory. Destroyed without a successful commit() (an exception on the way), it removes the
// temporary and leaves `path` as it was. Not thread-safe.
class AtomicFileWriter {
 public:
  // Creates (or truncates) `path.tmp`. Throws IoError.
  explicit AtomicFileWriter(std::string path);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  void write(const void* data, std::size_t n);
  void write(std::string_view s) { write(s.data(), s.size()); }
  // Publishes the file. Throws IoError (and then the temporary is removed on destruction).
  void commit();

  const std::string& path() const { return path_; }
  std::uint64_t bytes_written() const { return written_; }

 private:
  std::string path_, tmp_;
  Fd fd_;
  std::uint64_t written_ = 0;
  bool committed_ = false;
};

}  // namespace meshtrain
