#include "runtime/checksum.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <vector>

#include "runtime/error.hpp"
#include "runtime/file_io.hpp"

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace meshtrain {
namespace {

constexpr std::uint32_t kPoly = 0x82F63B78u;  // CRC-32C, reflected

std::array<std::array<std::uint32_t, 256>, 8> make_tables() {
  std::array<std::array<std::uint32_t, 256>, 8> t{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ ((c & 1u) ? kPoly : 0u);
    t[0][i] = c;
  }
  for (std::uint32_t i = 0; i < 256; ++i)
    for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  return t;
}

std::uint32_t crc32c_table(std::uint32_t crc, const std::uint8_t* p, std::size_t n) {
  static const auto t = make_tables();
  while (n >= 8) {
    std::uint64_t w;
    std::memcpy(&w, p, 8);  // little-endian host (safetensors already requires it)
    w ^= crc;
    crc = t[7][w & 0xFF] ^ t[6][(w >> 8) & 0xFF] ^ t[5][(w >> 16) & 0xFF] ^ t[4][(w >> 24) & 0xFF] ^
          t[3][(w >> 32) & 0xFF] ^ t[2][(w >> 40) & 0xFF] ^ t[1][(w >> 48) & 0xFF] ^ t[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xFF];
  return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) std::uint32_t crc32c_sse42(std::uint32_t crc,
                                                             const std::uint8_t* p, std::size_t n) {
  std::uint64_t c = crc;
  while (n >= 8) {
    std::uint64_t w;
    std::memcpy(&w, p, 8);
    c = _mm_crc32_u64(c, w);
    p += 8;
    n -= 8;
  }
  auto c32 = static_cast<std::uint32_t>(c);
  while (n-- > 0) c32 = _mm_crc32_u8(c32, *p++);
  return c32;
}
#endif

}  // namespace

std::uint32_t crc32c(std::uint32_t crc, const void* data, std::size_t n) {
  const auto* p = static_cast<const std::uint8_t*>(data);
  crc = ~crc;
#if defined(__x86_64__)
  static const bool hw = __builtin_cpu_supports("sse4.2");
  crc = hw ? crc32c_sse42(crc, p, n) : crc32c_table(crc, p, n);
#else
  crc = crc32c_table(crc, p, n);
#endif
  return ~crc;
}

std::uint32_t crc32c_file(const std::string& path, std::uint64_t* size) {
  // A FIFO or a device would block or never end: only regular files are checksummed.
  Fd file = open_regular_file(path, "file to checksum");
  const int fd = file.get();
  std::vector<std::uint8_t> buf(1 << 20);
  std::uint32_t crc = 0;
  std::uint64_t total = 0;
  for (;;) {
    const ssize_t r = ::read(fd, buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      const int err = errno;
      throw IoError(fmt::format("cannot read '{}' to checksum it: {}", path, std::strerror(err)));
    }
    if (r == 0) break;
    crc = crc32c(crc, buf.data(), static_cast<std::size_t>(r));
    total += static_cast<std::uint64_t>(r);
  }
  file.close(path);
  if (size != nullptr) *size = total;
  return crc;
}

std::string crc32c_hex(std::uint32_t crc) {
  return fmt::format("{:08x}", crc);
}

}  // namespace meshtrain
