#include "parallel/checkpoint.hpp"

#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <set>

#include <nlohmann/json.hpp>

#include "runtime/checksum.hpp"
#include "runtime/error.hpp"
#include "runtime/file_io.hpp"
#include "runtime/json.hpp"
#include "runtime/log.hpp"
#include "runtime/safetensors.hpp"

namespace meshtrain::parallel {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

constexpr const char* kFormat = "meshtrain-checkpoint";
// Version 2 adds a CRC-32C per block of each shard file, so that a rank reads and checks only
// the parts of the files it needs; version 1 checkpoints (a CRC per whole file) still load.
constexpr int kVersion = 2;
// Shard files are checksummed in blocks of this many bytes: what a reader reads past the bytes
// it needs is at most one block at each end of a run.
constexpr std::uint64_t kBlockBytes = 1ull << 20;
// A manifest larger than this is not one of ours (a real one is a few hundred bytes per piece).
constexpr std::uint64_t kMaxManifestBytes = 256ull << 20;
constexpr int kMaxManifestDepth = 64;
// The most elements a tensor or a piece may have (flat offsets are checked against it too).
constexpr std::int64_t kMaxElements = std::int64_t{1} << 50;

// Writes a small text file completely, fsyncs it, and returns its size and checksum.
SavedFile write_text_file(const std::string& path, const std::string& text) {
  write_file_durable(path, text);
  return SavedFile{text.size(), crc32c(0, text.data(), text.size()), {}};
}

std::string shard_file_name(int world_rank) {
  return fmt::format("shard-{:05}.safetensors", world_rank);
}

// Parses "step_00000100"; -1 for any other name.
int parse_step_name(const std::string& name) {
  if (name.size() < 6 || name.compare(0, 5, "step_") != 0) return -1;
  long long v = 0;
  for (std::size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    v = v * 10 + (name[i] - '0');
    if (v > 2147483647) return -1;
  }
  return static_cast<int>(v);
}

// ---- pieces ---------------------------------------------------------------------------------

struct Box {
  std::vector<std::int64_t> offsets, shape;
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

// The boxes of the full tensor that TP rank t holds of a slot, in the order of its local
// elements; each box's local elements are contiguous (checked: parts > 1 needs shard_dim 0).
std::vector<Box> shard_boxes(const ParamSlot& s, int tp_rank, int tp_size) {
  const auto full = s.full_shape.to_vector();
  const auto local = s.shape.to_vector();
  MT_ASSERT(full.size() == local.size(),
            "tensor '{}': local shape {} and full shape {} differ in rank", s.name, s.shape.str(),
            s.full_shape.str());
  if (s.shard_dim < 0) {
    MT_ASSERT(full == local, "tensor '{}' is replicated but its shape {} is not the full {}",
              s.name, s.shape.str(), s.full_shape.str());
    return {Box{std::vector<std::int64_t>(full.size(), 0), full}};
  }
  const int k = s.shard_dim, parts = s.shard_parts;
  MT_ASSERT(k < static_cast<int>(full.size()) && parts >= 1, "tensor '{}': bad shard dim {}",
            s.name, k);
  MT_CHECK(parts == 1 || k == 0,
           "checkpoint: tensor '{}' is sharded in {} parts along dimension {}; only dimension 0 "
           "supports parts",
           s.name, parts, k);
  const std::int64_t block = full[k] / parts, slice = block / tp_size;
  MT_ASSERT(block * parts == full[k] && slice * tp_size == block && slice * parts == local[k],
            "tensor '{}': full {} in {} parts over TP {} does not give the local {}", s.name,
            s.full_shape.str(), parts, tp_size, s.shape.str());
  std::vector<Box> out;
  for (int p = 0; p < parts; ++p) {
    Box b{std::vector<std::int64_t>(full.size(), 0), local};
    b.offsets[k] = p * block + tp_rank * slice;
    b.shape[k] = slice;
    out.push_back(b);
  }
  return out;
}

struct Piece {
  std::string tensor, kind, file, key;
  Box box;
  std::int64_t flat_lo = 0, flat_hi = 0;  // elements of the box, row-major
  std::int64_t src = 0;                   // writer side: local flat index of element flat_lo
};

// The default write runs of DP rank d: [d, d + 1) x ceil(n / DP).
std::vector<FlatRun> default_runs(std::int64_t flat_numel, int dp_rank, int dp_size) {
  const std::int64_t chunk = (flat_numel + dp_size - 1) / dp_size;
  const std::int64_t lo = std::min(flat_numel, chunk * dp_rank);
  return {FlatRun{lo, 0, std::min(flat_numel, lo + chunk) - lo}};
}

// The pieces that TP rank tp_rank writes for its flat ranges, cut along tensors and boxes. A
// replicated tensor (shard_dim -1) is written by one TP rank only.
std::vector<Piece> writer_pieces(std::span<const ParamSlot> slots, const std::vector<FlatRun>& runs,
                                 const std::vector<std::string>& kinds, int tp_rank, int tp_size,
                                 int world_rank) {
  std::vector<Piece> out;
  for (const std::string& kind : kinds) {
    for (const FlatRun& run : runs) {
      const std::int64_t lo = run.flat, hi = run.flat + run.length;
      for (std::size_t i = 0; i < slots.size(); ++i) {
        const ParamSlot& s = slots[i];
        // Every TP rank holds a replicated tensor: one of them writes it, in turn by tensor so
        // that the writing stays spread.
        if (s.shard_dim < 0 && static_cast<int>(i % static_cast<std::size_t>(tp_size)) != tp_rank)
          continue;
        const std::vector<Box> boxes = shard_boxes(s, tp_rank, tp_size);
        std::int64_t local = s.offset;
        for (std::size_t b = 0; b < boxes.size(); ++b) {
          const std::int64_t n = boxes[b].numel();
          const std::int64_t a = std::max(lo, local), e = std::min(hi, local + n);
          if (a < e) {
            Piece p;
            p.tensor = s.name;
            p.kind = kind;
            p.file = shard_file_name(world_rank);
            p.key = fmt::format("{}/{}#{}@{}", kind, s.name, b, a - local);
            p.box = boxes[b];
            p.flat_lo = a - local;
            p.flat_hi = e - local;
            p.src = a;
            out.push_back(p);
          }
          local += n;
        }
      }
    }
  }
  return out;
}

// The part of `s` holding flat elements [flat, flat + n): a view of its data.
Tensor state_view(const FlatState& s, std::int64_t flat, std::int64_t n) {
  if (s.runs.empty()) {
    MT_ASSERT(flat >= 0 && flat + n <= s.data.numel(),
              "checkpoint: state '{}' holds flat [0, {}), a piece needs [{}, {})", s.kind,
              s.data.numel(), flat, flat + n);
    return s.data.slice(flat, n);
  }
  for (const FlatRun& r : s.runs)
    if (flat >= r.flat && flat + n <= r.flat + r.length)
      return s.data.slice(r.local + flat - r.flat, n);
  MT_ASSERT(false, "checkpoint: state '{}' holds no run with flat [{}, {})", s.kind, flat,
            flat + n);
  return {};
}

Json piece_json(const Piece& p) {
  return Json{{"tensor", p.tensor},
              {"kind", p.kind},
              {"file", p.file},
              {"key", p.key},
              {"offsets", p.box.offsets},
              {"shape", p.box.shape},
              {"flat", {p.flat_lo, p.flat_hi}}};
}

// ---- collectives over the whole mesh --------------------------------------------------------

// Max of v over every rank of the mesh (DP group, then TP group: the TP reduction sees every
// DP group's result).
std::int32_t mesh_max(Mesh& mesh, std::int32_t v) {
  if (!mesh.distributed()) return v;
  Tensor t = Tensor::from_floats({static_cast<float>(v)}, Shape{1}, DType::kF32);
  if (mesh.dp_size() > 1) mesh.dp().allreduce(t, comm::ReduceOp::kMax).wait();
  if (mesh.tp_size() > 1) mesh.tp().allreduce(t, comm::ReduceOp::kMax).wait();
  return static_cast<std::int32_t>(t.data_as<float>()[0]);
}

// Every rank's `mine` (n int32 values), indexed by world rank.
std::vector<std::int32_t> mesh_gather(Mesh& mesh, const std::vector<std::int32_t>& mine) {
  const std::size_t n = mine.size();
  if (!mesh.distributed()) return mine;
  Tensor in = Tensor::from_ints(mine, Shape{static_cast<std::int64_t>(n)});
  Tensor by_dp = Tensor::empty(Shape{static_cast<std::int64_t>(n) * mesh.dp_size()}, DType::kI32);
  if (mesh.dp_size() > 1)
    mesh.dp().all_gather(in, by_dp).wait();
  else
    by_dp.copy_from(in);
  Tensor all = Tensor::empty(Shape{by_dp.numel() * mesh.tp_size()}, DType::kI32);
  if (mesh.tp_size() > 1)
    mesh.tp().all_gather(by_dp, all).wait();
  else
    all.copy_from(by_dp);
  // all[t][d][i] -> out[(d * tp + t)][i]
  std::vector<std::int32_t> out(all.numel());
  const std::int32_t* a = all.data_as<std::int32_t>();
  const int dp = mesh.dp_size(), tp = mesh.tp_size();
  for (int t = 0; t < tp; ++t)
    for (int d = 0; d < dp; ++d)
      for (std::size_t i = 0; i < n; ++i)
        out[(static_cast<std::size_t>(d) * tp + t) * n + i] =
            a[(static_cast<std::size_t>(t) * dp + d) * n + i];
  return out;
}

// Every rank's list of int32 values (of any length), by world rank: the counts first, then the
// lists padded to the longest.
std::vector<std::vector<std::int32_t>> mesh_gather_lists(Mesh& mesh,
                                                         const std::vector<std::int32_t>& mine) {
  const auto count = static_cast<std::int32_t>(mine.size());
  std::int32_t most = count;
  for (std::int32_t c : mesh_gather(mesh, {count})) most = std::max(most, c);
  std::vector<std::int32_t> padded(static_cast<std::size_t>(most) + 1, 0);
  padded[0] = count;
  std::copy(mine.begin(), mine.end(), padded.begin() + 1);
  const std::vector<std::int32_t> all = mesh_gather(mesh, padded);
  const std::size_t per = padded.size();
  std::vector<std::vector<std::int32_t>> out(static_cast<std::size_t>(mesh.world_size()));
  for (std::size_t r = 0; r < out.size(); ++r) {
    const std::int32_t* p = all.data() + r * per;
    out[r].assign(p + 1, p + 1 + p[0]);
  }
  return out;
}

// Every rank's flat runs (flat and length), by world rank.
std::vector<std::vector<FlatRun>> mesh_gather_runs(Mesh& mesh, const std::vector<FlatRun>& mine) {
  std::vector<std::int32_t> words;
  for (const FlatRun& r : mine) {
    for (std::int64_t v : {r.flat, r.length}) {
      words.push_back(static_cast<std::int32_t>(v & 0x7fffffff));
      words.push_back(static_cast<std::int32_t>(v >> 31));
    }
  }
  auto join = [](std::int32_t lo, std::int32_t hi) {
    return static_cast<std::int64_t>(lo) | (static_cast<std::int64_t>(hi) << 31);
  };
  std::vector<std::vector<FlatRun>> out;
  for (const std::vector<std::int32_t>& l : mesh_gather_lists(mesh, words)) {
    std::vector<FlatRun>& runs = out.emplace_back();
    for (std::size_t i = 0; i + 3 < l.size(); i += 4)
      runs.push_back(FlatRun{join(l[i], l[i + 1]), 0, join(l[i + 2], l[i + 3])});
  }
  return out;
}

void remove_tree(const fs::path& p) {
  std::error_code ec;
  fs::remove_all(p, ec);
  if (ec) log::warn("checkpoint: could not remove '{}': {}", p.string(), ec.message());
}

// Renames a directory out of the way, then removes it.
void retire(const fs::path& root, const fs::path& dir) {
  const fs::path gone = root / (".del-" + dir.filename().string());
  remove_tree(gone);
  std::error_code ec;
  fs::rename(dir, gone, ec);
  if (ec) {
    log::warn("checkpoint: could not rename '{}' away: {}", dir.string(), ec.message());
    return;
  }
  remove_tree(gone);
}

// ---- manifest parsing -----------------------------------------------------------------------

struct FileEntry {
  std::uint64_t bytes = 0;
  std::uint32_t crc = 0;
  // Version 2 shard files: the CRC-32C of each block of block_bytes (the last one shorter).
  std::uint64_t block_bytes = 0;
  std::vector<std::uint32_t> blocks;
};

struct Manifest {
  CheckpointInfo info;
  std::map<std::string, std::vector<std::int64_t>> tensors;  // full shapes
  std::vector<Piece> pieces;
  std::map<std::string, FileEntry> files;
};

const Json& member(const std::string& where, const Json& obj, const char* key) {
  MT_CHECK(obj.is_object() && obj.contains(key), "{}: missing '{}'", where, key);
  return obj[key];
}

std::int64_t as_int(const std::string& where, const Json& v, std::int64_t lo, std::int64_t hi) {
  MT_CHECK(v.is_number_integer(), "{}: expected an integer, got {}", where, v.dump());
  const std::int64_t x =
      v.is_number_unsigned() && v.get<std::uint64_t>() > static_cast<std::uint64_t>(hi)
          ? hi + 1
          : v.get<std::int64_t>();
  MT_CHECK(x >= lo && x <= hi, "{}: {} is out of range [{}, {}]", where, v.dump(), lo, hi);
  return x;
}

std::string as_string(const std::string& where, const Json& v) {
  MT_CHECK(v.is_string(), "{}: expected a string, got {}", where, v.dump());
  return v.get<std::string>();
}

std::vector<std::int64_t> as_dims(const std::string& where, const Json& v) {
  MT_CHECK(v.is_array() && v.size() <= static_cast<std::size_t>(Shape::kMaxDims),
           "{}: expected an array of at most {} integers, got {}", where, Shape::kMaxDims,
           v.dump());
  std::vector<std::int64_t> out;
  for (const Json& d : v) out.push_back(as_int(where, d, 0, std::int64_t{1} << 40));
  return out;
}

bool safe_file_name(const std::string& f) {
  if (f.empty() || f == "." || f == ".." || f.size() > 255) return false;
  for (char c : f)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.'))
      return false;
  return true;
}

Manifest parse_manifest(const std::string& dir) {
  const std::string path = (fs::path(dir) / "manifest.json").string();
  std::error_code ec;
  MT_CHECK(fs::is_directory(dir, ec), "checkpoint '{}' is not a directory", dir);
  MT_CHECK(fs::exists(path, ec),
           "checkpoint '{}' has no manifest.json (not a checkpoint, or an incomplete one)", dir);
  const std::string text = read_file(path, kMaxManifestBytes);
  const std::string w = "checkpoint manifest '" + path + "'";
  // A manifest nests 4 levels (pieces[i].offsets); the caller's state a few more.
  const Json j = parse_json_file_text<Json>(text, w, kMaxManifestDepth);
  Manifest m;
  m.info.dir = dir;
  MT_CHECK(j.is_object(), "{}: expected a JSON object", w);
  MT_CHECK(as_string(w + " format", member(w, j, "format")) == kFormat, "{}: format is not '{}'", w,
           kFormat);
  const std::int64_t version = as_int(w + " version", member(w, j, "version"), 0, 1 << 20);
  MT_CHECK(version == 1 || version == kVersion,
           "{}: version {} is not supported (this build reads versions 1 to {})", w, version,
           kVersion);
  m.info.step = static_cast<int>(as_int(w + " step", member(w, j, "step"), 0, 2147483647));
  const Json& layout = member(w, j, "layout");
  m.info.layout.dp =
      static_cast<int>(as_int(w + " layout.dp", member(w, layout, "dp"), 1, 1 << 20));
  m.info.layout.tp =
      static_cast<int>(as_int(w + " layout.tp", member(w, layout, "tp"), 1, 1 << 20));
  m.info.layout.zero =
      static_cast<int>(as_int(w + " layout.zero", member(w, layout, "zero"), 0, 1));
  const Json& state = member(w, j, "state");
  MT_CHECK(state.is_object(), "{}: 'state' must be an object", w);
  m.info.state_json = state.dump();

  const Json& files = member(w, j, "files");
  MT_CHECK(files.is_object() && !files.empty(), "{}: 'files' must be a non-empty object", w);
  for (const auto& [name, e] : files.items()) {
    const std::string fw = w + " files." + name;
    MT_CHECK(safe_file_name(name), "{}: '{}' is not a plain file name", w, name);
    FileEntry fe;
    fe.bytes = static_cast<std::uint64_t>(
        as_int(fw + ".bytes", member(fw, e, "bytes"), 0, std::int64_t{1} << 50));
    const std::string crc = as_string(fw + ".crc32c", member(fw, e, "crc32c"));
    MT_CHECK(crc.size() == 8 && crc.find_first_not_of("0123456789abcdef") == std::string::npos,
             "{}.crc32c: '{}' is not 8 hex digits", fw, crc);
    fe.crc = static_cast<std::uint32_t>(std::stoul(crc, nullptr, 16));
    if (e.is_object() && e.contains("blocks")) {
      fe.block_bytes = static_cast<std::uint64_t>(
          as_int(fw + ".block_bytes", member(fw, e, "block_bytes"), 1, std::int64_t{1} << 40));
      const std::string hex = as_string(fw + ".blocks", e["blocks"]);
      const std::uint64_t n = (fe.bytes + fe.block_bytes - 1) / fe.block_bytes;
      MT_CHECK(
          hex.size() == 8 * n && hex.find_first_not_of("0123456789abcdef") == std::string::npos,
          "{}.blocks: expected {} CRC-32C values of 8 hex digits for {} bytes in blocks of "
          "{}, got {} characters",
          fw, n, fe.bytes, fe.block_bytes, hex.size());
      for (std::uint64_t b = 0; b < n; ++b)
        fe.blocks.push_back(
            static_cast<std::uint32_t>(std::stoul(hex.substr(8 * b, 8), nullptr, 16)));
    }
    m.files[name] = fe;
  }
  MT_CHECK(m.files.count("config.toml") == 1, "{}: 'files' lacks config.toml", w);

  const Json& tensors = member(w, j, "tensors");
  MT_CHECK(tensors.is_object(), "{}: 'tensors' must be an object", w);
  for (const auto& [name, e] : tensors.items()) {
    const std::string tw = w + " tensors." + name + ".shape";
    std::vector<std::int64_t> dims = as_dims(tw, member(w, e, "shape"));
    // Every box lies inside its tensor, so this bounds their element counts too (and keeps
    // Box::numel() from overflowing).
    std::int64_t numel = 1;
    for (std::int64_t d : dims)
      MT_CHECK(!__builtin_mul_overflow(numel, d, &numel) && numel <= kMaxElements,
               "{}: {} has more than 2^50 elements", tw, member(w, e, "shape").dump());
    m.tensors[name] = std::move(dims);
  }

  const Json& pieces = member(w, j, "pieces");
  MT_CHECK(pieces.is_array(), "{}: 'pieces' must be an array", w);
  std::size_t i = 0;
  for (const Json& e : pieces) {
    const std::string pw = fmt::format("{} pieces[{}]", w, i++);
    Piece p;
    p.tensor = as_string(pw + ".tensor", member(pw, e, "tensor"));
    p.kind = as_string(pw + ".kind", member(pw, e, "kind"));
    p.file = as_string(pw + ".file", member(pw, e, "file"));
    p.key = as_string(pw + ".key", member(pw, e, "key"));
    p.box.offsets = as_dims(pw + ".offsets", member(pw, e, "offsets"));
    p.box.shape = as_dims(pw + ".shape", member(pw, e, "shape"));
    const Json& flat = member(pw, e, "flat");
    MT_CHECK(flat.is_array() && flat.size() == 2, "{}.flat: expected [begin, end]", pw);
    p.flat_lo = as_int(pw + ".flat", flat[0], 0, kMaxElements);
    p.flat_hi = as_int(pw + ".flat", flat[1], 0, kMaxElements);
    auto t = m.tensors.find(p.tensor);
    MT_CHECK(t != m.tensors.end(), "{}: tensor '{}' is not in 'tensors'", pw, p.tensor);
    MT_CHECK(m.files.count(p.file) == 1, "{}: file '{}' is not in 'files'", pw, p.file);
    const auto& full = t->second;
    MT_CHECK(p.box.offsets.size() == full.size() && p.box.shape.size() == full.size(),
             "{}: the box has {} / {} dimensions, tensor '{}' has {}", pw, p.box.offsets.size(),
             p.box.shape.size(), p.tensor, full.size());
    for (std::size_t d = 0; d < full.size(); ++d)
      MT_CHECK(p.box.offsets[d] + p.box.shape[d] <= full[d],
               "{}: the box [{} + {}) leaves tensor '{}' along dimension {} (size {})", pw,
               p.box.offsets[d], p.box.shape[d], p.tensor, d, full[d]);
    MT_CHECK(p.flat_lo <= p.flat_hi && p.flat_hi <= p.box.numel(),
             "{}: flat range [{}, {}) is not within the box's {} elements", pw, p.flat_lo,
             p.flat_hi, p.box.numel());
    m.pieces.push_back(std::move(p));
  }
  return m;
}

// Reads a file of the checkpoint and checks its size and checksum against the manifest.
std::string read_checked(const Manifest& m, const std::string& name) {
  const FileEntry& fe = m.files.at(name);
  const std::string path = (fs::path(m.info.dir) / name).string();
  std::error_code ec;
  MT_CHECK(fs::exists(path, ec), "checkpoint '{}': file '{}' listed in the manifest is missing",
           m.info.dir, name);
  const std::uintmax_t size = fs::file_size(path, ec);
  MT_CHECK(!ec && size == fe.bytes,
           "checkpoint '{}': '{}' is {} bytes, the manifest says {} (truncated or replaced)",
           m.info.dir, name, ec ? 0 : size, fe.bytes);
  const std::string bytes = read_file(path, fe.bytes);
  MT_CHECK(bytes.size() == fe.bytes,
           "checkpoint '{}': '{}' is {} bytes, the manifest says {} (truncated or replaced)",
           m.info.dir, name, bytes.size(), fe.bytes);
  const std::uint32_t crc = crc32c(0, bytes.data(), bytes.size());
  MT_CHECK(crc == fe.crc,
           "checkpoint '{}': '{}' has CRC-32C {}, the manifest says {} (the file is corrupt)",
           m.info.dir, name, crc32c_hex(crc), crc32c_hex(fe.crc));
  return bytes;
}

// One shard file as load_checkpoint reads it. Version 2 files: only the blocks holding bytes
// asked for are read (pread, consecutive missing blocks in one call), each checked against its
// CRC-32C before any of its bytes is used; the header too. Version 1 files: the whole file,
// checked against its CRC-32C, on first use.
class ShardReader {
 public:
  ShardReader(const Manifest& m, const std::string& name, std::uint64_t* bytes_read)
      : dir_(m.info.dir),
        name_(name),
        path_((fs::path(m.info.dir) / name).string()),
        fe_(m.files.at(name)),
        bytes_read_(bytes_read) {
    auto read = [this](void* dst, std::size_t n, std::uint64_t off) {
      if (n > 0) std::memcpy(dst, bytes(off, n), n);
    };
    if (fe_.blocks.empty()) {
      whole_ = read_checked(m, name);
      *bytes_read_ += whole_.size();
      layout_ = read_safetensors_layout(path_, whole_.size(), read);
    } else {
      std::error_code ec;
      MT_CHECK(fs::exists(path_, ec),
               "checkpoint '{}': file '{}' listed in the manifest is missing", dir_, name_);
      fd_ = open_file(path_, O_RDONLY);
      struct stat st;
      if (::fstat(fd_.get(), &st) != 0)
        throw IoError(
            fmt::format("checkpoint: fstat of '{}' failed: {}", path_, std::strerror(errno)));
      MT_CHECK(S_ISREG(st.st_mode), "checkpoint: '{}' is not a regular file", path_);
      MT_CHECK(static_cast<std::uint64_t>(st.st_size) == fe_.bytes,
               "checkpoint '{}': '{}' is {} bytes, the manifest says {} (truncated or replaced)",
               dir_, name_, st.st_size, fe_.bytes);
      // Only the pages of the blocks read are ever touched.
      buf_.reset(new std::uint8_t[std::max<std::uint64_t>(fe_.bytes, 1)]);
      loaded_.assign(fe_.blocks.size(), 0);
      layout_ = read_safetensors_layout(path_, fe_.bytes, read);
    }
    for (std::size_t i = 0; i < layout_.entries.size(); ++i) index_[layout_.entries[i].name] = i;
  }
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;

