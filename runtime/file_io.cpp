#include "runtime/file_io.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <utility>

#include "runtime/error.hpp"
#include "runtime/log.hpp"

namespace meshtrain {
namespace {

std::string errno_text(int err) {
  return fmt::format("{} (errno {})", std::strerror(err), err);
}

// "CALL of 'PATH' failed: REASON (errno N)". Reads errno first: the caller may not touch it
// between the failing call and this one.
[[noreturn]] void fail_errno(const char* call, const std::string& path) {
  const int err = errno;
  throw IoError(fmt::format("{} of '{}' failed: {}", call, path, errno_text(err)));
}

std::string directory_of(const std::string& path) {
  const std::string dir = std::filesystem::path(path).parent_path().string();
  return dir.empty() ? "." : dir;
}

}  // namespace

// ---- Fd -------------------------------------------------------------------------------------

Fd::~Fd() {
  if (fd_ >= 0 && ::close(fd_) != 0)
    log::warn("close of file descriptor {} failed: {}", fd_, errno_text(errno));
}

Fd& Fd::operator=(Fd&& o) noexcept {
  if (this != &o) {
    Fd old(std::exchange(fd_, o.release()));
    (void)old;  // closed (and a failure logged) here
  }
  return *this;
}

int Fd::release() noexcept {
  return std::exchange(fd_, -1);
}

void Fd::close(const std::string& path) {
  if (fd_ < 0) return;
  // Linux releases the descriptor even when close fails: never close it twice.
  if (::close(std::exchange(fd_, -1)) != 0) fail_errno("close", path);
}

// ---- system calls, checked ------------------------------------------------------------------

Fd open_file(const std::string& path, int flags, unsigned mode) {
  const int fd = ::open(path.c_str(), flags | O_CLOEXEC, static_cast<mode_t>(mode));
  if (fd < 0) fail_errno("open", path);
  return Fd(fd);
}

void write_all(int fd, const std::string& path, const void* data, std::size_t n) {
  const auto* p = static_cast<const std::uint8_t*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      fail_errno("write", path);
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

std::size_t read_at(int fd, const std::string& path, void* data, std::size_t n,
                    std::uint64_t offset) {
  auto* p = static_cast<std::uint8_t*>(data);
  std::size_t done = 0;
  while (done < n) {
    const ssize_t r = ::pread(fd, p + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      fail_errno("read", path);
    }
    if (r == 0) break;
    done += static_cast<std::size_t>(r);
  }
  return done;
}

void fsync_fd(int fd, const std::string& path) {
  if (::fsync(fd) != 0) fail_errno("fsync", path);
}

void fsync_dir(const std::string& dir) {
  Fd fd = open_file(dir, O_RDONLY | O_DIRECTORY);
  fsync_fd(fd.get(), dir);
  fd.close(dir);
}

// ---- whole files ----------------------------------------------------------------------------

const char* file_kind(unsigned mode) {
  if (S_ISREG(mode)) return "a regular file";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

Fd open_regular_file(const std::string& path, const char* what) {
  const std::string role = what != nullptr && *what != '\0' ? what : "file";
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever.
  const int raw = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (raw < 0) {
    const int err = errno;
    throw IoError(fmt::format("cannot open {} '{}': {}", role, path, errno_text(err)));
  }
  Fd fd(raw);
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) fail_errno("fstat", path);
  MT_CHECK(S_ISREG(st.st_mode), "{} '{}' is {}, not a regular file", role, path,
           file_kind(st.st_mode));
  // Back to blocking reads (a regular file never blocks, but reads should not see EAGAIN).
  const int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK) != 0) fail_errno("fcntl", path);
  return fd;
}

std::string read_file(const std::string& path, std::uint64_t max_bytes, const char* what) {
  Fd fd = open_regular_file(path, what);
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) fail_errno("fstat", path);
  const auto size = static_cast<std::uint64_t>(st.st_size);
  MT_CHECK(size <= max_bytes, "{} '{}' is {} bytes, more than the {} a file of its kind may have",
           what != nullptr && *what != '\0' ? what : "file", path, size, max_bytes);
  std::string out(size, '\0');
  const std::size_t got = read_at(fd.get(), path, out.data(), out.size(), 0);
  MT_CHECK(got == size, "'{}' shrank while being read ({} of {} bytes)", path, got, size);
  return out;
}

void write_file_durable(const std::string& path, std::string_view data) {
  Fd fd = open_file(path, O_WRONLY | O_CREAT | O_TRUNC);
  write_all(fd.get(), path, data.data(), data.size());
  fsync_fd(fd.get(), path);
  fd.close(path);
}

void write_file_atomic(const std::string& path, std::string_view data) {
  AtomicFileWriter out(path);
  out.write(data);
  out.commit();
}

// ---- AtomicFileWriter -----------------------------------------------------------------------

AtomicFileWriter::AtomicFileWriter(std::string path)
    : path_(std::move(path)),
      tmp_(path_ + ".tmp"),
      fd_(open_file(tmp_, O_WRONLY | O_CREAT | O_TRUNC)) {}

AtomicFileWriter::~AtomicFileWriter() {
  if (committed_) return;
  fd_ = Fd();  // closed before it is removed
  if (::unlink(tmp_.c_str()) != 0 && errno != ENOENT)
    log::warn("could not remove the partial file '{}': {}", tmp_, errno_text(errno));
}

void AtomicFileWriter::write(const void* data, std::size_t n) {
  MT_ASSERT(!committed_ && fd_.valid(), "write to '{}' after commit", path_);
  write_all(fd_.get(), tmp_, data, n);
  written_ += n;
}

void AtomicFileWriter::commit() {
  MT_ASSERT(!committed_ && fd_.valid(), "'{}' committed twice", path_);
  fsync_fd(fd_.get(), tmp_);
  fd_.close(tmp_);
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    throw IoError(fmt::format("rename of '{}' to '{}' failed: {}", tmp_, path_, errno_text(err)));
  }
  committed_ = true;
  // The rename is done: a failure here leaves the new file in place, not yet durable.
  fsync_dir(directory_of(path_));
}

}  // namespace meshtrain
