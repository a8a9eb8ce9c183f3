#include "runtime/safetensors.hpp"

#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

#include "runtime/checksum.hpp"
#include "runtime/file_io.hpp"

namespace meshtrain {
namespace {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; a big-endian host would need byte swaps");

using Json = nlohmann::ordered_json;

// Reads exactly n bytes at offset; a file that shrinks under us is an IoError.
void read_exact(int fd, const std::string& path, void* data, std::size_t n, std::uint64_t offset,
                std::string_view what) {
  const std::size_t got = read_at(fd, path, data, n, offset);
  if (got < n)
    throw IoError(fmt::format(
        "safetensors file '{}': ended at byte {} while reading {} (did it shrink while being "
        "read?)",
        path, offset + got, what));
}

std::string build_header(const std::string& path,
                         const std::vector<std::pair<std::string, Tensor>>& tensors,
                         const std::map<std::string, std::string>& metadata) {
  Json header = Json::object();
  if (!metadata.empty()) {
    Json meta = Json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = std::move(meta);
  }
  std::set<std::string_view> names;
  std::uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    MT_CHECK(name != "__metadata__",
             "save_safetensors '{}': '__metadata__' is reserved and cannot name a tensor", path);
    MT_CHECK(names.insert(name).second, "save_safetensors '{}': tensor name '{}' appears twice",
             path, name);
    MT_CHECK(t.defined(), "save_safetensors '{}': tensor '{}' is undefined", path, name);
    const std::uint64_t end = offset + t.nbytes();
    header[name] = Json{{"dtype", dtype_safetensors_name(t.dtype())},
                        {"shape", t.shape().to_vector()},
                        {"data_offsets", {offset, end}}};
    offset = end;
  }
  std::string text;
  try {
    text = header.dump(-1, ' ', false, Json::error_handler_t::strict);
  } catch (const Json::exception& e) {
    MT_FAIL("save_safetensors '{}': a tensor name or metadata string is not valid UTF-8 ({})", path,
            e.what());
  }
  // Pad with spaces so that the data section starts 8-byte aligned, as Hugging Face does.
  text.resize((text.size() + 7) / 8 * 8, ' ');
  return text;
}

// ---- reading ------------------------------------------------------------------------------

struct Entry {
  std::string name;
  DType dtype;
  std::vector<std::int64_t> dims;
  std::uint64_t begin, end;
};

// Parses the header, refusing nesting deeper than the format has (a deep "[[[[..." would
// otherwise cost memory without bound) and tensor names or entry keys that appear twice (JSON
// parsers keep one of them silently).
Json parse_header(const std::string& path, const std::string& text) {
  std::set<std::string> names, entry_keys;
  auto guard = [&](int depth, Json::parse_event_t event, Json& parsed) {
    // Depth 0 is the root object, 1 a tensor entry or the metadata, 2 a shape or offsets array.
    if ((event == Json::parse_event_t::object_start || event == Json::parse_event_t::array_start) &&
        depth > 2)
      MT_FAIL(
          "safetensors file '{}': the header nests objects or arrays {} levels deep; the "
          "format has at most 3 (header, tensor entry, shape)",
          path, depth + 1);
    if (event == Json::parse_event_t::key && depth == 1)
      MT_CHECK(names.insert(parsed.get<std::string>()).second,
               "safetensors file '{}': the header names '{}' twice", path,
               parsed.get<std::string>());
    // Within a tensor entry or the metadata, too: {"dtype": "F32", "dtype": "I32"}.
    if (event == Json::parse_event_t::object_start && depth == 1) entry_keys.clear();
    if (event == Json::parse_event_t::key && depth == 2)
      MT_CHECK(entry_keys.insert(parsed.get<std::string>()).second,
               "safetensors file '{}': an entry of the header has the key '{}' twice", path,
               parsed.get<std::string>());
    return true;
  };
  try {
    return Json::parse(text, guard);
  } catch (const Json::parse_error& e) {
    // e.byte counts the characters read, the failing one included.
    const std::uint64_t at = 8 + (e.byte > 0 ? e.byte - 1 : 0);
    std::string reason = e.what();
    if (auto pos = reason.find("column "); pos != std::string::npos) {
      if (auto colon = reason.find(": ", pos); colon != std::string::npos)
        reason = reason.substr(colon + 2);
    }
    MT_FAIL("safetensors file '{}': the JSON header is invalid at byte offset {} of the file: {}",
            path, at, reason);
  } catch (const Json::exception& e) {
    // out_of_range 406: a number beyond double's range ("1e999"), which JSON's grammar allows.
    std::string reason = e.what();
    if (auto pos = reason.find("] "); pos != std::string::npos) reason = reason.substr(pos + 2);
    MT_FAIL("safetensors file '{}': the JSON header is invalid: {}", path, reason);
  }
}

std::uint64_t as_unsigned(const std::string& path, const std::string& name, const Json& v,
                          const char* what) {
  MT_CHECK(v.is_number_integer(),
           "safetensors file '{}': tensor '{}' has a {} of {} ({}), "
           "expected a non-negative integer",
           path, name, what, v.dump(), v.type_name());
  MT_CHECK(v.is_number_unsigned(),
           "safetensors file '{}': tensor '{}' has a negative {} ({}), expected a non-negative "
           "integer",
           path, name, what, v.dump());
  return v.get<std::uint64_t>();
}

DType entry_dtype(const std::string& path, const std::string& name, const Json& v) {
  MT_CHECK(v.is_string(), "safetensors file '{}': tensor '{}' has dtype {}, expected a string",
           path, name, v.dump());
  const auto& text = v.get_ref<const std::string&>();
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16, DType::kI32})
    if (text == dtype_safetensors_name(t)) return t;
  MT_FAIL(
      "safetensors file '{}': tensor '{}' has dtype '{}', expected one of F32, BF16, F16, I32 "
      "(other safetensors dtypes are not supported)",
      path, name, text);
}