  const SafetensorsEntry* find(const std::string& key) const {
    const auto it = index_.find(key);
    return it == index_.end() ? nullptr : &layout_.entries[it->second];
  }

  // Bytes [off, off + n) of the file, read and checked.
  const std::uint8_t* bytes(std::uint64_t off, std::uint64_t n) {
    MT_ASSERT(off <= fe_.bytes && n <= fe_.bytes - off,
              "read of [{}, +{}) past the {} bytes of '{}'", off, n, fe_.bytes, path_);
    if (buf_ == nullptr) return reinterpret_cast<const std::uint8_t*>(whole_.data()) + off;
    if (n == 0) return buf_.get() + off;
    const std::uint64_t B = fe_.block_bytes;
    const std::uint64_t last = (off + n - 1) / B;
    for (std::uint64_t b = off / B; b <= last; ++b) {
      if (loaded_[b]) continue;
      std::uint64_t e = b;
      while (e + 1 <= last && !loaded_[e + 1]) ++e;
      load(b * B, std::min(fe_.bytes, (e + 1) * B));
      for (std::uint64_t k = b; k <= e; ++k) {
        const std::uint64_t lo = k * B, hi = std::min(fe_.bytes, lo + B);
        const std::uint32_t crc = crc32c(0, buf_.get() + lo, hi - lo);
        MT_CHECK(crc == fe_.blocks[k],
                 "checkpoint '{}': '{}' bytes [{}, {}) have CRC-32C {}, the manifest says {} (the "
                 "file is corrupt)",
                 dir_, name_, lo, hi, crc32c_hex(crc), crc32c_hex(fe_.blocks[k]));
        loaded_[k] = 1;
      }
      b = e;
    }
    return buf_.get() + off;
  }

