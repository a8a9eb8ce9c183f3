// runtime/file_io: atomic replacement, and errors that name the path and the errno text at the
// first failure. Full and read-only filesystems are small tmpfs mounts made by the test when it
// may mount (root); without that privilege those tests report skipped.
#include "runtime/file_io.hpp"

#include <fcntl.h>
#include <sys/mount.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

#include <gtest/gtest.h>

#include "runtime/error.hpp"

namespace meshtrain {
namespace {

namespace fs = std::filesystem;

class FileIo : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("mt_file_io_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    if (mounted_) ::umount2(mount_.c_str(), MNT_DETACH);
    fs::remove_all(dir_);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // A tmpfs of `size` at dir_/mnt; false (with the reason in why_) where this process may not
  // mount.
  bool mount_tmpfs(const char* size) {
    mount_ = path("mnt");
    fs::create_directories(mount_);
    const std::string opts = std::string("size=") + size;
    if (::mount("tmpfs", mount_.c_str(), "tmpfs", 0, opts.c_str()) != 0) {
      why_ = std::string("cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): ") +
             std::strerror(errno);
      return false;
    }
    mounted_ = true;
    return true;
  }
  bool remount_read_only() {
    if (::mount(nullptr, mount_.c_str(), nullptr, MS_REMOUNT | MS_RDONLY, nullptr) != 0) {
      why_ = std::string("cannot remount the tmpfs read-only: ") + std::strerror(errno);
      return false;
    }
    return true;
  }

  fs::path dir_;
  std::string mount_, why_;
  bool mounted_ = false;
};

std::string slurp(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The IoError's message (and a test failure if there was none, or another kind of error).
std::string io_error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const IoError& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected IoError, got: " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected IoError, nothing was thrown";
  return "";
}

TEST_F(FileIo, WriteFileAtomicReplacesTheFileAndLeavesNoTemporary) {
  const std::string p = path("a.txt");
  write_file_atomic(p, "first");
  EXPECT_EQ(slurp(p), "first");
  write_file_atomic(p, std::string(100000, 'x'));
  EXPECT_EQ(slurp(p), std::string(100000, 'x'));
  write_file_atomic(p, "");
  EXPECT_EQ(slurp(p), "");
  EXPECT_FALSE(fs::exists(p + ".tmp"));
  // A temporary left by a crash is overwritten, not in the way.
  std::ofstream(p + ".tmp") << "stale bytes from a crash";
  write_file_atomic(p, "second");
  EXPECT_EQ(slurp(p), "second");
  EXPECT_FALSE(fs::exists(p + ".tmp"));
}

TEST_F(FileIo, ReadFileReadsBackAndRefusesWhatItShouldNot) {
  const std::string p = path("b.bin");
  const std::string bytes("\0\1\2binary\xff", 10);
  write_file_durable(p, bytes);
  EXPECT_EQ(read_file(p, 10), bytes);
  EXPECT_THROW(read_file(p, 9), InvalidArgument);
  EXPECT_THROW(read_file(dir_.string(), 1 << 20), InvalidArgument);  // a directory
  const std::string missing = path("missing");
  const std::string msg = io_error_of([&] { read_file(missing, 1); });
  EXPECT_NE(msg.find(missing), std::string::npos) << msg;
  EXPECT_NE(msg.find("No such file or directory"), std::string::npos) << msg;
}

TEST_F(FileIo, StreamingWriterCommitsOrLeavesTheOldFile) {
  const std::string p = path("c.bin");
  write_file_atomic(p, "old");
  {
    AtomicFileWriter w(p);
    w.write("new ");
    w.write("bytes");
    EXPECT_EQ(w.bytes_written(), 9u);
    EXPECT_EQ(slurp(p), "old");  // nothing visible before commit
    w.commit();
  }
  EXPECT_EQ(slurp(p), "new bytes");
  {
    AtomicFileWriter w(p);
    w.write("abandoned");  // an exception on the way: never committed
  }
  EXPECT_EQ(slurp(p), "new bytes");
  EXPECT_FALSE(fs::exists(p + ".tmp"));
}

// A path under a regular file: open fails with ENOTDIR, for any user.
TEST_F(FileIo, ErrorsNameThePathAndTheErrnoText) {
  write_file_atomic(path("file"), "x");
  const std::string under = path("file/child.txt");
  std::string msg = io_error_of([&] { write_file_atomic(under, "data"); });
  EXPECT_NE(msg.find(under), std::string::npos) << msg;
  EXPECT_NE(msg.find("Not a directory"), std::string::npos) << msg;
  EXPECT_NE(msg.find("errno " + std::to_string(ENOTDIR)), std::string::npos) << msg;
  msg = io_error_of([&] { write_file_durable(under, "data"); });
  EXPECT_NE(msg.find("Not a directory"), std::string::npos) << msg;
  msg = io_error_of([&] { fsync_dir(path("no/such/dir")); });
  EXPECT_NE(msg.find(path("no/such/dir")), std::string::npos) << msg;
  EXPECT_NE(msg.find("No such file or directory"), std::string::npos) << msg;
}

// Every write is checked: the temporary is a link to /dev/full, where each write fails with
// ENOSPC, for any user. The old file stays, the temporary goes.
TEST_F(FileIo, AFailedWriteThrowsAndLeavesTheOldFile) {
  const std::string p = path("d.bin");
  write_file_atomic(p, "old");
  ASSERT_EQ(::symlink("/dev/full", (p + ".tmp").c_str()), 0) << std::strerror(errno);
  const std::string msg = io_error_of([&] { write_file_atomic(p, "new"); });
  EXPECT_NE(msg.find("write of '" + p + ".tmp'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("No space left on device"), std::string::npos) << msg;
  EXPECT_EQ(slurp(p), "old");
  EXPECT_FALSE(fs::exists(fs::symlink_status(p + ".tmp")));
}

// A real full filesystem: 64 KiB of tmpfs and a 1 MiB file.
TEST_F(FileIo, AFullDiskLeavesTheOldFileIntactAndNoTemporary) {
  if (!mount_tmpfs("64k")) GTEST_SKIP() << why_;
  const std::string p = mount_ + "/model.bin";
  write_file_atomic(p, "old model");
  const std::string big(1 << 20, 'w');
  std::string msg = io_error_of([&] { write_file_atomic(p, big); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("No space left on device"), std::string::npos) << msg;
  EXPECT_EQ(slurp(p), "old model");
  EXPECT_FALSE(fs::exists(p + ".tmp"));
  // The streaming writer fails at the first write that does not fit.
  msg = io_error_of([&] {
    AtomicFileWriter w(p);
    for (int i = 0; i < 64; ++i) w.write(big.data(), 1 << 14);
    w.commit();
  });
  EXPECT_NE(msg.find("No space left on device"), std::string::npos) << msg;
  EXPECT_EQ(slurp(p), "old model");
  EXPECT_FALSE(fs::exists(p + ".tmp"));
}

TEST_F(FileIo, AReadOnlyDirectoryNamesTheErrno) {
  if (!mount_tmpfs("64k")) GTEST_SKIP() << why_;
  const std::string p = mount_ + "/config.json";
  write_file_atomic(p, "{}");
  if (!remount_read_only()) GTEST_SKIP() << why_;
  std::string msg = io_error_of([&] { write_file_atomic(p, "{\"new\": 1}"); });
  EXPECT_NE(msg.find(p + ".tmp"), std::string::npos) << msg;
  EXPECT_NE(msg.find("Read-only file system"), std::string::npos) << msg;
  EXPECT_EQ(slurp(p), "{}");
  EXPECT_FALSE(fs::exists(p + ".tmp"));
  msg = io_error_of([&] { write_file_durable(mount_ + "/other", "x"); });
  EXPECT_NE(msg.find("Read-only file system"), std::string::npos) << msg;
}

}  // namespace
}  // namespace meshtrain