Entry parse_entry(const std::string& path, const std::string& name, const Json& v,
                  std::uint64_t data_size) {
  MT_CHECK(v.is_object(),
           "safetensors file '{}': entry '{}' is a JSON {}, expected an object with "
           "dtype, shape and data_offsets",
           path, name, v.type_name());
  for (const auto& [key, unused] : v.items())
    MT_CHECK(key == "dtype" || key == "shape" || key == "data_offsets",
             "safetensors file '{}': tensor '{}' has an unknown key '{}' (expected dtype, shape, "
             "data_offsets)",
             path, name, key);
  for (const char* key : {"dtype", "shape", "data_offsets"})
    MT_CHECK(v.contains(key), "safetensors file '{}': tensor '{}' has no '{}'", path, name, key);

  Entry e;
  e.name = name;
  e.dtype = entry_dtype(path, name, v["dtype"]);

  const Json& shape = v["shape"];
  MT_CHECK(shape.is_array(), "safetensors file '{}': tensor '{}' has shape {}, expected an array",
           path, name, shape.dump());
  MT_CHECK(shape.size() <= static_cast<std::size_t>(Shape::kMaxDims),
           "safetensors file '{}': tensor '{}' has {} dimensions, at most {} are supported", path,
           name, shape.size(), Shape::kMaxDims);
  // numel in bytes, and the product of the non-zero dimensions, must both fit in int64.
  std::uint64_t numel = 1, nonzero_product = 1;
  constexpr std::uint64_t kLimit = std::numeric_limits<std::int64_t>::max();
  for (const Json& d : shape) {
    const std::uint64_t dim = as_unsigned(path, name, d, "dimension");
    const bool overflow =
        __builtin_mul_overflow(nonzero_product, std::max<std::uint64_t>(dim, 1), &nonzero_product);
    MT_CHECK(!overflow && nonzero_product <= kLimit,
             "safetensors file '{}': tensor '{}' has shape {} whose element count overflows "
             "64 bits",
             path, name, shape.dump());
    numel *= dim;
    e.dims.push_back(static_cast<std::int64_t>(dim));
  }
  std::uint64_t nbytes = 0;
  MT_CHECK(!__builtin_mul_overflow(numel, dtype_size(e.dtype), &nbytes) && nbytes <= kLimit,
           "safetensors file '{}': tensor '{}' of shape {} is too large", path, name, shape.dump());

  const Json& offsets = v["data_offsets"];
  MT_CHECK(offsets.is_array() && offsets.size() == 2,
           "safetensors file '{}': tensor '{}' has data_offsets {}, expected [begin, end]", path,
           name, offsets.dump());
  e.begin = as_unsigned(path, name, offsets[0], "data offset");
  e.end = as_unsigned(path, name, offsets[1], "data offset");
  MT_CHECK(e.begin <= e.end,
           "safetensors file '{}': tensor '{}' has data_offsets [{}, {}] with "
           "begin after end",
           path, name, e.begin, e.end);
  MT_CHECK(e.end <= data_size,
           "safetensors file '{}': tensor '{}' has data_offsets [{}, {}] past the end of the data "
           "section ({} bytes)",
           path, name, e.begin, e.end, data_size);
  MT_CHECK(e.end - e.begin == nbytes,
           "safetensors file '{}': tensor '{}' is {}{} ({} bytes) but its data_offsets [{}, {}] "
           "hold {} bytes",
           path, name, dtype_safetensors_name(e.dtype), shape.dump(), nbytes, e.begin, e.end,
           e.end - e.begin);
  return e;
}