 private:
  void load(std::uint64_t lo, std::uint64_t hi) {
    const std::size_t got = read_at(fd_.get(), path_, buf_.get() + lo, hi - lo, lo);
    *bytes_read_ += got;
    MT_CHECK(got == hi - lo, "checkpoint '{}': '{}' shrank while being read (at byte {} of {})",
             dir_, name_, lo + got, fe_.bytes);
  }

  std::string dir_, name_, path_;
  const FileEntry& fe_;
  std::uint64_t* bytes_read_;
  Fd fd_;
  std::string whole_;                    // version 1: the whole file
  std::unique_ptr<std::uint8_t[]> buf_;  // version 2: the file's bytes at their offsets
  std::vector<std::uint8_t> loaded_;     // per block: read and checked
  SafetensorsLayout layout_;
  std::map<std::string, std::size_t> index_;
};

}  // namespace

std::string checkpoint_name(int step) {
  return fmt::format("step_{:08}", step);
}

std::string save_checkpoint(Mesh& mesh, const std::string& root, int step,
                            std::span<const ParamSlot> slots, std::int64_t flat_numel,
                            const std::vector<FlatState>& states, const std::vector<FlatRun>& write,
                            const CheckpointLayout& layout, const std::string& state_json,
                            const std::string& config_toml, int keep) {
  const fs::path root_path(root);
  const fs::path final_dir = root_path / checkpoint_name(step);
  const fs::path tmp_dir = root_path / (".tmp-" + checkpoint_name(step));
  const bool root_rank = mesh.world_rank() == 0;
  std::vector<std::string> kinds;
  for (const FlatState& s : states) kinds.push_back(s.kind);

  // 1. World rank 0 prepares an empty temporary directory.
  std::string error;
  if (root_rank) {
    try {
      std::error_code ec;
      fs::create_directories(root_path, ec);
      if (ec) throw IoError(fmt::format("checkpoint: cannot create '{}': {}", root, ec.message()));
      remove_tree(tmp_dir);
      fs::create_directory(tmp_dir, ec);
      if (ec)
        throw IoError(
            fmt::format("checkpoint: cannot create '{}': {}", tmp_dir.string(), ec.message()));
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  if (mesh_max(mesh, error.empty() ? 0 : 1) != 0)
    throw IoError(root_rank ? error
                            : fmt::format("checkpoint of step {}: rank 0 could not create '{}'",
                                          step, tmp_dir.string()));

  // 2. Every rank writes its ranges of every state to its own file.
  const std::vector<FlatRun> my_runs =
      write.empty() ? default_runs(flat_numel, mesh.dp_rank(), mesh.dp_size()) : write;
  const std::vector<std::vector<FlatRun>> all_runs = mesh_gather_runs(mesh, my_runs);
  SavedFile saved;
  try {
    std::vector<Piece> mine =
        writer_pieces(slots, my_runs, kinds, mesh.tp_rank(), mesh.tp_size(), mesh.world_rank());
    // Tensors replicated over TP first: every TP rank of a resuming job reads them, and the
    // others' slices of the sharded ones are not in its way (blocks are read whole).
    std::set<std::string> replicated;
    for (const ParamSlot& s : slots)
      if (s.replicated()) replicated.insert(s.name);
    std::stable_partition(mine.begin(), mine.end(),
                          [&](const Piece& p) { return replicated.count(p.tensor) > 0; });
    std::vector<std::pair<std::string, Tensor>> tensors;
    for (const Piece& p : mine) {
      const FlatState& s = *std::find_if(states.begin(), states.end(),
                                         [&](const FlatState& f) { return f.kind == p.kind; });
      MT_ASSERT(s.data.dtype() == DType::kF32, "checkpoint: state '{}' is not fp32", s.kind);
      Tensor t = state_view(s, p.src, p.flat_hi - p.flat_lo);
      if (p.flat_lo == 0 && p.flat_hi == p.box.numel()) t = t.view(Shape(p.box.shape));
      tensors.emplace_back(p.key, t);
    }
    saved = save_safetensors((tmp_dir / shard_file_name(mesh.world_rank())).string(), tensors,
                             {{"format", kFormat}, {"step", std::to_string(step)}}, kBlockBytes);
  } catch (const std::exception& e) {
    error = e.what();
    log::error("checkpoint of step {}: rank {} could not write its shard: {}", step,
               mesh.world_rank(), error);
  }
  const std::vector<std::int32_t> all =
      mesh_gather(mesh, {error.empty() ? 1 : 0, static_cast<std::int32_t>(saved.crc32c),
                         static_cast<std::int32_t>(saved.bytes & 0x7fffffff),
                         static_cast<std::int32_t>(saved.bytes >> 31)});
  const std::vector<std::vector<std::int32_t>> all_blocks = mesh_gather_lists(
      mesh, std::vector<std::int32_t>(saved.block_crc32c.begin(), saved.block_crc32c.end()));
  std::string failed;
  for (int r = 0; r < mesh.world_size(); ++r)
    if (all[static_cast<std::size_t>(r) * 4] == 0)
      failed += (failed.empty() ? "" : ", ") + std::to_string(r);
  if (!failed.empty()) {
    if (root_rank) remove_tree(tmp_dir);
    throw IoError(
        fmt::format("checkpoint of step {} abandoned: rank(s) {} could not write their "
                    "shard{}",
                    step, failed, error.empty() ? "" : ": " + error));
  }

  // 3. World rank 0 writes the manifest and publishes the directory.
  if (root_rank) {
    try {
      Json files = Json::object();
      Json pieces = Json::array();
      for (int r = 0; r < mesh.world_size(); ++r) {
        const std::size_t at = static_cast<std::size_t>(r) * 4;
        const std::uint64_t bytes = static_cast<std::uint64_t>(all[at + 2]) |
                                    (static_cast<std::uint64_t>(all[at + 3]) << 31);
        std::string blocks;
        for (std::int32_t c : all_blocks[static_cast<std::size_t>(r)])
          blocks += crc32c_hex(static_cast<std::uint32_t>(c));
        files[shard_file_name(r)] =
            Json{{"bytes", bytes},
                 {"crc32c", crc32c_hex(static_cast<std::uint32_t>(all[at + 1]))},
                 {"block_bytes", kBlockBytes},
                 {"blocks", blocks}};
        const int t = r % mesh.tp_size();
        for (const Piece& p : writer_pieces(slots, all_runs[static_cast<std::size_t>(r)], kinds, t,
                                            mesh.tp_size(), r))
          pieces.push_back(piece_json(p));
      }
      const SavedFile cfg = write_text_file((tmp_dir / "config.toml").string(), config_toml);
      files["config.toml"] = Json{{"bytes", cfg.bytes}, {"crc32c", crc32c_hex(cfg.crc32c)}};
      Json tensors = Json::object();
      for (const ParamSlot& s : slots)
        tensors[s.name] = Json{{"shape", s.full_shape.to_vector()}, {"dtype", "F32"}};
      Json state;
      try {
        state = Json::parse(state_json);
      } catch (const Json::parse_error& e) {
        MT_ASSERT(false, "checkpoint: the trainer state is not JSON: {}", e.what());
      }
      const Json manifest{
          {"format", kFormat},
          {"version", kVersion},
          {"step", step},
          {"layout",
           {{"world", mesh.world_size()},
            {"dp", mesh.dp_size()},
            {"tp", mesh.tp_size()},
            {"zero", layout.zero}}},
          {"state", state},
          {"tensors", tensors},
          {"pieces", pieces},
          {"files", files},
      };
      write_text_file((tmp_dir / "manifest.json").string(), manifest.dump(1));
      fsync_dir(tmp_dir.string());
      std::error_code ec;
      if (fs::exists(final_dir, ec)) retire(root_path, final_dir);  // the same step saved again
      fs::rename(tmp_dir, final_dir, ec);
      if (ec)
        throw IoError(fmt::format("checkpoint: cannot rename '{}' to '{}': {}", tmp_dir.string(),
                                  final_dir.string(), ec.message()));
      fsync_dir(root_path.string());
      if (keep > 0) {
        std::vector<std::string> all_ckpts = list_checkpoints(root);
        for (std::size_t i = 0; i + static_cast<std::size_t>(keep) < all_ckpts.size(); ++i)
          retire(root_path, all_ckpts[i]);
      }
      // Leftovers of writes that a crash interrupted.
      for (const auto& e : fs::directory_iterator(root_path, ec)) {
        const std::string n = e.path().filename().string();
        if ((n.rfind(".tmp-step_", 0) == 0 || n.rfind(".del-step_", 0) == 0) && e.path() != tmp_dir)
          remove_tree(e.path());
      }
    } catch (const std::exception& e) {
      error = e.what();
      remove_tree(tmp_dir);
    }
  }
  if (mesh_max(mesh, error.empty() ? 0 : 1) != 0)
    throw IoError(
        root_rank
            ? error
            : fmt::format("checkpoint of step {}: rank 0 could not write the manifest", step));
  return final_dir.string();
}

std::vector<std::string> list_checkpoints(const std::string& root) {
  std::vector<std::pair<int, std::string>> found;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return {};
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const int step = parse_step_name(e.path().filename().string());
    if (step < 0 || !e.is_directory(ec)) continue;
    found.emplace_back(step, e.path().string());
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& f : found) out.push_back(std::move(f.second));
  return out;
}

std::string latest_checkpoint(const std::string& root) {
  const std::vector<std::string> all = list_checkpoints(root);
  return all.empty() ? std::string() : all.back();
}

CheckpointInfo read_checkpoint_info(const std::string& dir) {
  Manifest m = parse_manifest(dir);
  m.info.config_toml = read_checked(m, "config.toml");
  return m.info;
}

void verify_checkpoint(const std::string& dir) {
  const Manifest m = parse_manifest(dir);
  for (const auto& [name, fe] : m.files) {
    std::uint64_t size = 0;
    const std::string path = (fs::path(dir) / name).string();
    std::error_code ec;
    MT_CHECK(fs::exists(path, ec), "checkpoint '{}': file '{}' listed in the manifest is missing",
             dir, name);
    const std::uint32_t crc = crc32c_file(path, &size);
    MT_CHECK(size == fe.bytes, "checkpoint '{}': '{}' is {} bytes, the manifest says {}", dir, name,
             size, fe.bytes);
    MT_CHECK(crc == fe.crc, "checkpoint '{}': '{}' has CRC-32C {}, the manifest says {}", dir, name,
             crc32c_hex(crc), crc32c_hex(fe.crc));
  }
}

void load_checkpoint(const std::string& dir, std::span<const ParamSlot> slots,
                     std::int64_t flat_numel, const std::vector<FlatState>& targets, int tp_rank,
                     int tp_size) {
  const Manifest m = parse_manifest(dir);
  const std::string w = "checkpoint '" + dir + "'";
  // Every tensor of the model must be in the checkpoint with the same full shape (rows of
  // layout-dependent padding excepted), and no other.
  for (const ParamSlot& s : slots) {
    auto t = m.tensors.find(s.name);
    MT_CHECK(t != m.tensors.end(), "{} has no tensor '{}' (another model's checkpoint?)", w,
             s.name);
    const auto want = s.full_shape.to_vector();
    bool same = t->second.size() == want.size();
    for (std::size_t d = 0; same && d < want.size(); ++d) {
      if (d == 0 && s.real_rows >= 0)
        same = t->second[0] >= s.real_rows && want[0] >= s.real_rows;
      else
        same = t->second[d] == want[d];
    }
    MT_CHECK(same,
             "{}: tensor '{}' has shape {}, the model expects {} (another model's checkpoint?)", w,
             s.name, Shape(t->second).str(), s.full_shape.str());
  }
  MT_CHECK(m.tensors.size() == slots.size(), "{} holds {} tensors, the model has {}", w,
           m.tensors.size(), slots.size());

  const auto t0 = std::chrono::steady_clock::now();
  std::uint64_t bytes_read = 0;
  std::map<std::string, std::unique_ptr<ShardReader>> opened;
  auto file = [&](const std::string& name) -> ShardReader& {
    auto& f = opened[name];
    if (!f) f = std::make_unique<ShardReader>(m, name, &bytes_read);
    return *f;
  };

  // A target held as runs loads as one contiguous target per run: flat element base + j in
  // data[j].
  struct Contiguous {
    std::string kind;
    Tensor data;
    std::int64_t base;
  };
  std::vector<Contiguous> contiguous;
  for (const FlatState& t : targets) {
    if (t.runs.empty()) {
      contiguous.push_back(Contiguous{t.kind, t.data, 0});
      continue;
    }
    for (const FlatRun& r : t.runs)
      contiguous.push_back(Contiguous{t.kind, t.data.slice(r.local, r.length), r.flat});
  }
  for (const Contiguous& target : contiguous) {
    MT_ASSERT(target.data.dtype() == DType::kF32 && target.data.is_cpu(),
              "checkpoint targets are fp32 CPU tensors");
    const std::int64_t lo = target.base;
    const std::int64_t hi = std::min(flat_numel, target.base + target.data.numel());
    if (hi <= lo) continue;
    float* dst = target.data.data_as<float>();
    std::vector<std::uint8_t> covered(static_cast<std::size_t>(hi - lo), 0);
    for (const ParamSlot& s : slots) {
      const std::vector<Box> boxes = shard_boxes(s, tp_rank, tp_size);
      std::int64_t local = s.offset;
      for (const Box& tb : boxes) {
        const std::int64_t n = tb.numel();
        const std::int64_t a = std::max(lo, local), e = std::min(hi, local + n);
        const std::int64_t base = local;
        local += n;
        if (a >= e) continue;
        const std::int64_t width = tb.shape.back();
        const std::size_t nd = tb.shape.size();
        // Padding rows: zeros, not read.
        MT_ASSERT(s.real_rows < 0 || nd >= 2, "tensor '{}': real_rows needs 2 or more dimensions",
                  s.name);
        if (s.real_rows >= 0) {
          const std::int64_t row_elems = n / std::max<std::int64_t>(tb.shape[0], 1);
          for (std::int64_t i = a; i < e; ++i) {
            const std::int64_t row = tb.offsets[0] + (i - base) / row_elems;
            if (row >= s.real_rows) {
              dst[i - lo] = 0.0f;
              covered[static_cast<std::size_t>(i - lo)] = 1;
            }
          }
        }
        for (const Piece& p : m.pieces) {
          if (p.tensor != s.name || p.kind != target.kind) continue;
          // Skip pieces whose box misses the target box.
          bool overlap = true;
          for (std::size_t d = 0; d < nd && overlap; ++d)
            overlap = p.box.offsets[d] < tb.offsets[d] + tb.shape[d] &&
                      tb.offsets[d] < p.box.offsets[d] + p.box.shape[d];
          if (!overlap || p.flat_hi == p.flat_lo) continue;
          ShardReader& f = file(p.file);
          const SafetensorsEntry* data = f.find(p.key);
          MT_CHECK(data != nullptr, "{}: '{}' has no tensor '{}' that the manifest lists", w,
                   p.file, p.key);
          MT_CHECK(data->dtype == DType::kF32 && data->shape.numel() == p.flat_hi - p.flat_lo,
                   "{}: '{}' tensor '{}' is {} {}, the manifest says F32 with {} elements", w,
                   p.file, p.key, dtype_name(data->dtype), data->shape.str(),
                   p.flat_hi - p.flat_lo);
          if (p.box.offsets == tb.offsets && p.box.shape == tb.shape) {
            // The same box (the same TP layout): piece element i is target element base + i,
            // so the bytes needed are one run; read it in one go rather than block by block.
            const std::int64_t i0 = std::max(p.flat_lo, a - base);
            const std::int64_t i1 = std::min(p.flat_hi, e - base);
            if (i0 < i1)
              f.bytes(data->begin + static_cast<std::uint64_t>(i0 - p.flat_lo) * sizeof(float),
                      static_cast<std::uint64_t>(i1 - i0) * sizeof(float));
          }
          const std::int64_t pw = p.box.shape.back();
          if (pw == 0) continue;
          // Row by row through the piece's elements.
          std::vector<std::int64_t> idx(nd, 0);
          for (std::int64_t r = p.flat_lo / pw; r * pw < p.flat_hi; ++r) {
            const std::int64_t c0 = std::max<std::int64_t>(p.flat_lo - r * pw, 0);
            const std::int64_t c1 = std::min<std::int64_t>(p.flat_hi - r * pw, pw);
            // Row r's index in the piece's box, then in full coordinates, then in the target's.
            std::int64_t rem = r, tgt_row = 0;
            bool inside = true;
            for (int d = static_cast<int>(nd) - 2; d >= 0; --d) {
              idx[d] = rem % p.box.shape[d];
              rem /= p.box.shape[d];
            }
            std::int64_t stride = 1;
            for (int d = static_cast<int>(nd) - 2; d >= 0; --d) {
              const std::int64_t g = p.box.offsets[d] + idx[d];
              const std::int64_t t = g - tb.offsets[d];
              if (t < 0 || t >= tb.shape[d]) {
                inside = false;
                break;
              }
              tgt_row += t * stride;
              stride *= tb.shape[d];
            }
            if (!inside) continue;
            if (s.real_rows >= 0 && p.box.offsets[0] + idx[0] >= s.real_rows)
              continue;  // padding, zero-filled above
            // Columns [c0, c1) of the piece's row in full coordinates, clipped to the target.
            std::int64_t g_lo = p.box.offsets[nd - 1] + c0, g_hi = p.box.offsets[nd - 1] + c1;
            g_lo = std::max(g_lo, tb.offsets[nd - 1]);
            g_hi = std::min(g_hi, tb.offsets[nd - 1] + width);
            for (std::int64_t g = g_lo; g < g_hi;) {
              const std::int64_t flat = base + tgt_row * width + (g - tb.offsets[nd - 1]);
              // Clip to [a, e): the target range may start or end inside this row.
              if (flat < a || flat >= e) {
                ++g;
                continue;
              }
              const std::int64_t run = std::min(g_hi - g, e - flat);
              const std::int64_t from = r * pw + (g - p.box.offsets[nd - 1]) - p.flat_lo;
              for (std::int64_t k = 0; k < run; ++k) {
                std::uint8_t& c = covered[static_cast<std::size_t>(flat + k - lo)];
                MT_CHECK(c == 0, "{}: element {} of '{}' ({}) is stored twice", w, flat + k - base,
                         s.name, target.kind);
                c = 1;
              }
              const std::uint64_t nbytes = static_cast<std::uint64_t>(run) * sizeof(float);
              std::memcpy(
                  dst + (flat - lo),
                  f.bytes(data->begin + static_cast<std::uint64_t>(from) * sizeof(float), nbytes),
                  nbytes);
              g += run;
            }
          }
        }
      }
    }
    const auto missing = std::find(covered.begin(), covered.end(), 0);
    if (missing != covered.end()) {
      const std::int64_t at = lo + (missing - covered.begin());
      std::string name = "?";
      for (const ParamSlot& s : slots)
        if (at >= s.offset && at < s.offset + s.numel()) name = s.name;
      MT_FAIL(
          "{}: no piece holds element {} of this rank's '{}' state (tensor '{}'): the "
          "checkpoint is incomplete",
          w, at, target.kind, name);
    }
  }
  std::uint64_t file_bytes = 0;
  for (const auto& [name, f] : opened) file_bytes += m.files.at(name).bytes;
  log::info(
      "checkpoint '{}': read {:.2f} MiB of {} shard file(s) of {:.2f} MiB in {:.0f} ms", dir,
      static_cast<double>(bytes_read) / 1048576.0, opened.size(),
      static_cast<double>(file_bytes) / 1048576.0,
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
}

}  // namespace meshtrain::parallel
