// safetensors files: tensors by name plus string metadata, in the format Hugging Face's
// `safetensors` library reads and writes.
//
// Layout: an 8-byte little-endian header length N, N bytes of JSON header
//   {"name": {"dtype": "BF16", "shape": [768, 3], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"key": "value", ...}}   (metadata optional)
// then the data section, where each tensor's bytes lie at [begin, end) relative to its start,
// row-major and little-endian. Tensors tile the data section exactly, in offset order.
//
// Errors: content that breaks the format throws InvalidArgument naming the file and what is
// wrong (with the byte offset for JSON syntax errors); a failing system call throws IoError
// naming the file, the call and the operating system's reason.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "runtime/tensor.hpp"

namespace meshtrain {

// The header may not be larger than this (Hugging Face's reader uses the same cap).
inline constexpr std::uint64_t kSafetensorsMaxHeaderBytes = 100'000'000;

struct SafetensorsFile {
  std::string path;
  // CPU tensors in data-offset order, which is the order in which save_safetensors got them.
  std::vector<std::pair<std::string, Tensor>> tensors;
  std::map<std::string, std::string> metadata;

  // The tensor called name, or nullptr.
  const Tensor* find(std::string_view name) const;
  // The tensor called name; throws InvalidArgument naming the file and the missing name.
  const Tensor& at(std::string_view name) const;
};

// Writes the tensors (any device, any dtype; copied through the host when not on the CPU) in
// the order given, with the metadata, to `path`. Names must be unique and not "__metadata__".
// The file appears complete or not at all: the data is written to `path.tmp`, flushed to disk
// (fsync), renamed over `path`, and the directory entry is flushed too. On failure `path.tmp`
// is removed and an existing `path` is left as it was. Two writers to one path at once are
// not supported (they share `path.tmp`).
// Returns the size and CRC-32C (runtime/checksum.hpp) of the bytes written, and with
// crc_block_bytes > 0 the CRC-32C of every block of that many bytes of the file (the last one
// shorter), so that a reader can check any part of the file without reading the rest.
struct SavedFile {
  std::uint64_t bytes = 0;
  std::uint32_t crc32c = 0;
  std::vector<std::uint32_t> block_crc32c;
};
SavedFile save_safetensors(const std::string& path,
                           const std::vector<std::pair<std::string, Tensor>>& tensors,
                           const std::map<std::string, std::string>& metadata = {},
                           std::uint64_t crc_block_bytes = 0);

// A file's header without its data: where each tensor's bytes lie, from the start of the file.
struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  std::uint64_t begin = 0, end = 0;  // bytes from the start of the file
};
struct SafetensorsLayout {
  std::string path;
  std::vector<SafetensorsEntry> entries;  // in data-offset order
  std::map<std::string, std::string> metadata;
  // The entry called name, or nullptr.
  const SafetensorsEntry* find(std::string_view name) const;
};
// Parses the header of a file of `file_size` bytes with the checks of load_safetensors, reading
// only the header through `read(dst, n, offset)`.
SafetensorsLayout read_safetensors_layout(
    const std::string& path, std::uint64_t file_size,
    const std::function<void(void* dst, std::size_t n, std::uint64_t offset)>& read);

// Reads a whole file into CPU tensors. Nothing in the file is trusted: the header length is
// checked against the file size and kSafetensorsMaxHeaderBytes before anything is allocated,
// every entry must have a known dtype (F32, BF16, F16, I32), non-negative dimensions (at most
// Shape::kMaxDims of them) whose byte size equals its data_offsets range, and the ranges must
// tile the data section without overlaps, gaps or trailing bytes.
SafetensorsFile load_safetensors(const std::string& path);

// The same checks on a file already in memory (checkpoint files, read once for their checksum;
// fuzzing). `name` appears in error messages in place of the path.
SafetensorsFile parse_safetensors(const std::string& name, const void* data, std::size_t size);

}  // namespace meshtrain