std::map<std::string, std::string> parse_metadata(const std::string& path, const Json& v) {
  MT_CHECK(v.is_object(),
           "safetensors file '{}': __metadata__ is a JSON {}, expected an object of "
           "strings",
           path, v.type_name());
  std::map<std::string, std::string> out;
  for (const auto& [key, value] : v.items()) {
    MT_CHECK(value.is_string(),
             "safetensors file '{}': __metadata__ key '{}' holds a JSON {}, "
             "expected a string",
             path, key, value.type_name());
    out[key] = value.get<std::string>();
  }
  return out;
}

// Entries sorted by offset must cover [0, data_size) exactly once.
void check_tiling(const std::string& path, std::vector<Entry>& entries, std::uint64_t data_size) {
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t covered = 0;
  const Entry* last = nullptr;
  for (const Entry& e : entries) {
    MT_CHECK(e.begin >= covered,
             "safetensors file '{}': tensor '{}' at data bytes [{}, {}) overlaps tensor '{}' at "
             "[{}, {})",
             path, e.name, e.begin, e.end, last ? last->name : "", last ? last->begin : 0, covered);
    MT_CHECK(e.begin == covered,
             "safetensors file '{}': data bytes [{}, {}) belong to no tensor (before tensor '{}')",
             path, covered, e.begin, e.name);
    covered = e.end;
    last = &e;
  }
  MT_CHECK(covered == data_size,
           "safetensors file '{}': the data section has {} bytes but the tensors cover only {} "
           "(trailing bytes)",
           path, data_size, covered);
}

}  // namespace

const Tensor* SafetensorsFile::find(std::string_view name) const {
  for (const auto& [n, t] : tensors)
    if (n == name) return &t;
  return nullptr;
}

const Tensor& SafetensorsFile::at(std::string_view name) const {
  const Tensor* t = find(name);
  MT_CHECK(t != nullptr, "safetensors file '{}' has no tensor named '{}'", path, name);
  return *t;
}

SavedFile save_safetensors(const std::string& path,
                           const std::vector<std::pair<std::string, Tensor>>& tensors,
                           const std::map<std::string, std::string>& metadata,
                           std::uint64_t crc_block_bytes) {
  SavedFile saved;
  auto write_counted = [&](AtomicFileWriter& out, const void* data, std::size_t n) {
    out.write(data, n);
    saved.crc32c = crc32c(saved.crc32c, data, n);
    // Block checksums: each byte extends the CRC of the block its file offset falls in.
    const auto* bytes = static_cast<const std::uint8_t*>(data);
    for (std::size_t done = 0; crc_block_bytes > 0 && done < n;) {
      const std::uint64_t at = saved.bytes + done;
      if (at % crc_block_bytes == 0) saved.block_crc32c.push_back(0);
      const std::size_t take = static_cast<std::size_t>(
          std::min<std::uint64_t>(n - done, crc_block_bytes - at % crc_block_bytes));
      saved.block_crc32c.back() = crc32c(saved.block_crc32c.back(), bytes + done, take);
      done += take;
    }
    saved.bytes += n;
  };
  const std::string header = build_header(path, tensors, metadata);
  AtomicFileWriter out(path);
  std::uint8_t len[8];
  std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<std::uint8_t>(n >> (8 * i));
  write_counted(out, len, 8);
  write_counted(out, header.data(), header.size());
  for (const auto& [name, t] : tensors) {
    if (t.numel() == 0) continue;
    if (t.is_cpu()) {
      write_counted(out, t.data(), t.nbytes());
    } else {
      const Tensor host = t.to(cpu_device());
      write_counted(out, host.data(), host.nbytes());
    }
  }
  out.commit();
  return saved;
}

