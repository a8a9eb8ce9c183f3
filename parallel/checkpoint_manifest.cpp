#include "parallel/checkpoint_manifest.hpp"

#include <cctype>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "runtime/checksum.hpp"
#include "runtime/error.hpp"
#include "runtime/json.hpp"

namespace meshtrain::parallel::ckpt {
namespace {

using Json = nlohmann::ordered_json;
// The canonical form the manifest's checksum covers: keys sorted.
using SortedJson = nlohmann::json;

constexpr int kMaxManifestDepth = 64;
// The most elements a tensor or a piece may have (flat offsets are checked against it too).
constexpr std::int64_t kMaxElements = std::int64_t{1} << 50;

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

std::uint32_t parse_crc(const std::string& where, const std::string& hex) {
  MT_CHECK(hex.size() == 8 && hex.find_first_not_of("0123456789abcdef") == std::string::npos,
           "{}: '{}' is not 8 hex digits", where, hex);
  return static_cast<std::uint32_t>(std::stoul(hex, nullptr, 16));
}

FileEntry parse_file(const std::string& fw, const Json& e) {
  FileEntry fe;
  fe.bytes = static_cast<std::uint64_t>(
      as_int(fw + ".bytes", member(fw, e, "bytes"), 0, std::int64_t{1} << 50));
  fe.crc = parse_crc(fw + ".crc32c", as_string(fw + ".crc32c", member(fw, e, "crc32c")));
  if (e.is_object() && e.contains("blocks")) {
    fe.block_bytes = static_cast<std::uint64_t>(
        as_int(fw + ".block_bytes", member(fw, e, "block_bytes"), 1, std::int64_t{1} << 40));
    const std::string hex = as_string(fw + ".blocks", e["blocks"]);
    const std::uint64_t n = (fe.bytes + fe.block_bytes - 1) / fe.block_bytes;
    MT_CHECK(hex.size() == 8 * n && hex.find_first_not_of("0123456789abcdef") == std::string::npos,
             "{}.blocks: expected {} CRC-32C values of 8 hex digits for {} bytes in blocks of "
             "{}, got {} characters",
             fw, n, fe.bytes, fe.block_bytes, hex.size());
    for (std::uint64_t b = 0; b < n; ++b)
      fe.blocks.push_back(
          static_cast<std::uint32_t>(std::stoul(hex.substr(8 * b, 8), nullptr, 16)));
  }
  return fe;
}

Piece parse_piece(const std::string& pw, const Json& e, const Manifest& m) {
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
           "{}: flat range [{}, {}) is not within the box's {} elements", pw, p.flat_lo, p.flat_hi,
           p.box.numel());
  return p;
}

void parse_header(const std::string& w, const Json& j, Manifest& m) {
  MT_CHECK(j.is_object(), "{}: expected a JSON object", w);
  MT_CHECK(as_string(w + " format", member(w, j, "format")) == kFormat, "{}: format is not '{}'", w,
           kFormat);
  const std::int64_t version = as_int(w + " version", member(w, j, "version"), 0, 1 << 20);
  MT_CHECK(version >= 1 && version <= kVersion,
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
}

// The checksum of a manifest's content: without kManifestCrcKey, keys sorted, no whitespace.
std::uint32_t content_crc(SortedJson j) {
  j.erase(kManifestCrcKey);
  const std::string canonical = j.dump();
  return crc32c(0, canonical.data(), canonical.size());
}

// The step must be the one its directory is named after: a manifest whose step was edited (10
// -> 7 inside step_00000010) would resume at the wrong step and then overwrite the directory.
void check_step_name(const std::string& w, const std::string& dir, int step) {
  namespace fs = std::filesystem;
  fs::path p = fs::path(dir).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();  // "DIR/"
  const std::string name = p.filename().string();
  const int named = parse_step_name(name);
  MT_CHECK(named < 0 || named == step,
           "{}: step is {}, but its directory is '{}' (step {}): the manifest was edited or the "
           "directory renamed",
           w, step, name, named);
}

// Version 3: the manifest's checksum against its content.
void check_content_crc(const std::string& w, const std::string& text, std::int64_t version) {
  const SortedJson j = parse_json_file_text<SortedJson>(text, w, kMaxManifestDepth);
  if (version < 3 && !j.contains(kManifestCrcKey)) return;
  MT_CHECK(j.contains(kManifestCrcKey), "{}: missing '{}' (version {} manifests carry one)", w,
           kManifestCrcKey, version);
  const std::uint32_t want =
      parse_crc(fmt::format("{} {}", w, kManifestCrcKey),
                as_string(fmt::format("{} {}", w, kManifestCrcKey), j[kManifestCrcKey]));
  const std::uint32_t got = content_crc(j);
  MT_CHECK(got == want,
           "{}: {} is {}, but the manifest's content has CRC-32C {}: the manifest was edited or "
           "damaged after it was written (refusing to trust any of it)",
           w, kManifestCrcKey, crc32c_hex(want), crc32c_hex(got));
}

Json file_json(const FileEntry& f) {
  Json j{{"bytes", f.bytes}, {"crc32c", crc32c_hex(f.crc)}};
  if (f.block_bytes > 0) {
    std::string blocks;
    for (std::uint32_t c : f.blocks) blocks += crc32c_hex(c);
    j["block_bytes"] = f.block_bytes;
    j["blocks"] = blocks;
  }
  return j;
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

}  // namespace

Manifest parse_manifest(const std::string& dir, const std::string& path, const std::string& text) {
  const std::string w = "checkpoint manifest '" + path + "'";
  // A manifest nests 4 levels (pieces[i].offsets); the caller's state a few more.
  const Json j = parse_json_file_text<Json>(text, w, kMaxManifestDepth);
  Manifest m;
  m.info.dir = dir;
  parse_header(w, j, m);
  check_step_name(w, dir, m.info.step);
  check_content_crc(w, text, j["version"].get<std::int64_t>());

  const Json& files = member(w, j, "files");
  MT_CHECK(files.is_object() && !files.empty(), "{}: 'files' must be a non-empty object", w);
  for (const auto& [name, e] : files.items()) {
    MT_CHECK(safe_file_name(name), "{}: '{}' is not a plain file name", w, name);
    m.files[name] = parse_file(w + " files." + name, e);
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
  for (const Json& e : pieces)
    m.pieces.push_back(parse_piece(fmt::format("{} pieces[{}]", w, i++), e, m));
  return m;
}

std::string manifest_json(const ManifestContent& c) {
  Json files = Json::object();
  for (const auto& [name, f] : c.files) files[name] = file_json(f);
  Json pieces = Json::array();
  for (const Piece& p : c.pieces) pieces.push_back(piece_json(p));
  Json tensors = Json::object();
  for (const ParamSlot& s : c.slots)
    tensors[s.name] = Json{{"shape", s.full_shape.to_vector()}, {"dtype", "F32"}};
  Json state;
  try {
    state = Json::parse(c.state_json);
  } catch (const Json::parse_error& e) {
    MT_ASSERT(false, "checkpoint: the trainer state is not JSON: {}", e.what());
  }
  Json manifest{
      {"format", kFormat},
      {"version", kVersion},
      {kManifestCrcKey, "00000000"},
      {"step", c.step},
      {"layout", {{"world", c.world}, {"dp", c.dp}, {"tp", c.tp}, {"zero", c.zero}}},
      {"state", state},
      {"tensors", tensors},
      {"pieces", pieces},
      {"files", files},
  };
  manifest[kManifestCrcKey] = crc32c_hex(content_crc(SortedJson::parse(manifest.dump())));
  return manifest.dump(1);
}

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

std::string seal_manifest(const std::string& text) {
  Json j = parse_json_file_text<Json>(text, "seal_manifest", kMaxManifestDepth);
  MT_CHECK(j.is_object(), "seal_manifest: the text is not a JSON object");
  j[kManifestCrcKey] = crc32c_hex(content_crc(SortedJson::parse(j.dump())));
  return j.dump(1);
}

}  // namespace meshtrain::parallel::ckpt
