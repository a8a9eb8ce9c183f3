// The manifest of a distributed checkpoint (parallel/checkpoint.hpp): parsed and checked from
// its text, and built from what the ranks wrote. Pure functions (no file is read or written
// here). Internal to parallel/: checkpoint.cpp and its tests use it.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "parallel/checkpoint.hpp"
#include "parallel/checkpoint_geometry.hpp"

namespace meshtrain::parallel::ckpt {

inline constexpr const char* kFormat = "meshtrain-checkpoint";
// Version 2 adds a CRC-32C per block of each shard file, so that a rank reads and checks only
// the parts of the files it needs; version 1 checkpoints (a CRC per whole file) still load.
// Version 3 adds the manifest's own checksum (kManifestCrcKey): the CRC-32C of its canonical
// content, the JSON object without that key as nlohmann::json::dump() prints it (keys sorted, no
// whitespace; Python: json.dumps(m, sort_keys=True, separators=(",", ":"), ensure_ascii=False)),
// so that an edited or damaged manifest (a step changed by hand) is refused; whitespace and key
// order do not count. Versions 1 and 2 still load, unchecked but for the step's directory name.
inline constexpr int kVersion = 3;
inline constexpr const char* kManifestCrcKey = "manifest_crc32c";
// A manifest larger than this is not one of ours (a real one is a few hundred bytes per piece).
inline constexpr std::uint64_t kMaxManifestBytes = 256ull << 20;

struct FileEntry {
  std::uint64_t bytes = 0;
  std::uint32_t crc = 0;
  // Version 2 shard files: the CRC-32C of each block of block_bytes (the last one shorter).
  // block_bytes = 0: a CRC-32C of the whole file only.
  std::uint64_t block_bytes = 0;
  std::vector<std::uint32_t> blocks;
};

struct Manifest {
  CheckpointInfo info;  // without config_toml, which is a file of its own
  std::map<std::string, std::vector<std::int64_t>> tensors;  // full shapes
  std::vector<Piece> pieces;
  std::map<std::string, FileEntry> files;
};

// Parses and checks the text of DIR/manifest.json; `path` names it in errors. Nothing in it is
// trusted: structure, types and ranges, the step against DIR's name (when DIR is named step_N,
// as the writer names it: a copy under another name keeps the manifest's step), the manifest's
// checksum (version 3), file names (plain names only), every piece's tensor and file listed,
// every box inside its tensor, every flat range inside its box. Throws InvalidArgument naming
// the path and the field.
Manifest parse_manifest(const std::string& dir, const std::string& path, const std::string& text);

// Parses "step_00000100" (a checkpoint directory's name): 100; -1 for any other name.
int parse_step_name(const std::string& name);

// `text` (a JSON object) with kManifestCrcKey set to the checksum of its content: the writer's
// last step, and how a tool or a test that edits a manifest on purpose makes it load. Throws
// InvalidArgument when the text is not a JSON object.
std::string seal_manifest(const std::string& text);

// What world rank 0 records of a checkpoint it publishes.
struct ManifestContent {
  int step = 0;
  int world = 1, dp = 1, tp = 1, zero = 0;
  std::string state_json;  // the caller's JSON object
  std::span<const ParamSlot> slots;
  std::vector<Piece> pieces;                             // every rank's
  std::vector<std::pair<std::string, FileEntry>> files;  // in the order they are listed
};
// The manifest's text (JSON, one key per line).
std::string manifest_json(const ManifestContent& c);

}  // namespace meshtrain::parallel::ckpt