namespace {

// The reading core shared by files and byte buffers: `read(dst, n, offset, what)` fills dst
// with n bytes at offset and throws if they are not there.
template <typename Read>
SafetensorsLayout parse_layout(const std::string& path, std::uint64_t file_size, Read&& read) {
  MT_CHECK(file_size >= 8,
           "safetensors file '{}': {} bytes long, too short for the 8-byte header length", path,
           file_size);

  std::uint8_t len[8];
  read(len, 8, 0, "the header length");
  std::uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= static_cast<std::uint64_t>(len[i]) << (8 * i);
  MT_CHECK(header_len <= file_size - 8,
           "safetensors file '{}': the header length (bytes 0-7) says {} bytes, but only {} "
           "bytes follow it (truncated file, or not a safetensors file)",
           path, header_len, file_size - 8);
  MT_CHECK(header_len <= kSafetensorsMaxHeaderBytes,
           "safetensors file '{}': the header length {} exceeds the limit of {} bytes", path,
           header_len, kSafetensorsMaxHeaderBytes);
  MT_CHECK(header_len >= 2,
           "safetensors file '{}': the header length {} is too short for a JSON object", path,
           header_len);

  std::string text(header_len, '\0');
  read(text.data(), header_len, 8, "the header");
  const Json header = parse_header(path, text);
  MT_CHECK(header.is_object(), "safetensors file '{}': the header is a JSON {}, expected an object",
           path, header.type_name());

  const std::uint64_t data_start = 8 + header_len;
  const std::uint64_t data_size = file_size - data_start;
  SafetensorsLayout out;
  out.path = path;
  std::vector<Entry> entries;
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__")
      out.metadata = parse_metadata(path, value);
    else
      entries.push_back(parse_entry(path, key, value, data_size));
  }
  check_tiling(path, entries, data_size);
  out.entries.reserve(entries.size());
  for (Entry& e : entries)
    out.entries.push_back(SafetensorsEntry{std::move(e.name), e.dtype, Shape(e.dims),
                                           data_start + e.begin, data_start + e.end});
  return out;
}

template <typename Read>
SafetensorsFile parse_file(const std::string& path, std::uint64_t file_size, Read&& read) {
  SafetensorsLayout layout = parse_layout(path, file_size, read);
  SafetensorsFile out;
  out.path = path;
  out.metadata = std::move(layout.metadata);
  out.tensors.reserve(layout.entries.size());
  for (SafetensorsEntry& e : layout.entries) {
    Tensor t = Tensor::empty(e.shape, e.dtype);
    read(t.data(), t.nbytes(), e.begin, fmt::format("tensor '{}'", e.name));
    out.tensors.emplace_back(std::move(e.name), std::move(t));
  }
  return out;
}

}  // namespace

SafetensorsFile load_safetensors(const std::string& path) {
  const Fd fd = open_regular_file(path, "safetensors file");
  struct stat st;
  if (::fstat(fd.get(), &st) != 0)
    throw IoError(
        fmt::format("safetensors file '{}': fstat failed: {}", path, std::strerror(errno)));
  return parse_file(path, static_cast<std::uint64_t>(st.st_size),
                    [&](void* dst, std::size_t n, std::uint64_t offset, std::string_view what) {
                      read_exact(fd.get(), path, dst, n, offset, what);
                    });
}

SafetensorsFile parse_safetensors(const std::string& name, const void* data, std::size_t size) {
  const auto* bytes = static_cast<const std::uint8_t*>(data);
  return parse_file(name, size,
                    [&](void* dst, std::size_t n, std::uint64_t offset, std::string_view) {
                      // parse_layout checked every range against size before reading it.
                      MT_ASSERT(offset <= size && n <= size - offset,
                                "read of [{}, +{}) past {} bytes", offset, n, size);
                      if (n > 0) std::memcpy(dst, bytes + offset, n);
                    });
}

SafetensorsLayout read_safetensors_layout(
    const std::string& path, std::uint64_t file_size,
    const std::function<void(void* dst, std::size_t n, std::uint64_t offset)>& read) {
  return parse_layout(path, file_size,
                      [&](void* dst, std::size_t n, std::uint64_t offset, std::string_view) {
                        read(dst, n, offset);
                      });
}

const SafetensorsEntry* SafetensorsLayout::find(std::string_view name) const {
  for (const SafetensorsEntry& e : entries)
    if (e.name == name) return &e;
  return nullptr;
}

}  // namespace meshtrain
