// CRC-32C (Castagnoli), the checksum of checkpoint files: hardware-accelerated on x86-64 with
// SSE4.2 (several GB/s), a table-driven fallback elsewhere. Both give identical results.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace meshtrain {

// Extends `crc` (0 for a fresh checksum) over n bytes; crc32c(crc32c(0, a), b) == crc32c(0, ab).
std::uint32_t crc32c(std::uint32_t crc, const void* data, std::size_t n);

// The CRC-32C of a whole file, read in chunks. Throws IoError naming the file when it cannot be
// read.
std::uint32_t crc32c_file(const std::string& path, std::uint64_t* size = nullptr);

// Eight lower-case hex digits.
std::string crc32c_hex(std::uint32_t crc);

}  // namespace meshtrain
