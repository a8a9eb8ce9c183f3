// Distributed checkpoints: saving in three phases, the directory's life cycle, and loading as
// check tensors -> plan (checkpoint_geometry.cpp) -> block-checked reads. The manifest's text
// is checkpoint_manifest.cpp's.
#include "parallel/checkpoint.hpp"

#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <vector>

#include "parallel/checkpoint_geometry.hpp"
#include "parallel/checkpoint_manifest.hpp"
#include "runtime/checksum.hpp"
#include "runtime/error.hpp"
#include "runtime/file_io.hpp"
#include "runtime/log.hpp"
#include "runtime/safetensors.hpp"

namespace meshtrain::parallel {
namespace {

namespace fs = std::filesystem;
using namespace ckpt;

// Shard files are checksummed in blocks of this many bytes: what a reader reads past the bytes
// it needs is at most one block at each end of a run.
constexpr std::uint64_t kBlockBytes = 1ull << 20;

// ---- files ----------------------------------------------------------------------------------

// Writes a small text file completely, fsyncs it, and returns its size and checksum.
SavedFile write_text_file(const std::string& path, const std::string& text) {
  write_file_durable(path, text);
  return SavedFile{text.size(), crc32c(0, text.data(), text.size()), {}};
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

// ---- collectives over the whole mesh --------------------------------------------------------

// Max of v over every rank of the mesh (DP group, then TP group, then PP group: each reduction
// sees the previous one's result).
std::int32_t mesh_max(Mesh& mesh, std::int32_t v) {
  if (!mesh.distributed()) return v;
  Tensor t = Tensor::from_floats({static_cast<float>(v)}, Shape{1}, DType::kF32);
  if (mesh.dp_size() > 1) mesh.dp().allreduce(t, comm::ReduceOp::kMax).wait();
  if (mesh.tp_size() > 1) mesh.tp().allreduce(t, comm::ReduceOp::kMax).wait();
  if (mesh.pp_size() > 1) mesh.pp().allreduce(t, comm::ReduceOp::kMax).wait();
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
  Tensor stages = Tensor::empty(Shape{all.numel() * mesh.pp_size()}, DType::kI32);
  if (mesh.pp_size() > 1)
    mesh.pp().all_gather(all, stages).wait();
  else
    stages.copy_from(all);
  // stages[p][t][d][i] -> out[((p * dp + d) * tp + t)][i] (the world rank's order)
  std::vector<std::int32_t> out(stages.numel());
  const std::int32_t* a = stages.data_as<std::int32_t>();
  const int dp = mesh.dp_size(), tp = mesh.tp_size(), pp = mesh.pp_size();
  for (int p = 0; p < pp; ++p)
    for (int t = 0; t < tp; ++t)
      for (int d = 0; d < dp; ++d)
        for (std::size_t i = 0; i < n; ++i)
          out[((static_cast<std::size_t>(p) * dp + d) * tp + t) * n + i] =
              a[((static_cast<std::size_t>(p) * tp + t) * dp + d) * n + i];
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

// ---- reading --------------------------------------------------------------------------------

Manifest read_manifest(const std::string& dir) {
  const std::string path = (fs::path(dir) / "manifest.json").string();
  std::error_code ec;
  MT_CHECK(fs::is_directory(dir, ec), "checkpoint '{}' is not a directory", dir);
  MT_CHECK(fs::exists(path, ec),
           "checkpoint '{}' has no manifest.json (not a checkpoint, or an incomplete one)", dir);
  return parse_manifest(dir, path, read_file(path, kMaxManifestBytes, "checkpoint manifest"));
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
// asked for are read (pread, one block at a time), each checked against its CRC-32C before any
// of its bytes is used; the header too. At most kCachedBlocks blocks are held at once, so that a
// resume needs no memory the size of the checkpoint on top of the state it fills (read_plan
// asks for the bytes of each file in order, so each block is read once). Version 1 files: the
// whole file, checked against its CRC-32C, on first use.
class ShardReader {
 public:
  static constexpr std::size_t kCachedBlocks = 2;

  ShardReader(const Manifest& m, const std::string& name, std::uint64_t* bytes_read)
      : dir_(m.info.dir),
        name_(name),
        path_((fs::path(m.info.dir) / name).string()),
        fe_(m.files.at(name)),
        bytes_read_(bytes_read) {
    auto read = [this](void* dst, std::size_t n, std::uint64_t off) { copy(dst, off, n); };
    if (fe_.blocks.empty()) {
      whole_ = read_checked(m, name);
      *bytes_read_ += whole_.size();
      layout_ = read_safetensors_layout(path_, whole_.size(), read);
    } else {
      std::error_code ec;
      MT_CHECK(fs::exists(path_, ec),
               "checkpoint '{}': file '{}' listed in the manifest is missing", dir_, name_);
      fd_ = open_regular_file(path_, "checkpoint shard");
      struct stat st;
      if (::fstat(fd_.get(), &st) != 0)
        throw IoError(
            fmt::format("checkpoint: fstat of '{}' failed: {}", path_, std::strerror(errno)));
      MT_CHECK(static_cast<std::uint64_t>(st.st_size) == fe_.bytes,
               "checkpoint '{}': '{}' is {} bytes, the manifest says {} (truncated or replaced)",
               dir_, name_, st.st_size, fe_.bytes);
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

  // Copies bytes [off, off + n) of the file to dst, read and checked.
  void copy(void* dst, std::uint64_t off, std::uint64_t n) {
    MT_ASSERT(off <= fe_.bytes && n <= fe_.bytes - off,
              "read of [{}, +{}) past the {} bytes of '{}'", off, n, fe_.bytes, path_);
    auto* out = static_cast<std::uint8_t*>(dst);
    if (fe_.blocks.empty()) {
      if (n > 0) std::memcpy(out, whole_.data() + off, n);
      return;
    }
    const std::uint64_t B = fe_.block_bytes;
    while (n > 0) {
      const std::uint64_t b = off / B;
      const std::uint64_t in = off - b * B;
      const std::uint64_t take = std::min(n, std::min(fe_.bytes, (b + 1) * B) - off);
      std::memcpy(out, block(b) + in, take);
      out += take;
      off += take;
      n -= take;
    }
  }

 private:
  // Block b, read and checked (or found among the last few read).
  const std::uint8_t* block(std::uint64_t b) {
    for (Cached& c : cache_)
      if (c.index == b) return c.bytes.data();
    Cached& c = cache_[next_++ % kCachedBlocks];
    const std::uint64_t B = fe_.block_bytes;
    const std::uint64_t lo = b * B, hi = std::min(fe_.bytes, lo + B);
    c.index = ~std::uint64_t{0};
    c.bytes.resize(hi - lo);
    const std::size_t got = read_at(fd_.get(), path_, c.bytes.data(), hi - lo, lo);
    *bytes_read_ += got;
    MT_CHECK(got == hi - lo, "checkpoint '{}': '{}' shrank while being read (at byte {} of {})",
             dir_, name_, lo + got, fe_.bytes);
    MT_CHECK(b < fe_.blocks.size(), "checkpoint '{}': '{}' has no checksum for block {}", dir_,
             name_, b);
    const std::uint32_t crc = crc32c(0, c.bytes.data(), hi - lo);
    MT_CHECK(crc == fe_.blocks[b],
             "checkpoint '{}': '{}' bytes [{}, {}) have CRC-32C {}, the manifest says {} (the "
             "file is corrupt)",
             dir_, name_, lo, hi, crc32c_hex(crc), crc32c_hex(fe_.blocks[b]));
    c.index = b;
    return c.bytes.data();
  }

  struct Cached {
    std::uint64_t index = ~std::uint64_t{0};
    std::vector<std::uint8_t> bytes;
  };

  std::string dir_, name_, path_;
  const FileEntry& fe_;
  std::uint64_t* bytes_read_;
  Fd fd_;
  std::string whole_;  // version 1: the whole file
  Cached cache_[kCachedBlocks];
  std::size_t next_ = 0;
  SafetensorsLayout layout_;
  std::map<std::string, std::size_t> index_;
};

// ---- saving, in three phases ----------------------------------------------------------------

// 1. World rank 0 prepares an empty temporary directory; every rank learns whether it could.
void prepare_directory(Mesh& mesh, const fs::path& root, const fs::path& tmp, int step) {
  std::string error;
  if (mesh.world_rank() == 0) {
    try {
      std::error_code ec;
      fs::create_directories(root, ec);
      if (ec)
        throw IoError(
            fmt::format("checkpoint: cannot create '{}': {}", root.string(), ec.message()));
      remove_tree(tmp);
      fs::create_directory(tmp, ec);
      if (ec)
        throw IoError(
            fmt::format("checkpoint: cannot create '{}': {}", tmp.string(), ec.message()));
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  if (mesh_max(mesh, error.empty() ? 0 : 1) != 0)
    throw IoError(mesh.world_rank() == 0
                      ? error
                      : fmt::format("checkpoint of step {}: rank 0 could not create '{}'", step,
                                    tmp.string()));
}

// This rank's shard file: its runs of every state, cut into pieces.
SavedFile write_shard(Mesh& mesh, const CheckpointWrite& w, const std::vector<FlatRun>& runs,
                      const std::vector<std::string>& kinds, const fs::path& tmp) {
  std::vector<Piece> mine =
      writer_pieces(w.slots, runs, kinds, mesh.tp_rank(), mesh.tp_size(), mesh.world_rank());
  // Tensors replicated over TP first: every TP rank of a resuming job reads them, and the
  // others' slices of the sharded ones are not in its way (blocks are read whole).
  std::set<std::string> replicated;
  for (const ParamSlot& s : w.slots)
    if (s.replicated()) replicated.insert(s.name);
  std::stable_partition(mine.begin(), mine.end(),
                        [&](const Piece& p) { return replicated.count(p.tensor) > 0; });
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const Piece& p : mine) {
    const FlatState& s = *std::find_if(w.states.begin(), w.states.end(),
                                       [&](const FlatState& f) { return f.kind == p.kind; });
    MT_ASSERT(s.data.dtype() == DType::kF32, "checkpoint: state '{}' is not fp32", s.kind);
    Tensor t = state_view(s, p.src, p.flat_hi - p.flat_lo);
    if (p.flat_lo == 0 && p.flat_hi == p.box.numel()) t = t.view(Shape(p.box.shape));
    tensors.emplace_back(p.key, t);
  }
  return save_safetensors((tmp / shard_file_name(mesh.world_rank())).string(), tensors,
                          {{"format", kFormat}, {"step", std::to_string(w.step)}}, kBlockBytes);
}

// What the ranks wrote, by world rank, as the manifest lists it.
struct Written {
  std::vector<std::vector<FlatRun>> runs;
  std::vector<FileEntry> files;
};

// 2. Every rank writes its shard file; every rank learns what each wrote, or that one failed
// (then the temporary directory is removed and every rank throws).
Written write_shards(Mesh& mesh, const CheckpointWrite& w, const std::vector<std::string>& kinds,
                     const fs::path& tmp) {
  const std::int64_t n = flat_numel(w.slots, "save_checkpoint");
  const std::vector<FlatRun> mine =
      w.writes.empty() ? default_writes(n, mesh.dp_rank(), mesh.dp_size()) : w.writes;
  Written out;
  out.runs = mesh_gather_runs(mesh, mine);
  SavedFile saved;
  std::string error;
  try {
    saved = write_shard(mesh, w, mine, kinds, tmp);
  } catch (const std::exception& e) {
    error = e.what();
    log::error("checkpoint of step {}: rank {} could not write its shard: {}", w.step,
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
    if (mesh.world_rank() == 0) remove_tree(tmp);
    throw IoError(
        fmt::format("checkpoint of step {} abandoned: rank(s) {} could not write their shard{}",
                    w.step, failed, error.empty() ? "" : ": " + error));
  }
  for (int r = 0; r < mesh.world_size(); ++r) {
    const std::size_t at = static_cast<std::size_t>(r) * 4;
    FileEntry& f = out.files.emplace_back();
    f.bytes =
        static_cast<std::uint64_t>(all[at + 2]) | (static_cast<std::uint64_t>(all[at + 3]) << 31);
    f.crc = static_cast<std::uint32_t>(all[at + 1]);
    f.block_bytes = kBlockBytes;
    for (std::int32_t c : all_blocks[static_cast<std::size_t>(r)])
      f.blocks.push_back(static_cast<std::uint32_t>(c));
  }
  return out;
}

// Removes old checkpoints beyond `keep`, and the leftovers of writes a crash interrupted.
void prune(const fs::path& root, const fs::path& tmp, int keep) {
  if (keep > 0) {
    const std::vector<std::string> all = list_checkpoints(root.string());
    for (std::size_t i = 0; i + static_cast<std::size_t>(keep) < all.size(); ++i)
      retire(root, all[i]);
  }
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const std::string n = e.path().filename().string();
    if ((n.rfind(".tmp-step_", 0) == 0 || n.rfind(".del-step_", 0) == 0) && e.path() != tmp)
      remove_tree(e.path());
  }
}

// 3. World rank 0 writes config.toml and the manifest, fsyncs them and the directory, renames it
// to its final name (then fsyncs the root) and prunes. Throws; the caller removes `tmp`.
void publish(Mesh& mesh, const CheckpointWrite& w, const Written& written,
             const std::vector<std::string>& kinds, const fs::path& root, const fs::path& tmp,
             const fs::path& final_dir) {
  ManifestContent c;
  c.step = w.step;
  c.world = mesh.world_size();
  c.dp = mesh.dp_size();
  c.tp = mesh.tp_size();
  c.zero = w.zero;
  c.state_json = w.state_json;
  // Every logical tensor once: under PP each stage's, in stage order, without tied copies.
  std::vector<ParamSlot> all_slots;
  if (w.stage_slots.empty()) {
    all_slots.assign(w.slots.begin(), w.slots.end());
  } else {
    MT_ASSERT(static_cast<int>(w.stage_slots.size()) == mesh.pp_size(),
              "checkpoint: {} stage layouts for {} stages", w.stage_slots.size(), mesh.pp_size());
    for (const auto& stage : w.stage_slots)
      for (const ParamSlot& s : stage)
        if (!s.tied_copy) all_slots.push_back(s);
  }
  c.slots = all_slots;
  const int per_stage = mesh.dp_size() * mesh.tp_size();
  for (int r = 0; r < mesh.world_size(); ++r) {
    c.files.emplace_back(shard_file_name(r), written.files[static_cast<std::size_t>(r)]);
    std::span<const ParamSlot> slots =
        w.stage_slots.empty()
            ? w.slots
            : std::span<const ParamSlot>(w.stage_slots[static_cast<std::size_t>(r / per_stage)]);
    const std::vector<Piece> pieces =
        writer_pieces(slots, written.runs[static_cast<std::size_t>(r)], kinds, r % mesh.tp_size(),
                      mesh.tp_size(), r);
    c.pieces.insert(c.pieces.end(), pieces.begin(), pieces.end());
  }
  const SavedFile cfg = write_text_file((tmp / "config.toml").string(), w.config_toml);
  c.files.emplace_back("config.toml", FileEntry{cfg.bytes, cfg.crc32c, 0, {}});
  write_text_file((tmp / "manifest.json").string(), manifest_json(c));
  fsync_dir(tmp.string());
  std::error_code ec;
  // Never a checkpoint replaced: the Trainer sets aside the newer checkpoints of a history it
  // abandons before it writes any (set_aside_checkpoints), so one here is another job's.
  if (fs::exists(final_dir, ec))
    throw IoError(fmt::format(
        "checkpoint: '{}' already exists (another job writing to the same checkpoint.dir?); "
        "not replacing it",
        final_dir.string()));
  fs::rename(tmp, final_dir, ec);
  if (ec)
    throw IoError(fmt::format("checkpoint: cannot rename '{}' to '{}': {}", tmp.string(),
                              final_dir.string(), ec.message()));
  fsync_dir(root.string());
  prune(root, tmp, w.keep);
}

// ---- loading --------------------------------------------------------------------------------

// Every tensor of the layout must be in the checkpoint with the same full shape (rows of
// layout-dependent padding excepted), and (but for a pipeline stage's) no other.
void check_tensors(const Manifest& m, std::span<const ParamSlot> slots, const std::string& w,
                   bool stage) {
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
  MT_CHECK(stage || m.tensors.size() == slots.size(), "{} holds {} tensors, the model has {}", w,
           m.tensors.size(), slots.size());
}

// Carries out a load plan: zeros, then every copy from the blocks of the shard files that hold
// it, in the order of the bytes in each file, so that every block is read once (the copies are
// independent: each target element is covered exactly once). Returns the shard files opened,
// with the bytes read.
std::map<std::string, std::unique_ptr<ShardReader>> read_plan(const Manifest& m,
                                                              const LoadPlan& plan,
                                                              const std::vector<Tensor>& dst,
                                                              const std::string& w,
                                                              std::uint64_t* bytes_read) {
  for (const ZeroRun& z : plan.zeros)
    std::fill_n(dst[z.target].data_as<float>() + z.dst, z.length, 0.0f);
  std::map<std::string, std::unique_ptr<ShardReader>> opened;
  std::vector<const SafetensorsEntry*> entries(m.pieces.size(), nullptr);
  struct Source {
    ShardReader* file;
    std::uint64_t offset;
    std::size_t copy;
  };
  std::vector<Source> order;
  order.reserve(plan.copies.size());
  for (std::size_t i = 0; i < plan.copies.size(); ++i) {
    const CopyRun& c = plan.copies[i];
    const Piece& p = m.pieces[c.piece];
    std::unique_ptr<ShardReader>& f = opened[p.file];
    if (!f) f = std::make_unique<ShardReader>(m, p.file, bytes_read);
    const SafetensorsEntry*& data = entries[c.piece];
    if (data == nullptr) {
      data = f->find(p.key);
      MT_CHECK(data != nullptr, "{}: '{}' has no tensor '{}' that the manifest lists", w, p.file,
               p.key);
      MT_CHECK(data->dtype == DType::kF32 && data->shape.numel() == p.flat_hi - p.flat_lo,
               "{}: '{}' tensor '{}' is {} {}, the manifest says F32 with {} elements", w, p.file,
               p.key, dtype_name(data->dtype), data->shape.str(), p.flat_hi - p.flat_lo);
    }
    order.push_back({f.get(), data->begin + static_cast<std::uint64_t>(c.src) * sizeof(float), i});
  }
  std::sort(order.begin(), order.end(), [](const Source& a, const Source& b) {
    return a.file != b.file ? std::less<ShardReader*>()(a.file, b.file) : a.offset < b.offset;
  });
  for (const Source& s : order) {
    const CopyRun& c = plan.copies[s.copy];
    s.file->copy(dst[c.target].data_as<float>() + c.dst, s.offset,
                 static_cast<std::uint64_t>(c.length) * sizeof(float));
  }
  return opened;
}

}  // namespace

std::string checkpoint_name(int step) {
  return fmt::format("step_{:08}", step);
}

std::string save_checkpoint(Mesh& mesh, const CheckpointWrite& w) {
  const fs::path root(w.root);
  const fs::path final_dir = root / checkpoint_name(w.step);
  const fs::path tmp = root / (".tmp-" + checkpoint_name(w.step));
  std::vector<std::string> kinds;
  for (const FlatState& s : w.states) kinds.push_back(s.kind);
  prepare_directory(mesh, root, tmp, w.step);
  const Written written = write_shards(mesh, w, kinds, tmp);
  std::string error;
  if (mesh.world_rank() == 0) {
    try {
      publish(mesh, w, written, kinds, root, tmp, final_dir);
    } catch (const std::exception& e) {
      error = e.what();
      remove_tree(tmp);
    }
  }
  if (mesh_max(mesh, error.empty() ? 0 : 1) != 0)
    throw IoError(
        mesh.world_rank() == 0
            ? error
            : fmt::format("checkpoint of step {}: rank 0 could not write the manifest", w.step));
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

std::vector<std::string> set_aside_checkpoints(const std::string& root, int step,
                                               const std::string& resumed_from) {
  std::error_code ec;
  const fs::path keep =
      resumed_from.empty() ? fs::path() : fs::weakly_canonical(fs::path(resumed_from), ec);
  std::vector<std::string> moved;
  fs::path into;
  for (const std::string& dir : list_checkpoints(root)) {
    const int s = parse_step_name(fs::path(dir).filename().string());
    if (s < step || (s == step && fs::weakly_canonical(fs::path(dir), ec) == keep)) continue;
    if (into.empty()) {
      const std::time_t now = std::time(nullptr);
      std::tm utc{};
      gmtime_r(&now, &utc);
      char stamp[32];
      std::strftime(stamp, sizeof stamp, "%Y%m%dT%H%M%SZ", &utc);
      into = fs::path(root) / (std::string("superseded-") + stamp);
      for (int i = 2; fs::exists(into, ec); ++i)
        into = fs::path(root) / fmt::format("superseded-{}-{}", stamp, i);
      fs::create_directory(into, ec);
      if (ec)
        throw IoError(
            fmt::format("checkpoint: cannot create '{}' to set aside the checkpoints "
                        "past step {}: {}",
                        into.string(), step, ec.message()));
    }
    const fs::path to = into / fs::path(dir).filename();
    fs::rename(dir, to, ec);
    if (ec)
      throw IoError(fmt::format("checkpoint: cannot move '{}' aside to '{}': {}", dir, to.string(),
                                ec.message()));
    moved.push_back(to.string());
  }
  if (!moved.empty()) fsync_dir(root);
  return moved;
}

CheckpointInfo read_checkpoint_info(const std::string& dir) {
  Manifest m = read_manifest(dir);
  m.info.config_toml = read_checked(m, "config.toml");
  return m.info;
}

void verify_checkpoint(const std::string& dir) {
  const Manifest m = read_manifest(dir);
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
                     const std::vector<FlatState>& targets, int tp_rank, int tp_size, bool stage) {
  const Manifest m = read_manifest(dir);
  const std::string w = "checkpoint '" + dir + "'";
  check_tensors(m, slots, w, stage);
  const std::int64_t n = flat_numel(slots, "load_checkpoint");
  // A target held as runs loads as one contiguous target per run.
  std::vector<LoadTarget> want;
  std::vector<Tensor> dst;
  for (const FlatState& t : targets) {
    MT_ASSERT(t.data.dtype() == DType::kF32 && t.data.is_cpu(),
              "checkpoint targets are fp32 CPU tensors");
    const std::vector<FlatRun> runs =
        t.runs.empty() ? std::vector<FlatRun>{{0, 0, t.data.numel()}} : t.runs;
    for (const FlatRun& r : runs) {
      want.push_back(LoadTarget{t.kind, r.flat, std::min(n, r.flat + r.length)});
      dst.push_back(t.data.slice(r.local, r.length));
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  const LoadPlan plan = plan_load(m.pieces, slots, want, tp_rank, tp_size, w);
  std::uint64_t bytes_read = 0;
  const auto opened = read_plan(m, plan, dst, w, &bytes_read);
  std::uint64_t file_bytes = 0;
  for (const auto& [name, f] : opened) file_bytes += m.files.at(name).bytes;
  log::info(
      "checkpoint '{}': read {:.2f} MiB of {} shard file(s) of {:.2f} MiB in {:.0f} ms", dir,
      static_cast<double>(bytes_read) / 1048576.0, opened.size(),
      static_cast<double>(file_bytes) / 1048576.0,
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
}

}  // namespace meshtrain::parallel
