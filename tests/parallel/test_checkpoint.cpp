// Distributed checkpoints at the format level, with threads as ranks (loopback): tensors sharded
// the Megatron way (column-parallel with fused QKV parts, row-parallel, vocabulary-parallel
// with layout-dependent padding, replicated), saved under one DP x TP layout and loaded under
// another, element for element; ZeRO-style partial ranges; latest and keep; refusals. The load
// planner alone, without files: resharding between layouts, whole-piece runs, padding,
// elements stored twice or missing.

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "comm/loopback.hpp"
#include "models/llama.hpp"
#include "parallel/checkpoint.hpp"
#include "parallel/checkpoint_geometry.hpp"
#include "parallel/checkpoint_manifest.hpp"
#include "runtime/checksum.hpp"
#include "runtime/error.hpp"

namespace meshtrain::parallel {
namespace {

namespace fs = std::filesystem;

constexpr int kC = 8;        // width: divisible by every TP size used (1, 2, 4)
constexpr int kVocab = 200;  // real rows of the embedding

int padded_vocab(int tp) {
  return (kVocab + 8 * tp - 1) / (8 * tp) * (8 * tp);
}

struct Spec {
  std::string name;
  std::vector<std::int64_t> full;
  int dim, parts;
  bool vocab;
};

std::vector<Spec> specs(int tp) {
  return {{"wte", {padded_vocab(tp), kC}, 0, 1, true},
          {"qkv.w", {3 * kC, kC}, 0, 3, false},
          {"qkv.b", {3 * kC}, 0, 3, false},
          {"proj.w", {kC, kC}, 1, 1, false},
          {"proj.b", {kC}, -1, 1, false},
          {"ln", {kC}, -1, 1, false}};
}

// The value of element `idx` (full coordinates, row-major) of tensor t, state kind k.
float value(int t, int k, std::int64_t row, std::int64_t col, bool vocab) {
  if (vocab && row >= kVocab) return 0.0f;  // padding rows are zero
  return static_cast<float>(t * 100000 + k * 10000) + static_cast<float>(row * 64 + col) * 0.5f;
}

struct Local {
  std::vector<ParamSlot> slots;
  std::int64_t n = 0;
  // Expected local flat values per kind.
  std::vector<std::vector<float>> expect;
};

const char* kKinds[] = {"master", "adam_m", "adam_v"};

// The shards TP rank r of tp holds, and their values, computed independently of the library.
Local make_local(int r, int tp) {
  Local L;
  L.expect.resize(3);
  const auto sp = specs(tp);
  for (std::size_t t = 0; t < sp.size(); ++t) {
    const Spec& s = sp[t];
    ParamSlot slot;
    slot.name = s.name;
    slot.full_shape = Shape(s.full);
    slot.shard_dim = s.dim;
    slot.shard_parts = s.parts;
    slot.real_rows = s.vocab ? kVocab : -1;
    std::vector<std::int64_t> local = s.full;
    if (s.dim >= 0) local[s.dim] /= tp;
    slot.shape = Shape(local);
    slot.offset = L.n;
    const std::int64_t rows = local.size() == 2 ? local[0] : 1, cols = local.back();
    for (int k = 0; k < 3; ++k)
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t j = 0; j < cols; ++j) {
          // Local (i, j) -> full (gi, gj).
          std::int64_t gi = i, gj = j;
          if (s.dim >= 0) {
            std::int64_t& li = local.size() == 2 ? (s.dim == 0 ? gi : gj) : gj;
            const std::int64_t x = local.size() == 2 ? (s.dim == 0 ? i : j) : j;
            const std::int64_t block = s.full[s.dim] / s.parts, slice = block / tp;
            li = (x / slice) * block + r * slice + x % slice;
          }
          L.expect[k].push_back(local.size() == 2 ? value(static_cast<int>(t), k, gi, gj, s.vocab)
                                                  : value(static_cast<int>(t), k, 0, gj, s.vocab));
        }
    L.n += slot.shape.numel();
    L.slots.push_back(slot);
  }
  return L;
}

Tensor floats(const std::vector<float>& v) {
  return Tensor::from_floats(v, Shape{static_cast<std::int64_t>(v.size())}, DType::kF32);
}

// Saves step `step` under dp x tp; the adam_m state is ZeRO-style (each rank holds only its
// 1/dp range, garbage elsewhere is not even allocated).
void save_layout(const std::string& root, int step, int dp, int tp, int keep = 0) {
  comm::LoopbackWorld world(dp * tp);
  world.run([&](comm::Communicator& c) {
    Mesh mesh(c, tp);
    const Local L = make_local(mesh.tp_rank(), tp);
    const std::int64_t chunk = (L.n + dp - 1) / dp, lo = std::min(L.n, chunk * mesh.dp_rank());
    std::vector<float> m(L.expect[1].begin() + lo, L.expect[1].begin() + std::min(L.n, lo + chunk));
    std::vector<FlatState> states{
        {"master", floats(L.expect[0]), {}},
        {"adam_m", floats(m), {{lo, 0, static_cast<std::int64_t>(m.size())}}},
        {"adam_v", floats(L.expect[2]), {}}};
    CheckpointWrite w;
    w.root = root;
    w.step = step;
    w.slots = L.slots;
    w.states = states;
    w.zero = 1;
    w.state_json = R"({"note": "test"})";
    w.config_toml = "[train]\nsteps = 1\n";
    w.keep = keep;
    save_checkpoint(mesh, w);
    mesh.finalize();
  });
}

// Loads into TP rank r of tp, the range [lo, lo + len) of each kind, and checks every element.
void check_load(const std::string& dir, int r, int tp, std::int64_t lo, std::int64_t len) {
  const Local L = make_local(r, tp);
  len = std::min(len, L.n - lo);
  std::vector<FlatState> targets;
  for (const char* k : kKinds)
    targets.push_back(
        FlatState{k,
                  Tensor::from_floats(std::vector<float>(static_cast<std::size_t>(len), -1.0f),
                                      Shape{len}, DType::kF32),
                  {{lo, 0, len}}});
  load_checkpoint(dir, L.slots, targets, r, tp);
  for (int k = 0; k < 3; ++k) {
    const float* got = targets[k].data.data_as<float>();
    for (std::int64_t i = 0; i < len; ++i)
      ASSERT_EQ(got[i], L.expect[k][lo + i])
          << dir << " kind " << kKinds[k] << " tp " << r << "/" << tp << " element " << lo + i;
  }
}

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("mt_ckpt_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST(Crc32c, KnownAnswerAndChaining) {
  EXPECT_EQ(crc32c(0, "123456789", 9), 0xE3069283u);  // the CRC-32C check value
  std::vector<std::uint8_t> big(100003);
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<std::uint8_t>(i * 7 + 3);
  const std::uint32_t whole = crc32c(0, big.data(), big.size());
  EXPECT_EQ(crc32c(crc32c(0, big.data(), 12345), big.data() + 12345, big.size() - 12345), whole);
}

TEST_F(CheckpointTest, EveryLayoutLoadsEveryOther) {
  const int layouts[][2] = {{1, 1}, {2, 2}, {3, 1}, {1, 4}, {2, 1}};
  int step = 1;
  for (const auto& saved : layouts) {
    save_layout(dir_.string(), step, saved[0], saved[1]);
    const std::string ck = (dir_ / checkpoint_name(step)).string();
    const CheckpointInfo info = read_checkpoint_info(ck);
    EXPECT_EQ(info.step, step);
    EXPECT_EQ(info.layout.dp, saved[0]);
    EXPECT_EQ(info.layout.tp, saved[1]);
    EXPECT_EQ(info.config_toml, "[train]\nsteps = 1\n");
    for (int tp : {1, 2, 4})
      for (int r = 0; r < tp; ++r) {
        const std::int64_t n = make_local(r, tp).n;
        check_load(ck, r, tp, 0, n);              // everything (no ZeRO)
        check_load(ck, r, tp, n / 3, n / 3 + 1);  // a ZeRO-style range
      }
    verify_checkpoint(ck);
    ++step;
  }
  EXPECT_EQ(latest_checkpoint(dir_.string()), (dir_ / checkpoint_name(step - 1)).string());
}

// ZeRO-1 as the trainer runs it: each DP rank owns interleaved runs of the flat buffer (a
// chunk of every bucket), holds its state only for those, and writes exactly them.
TEST_F(CheckpointTest, InterleavedOwnedPiecesRoundTrip) {
  const int dp = 3, tp = 2, piece = 7;
  comm::LoopbackWorld world(dp * tp);
  world.run([&](comm::Communicator& c) {
    Mesh mesh(c, tp);
    const Local L = make_local(mesh.tp_rank(), tp);
    std::vector<FlatRun> runs;
    std::vector<float> m;
    for (std::int64_t lo = piece * mesh.dp_rank(); lo < L.n; lo += piece * dp) {
      const std::int64_t hi = std::min(L.n, lo + piece);
      runs.push_back({lo, static_cast<std::int64_t>(m.size()), hi - lo});
      m.insert(m.end(), L.expect[1].begin() + lo, L.expect[1].begin() + hi);
    }
    std::vector<FlatState> states{{"master", floats(L.expect[0]), {}},
                                  {"adam_m", floats(m), runs},
                                  {"adam_v", floats(L.expect[2]), {}}};
    CheckpointWrite w;
    w.root = dir_.string();
    w.step = 5;
    w.slots = L.slots;
    w.states = states;
    w.writes = runs;
    w.zero = 1;
    w.state_json = "{}";
    save_checkpoint(mesh, w);
    mesh.finalize();
  });
  const std::string ck = (dir_ / checkpoint_name(5)).string();
  for (int t : {1, 2, 4})
    for (int r = 0; r < t; ++r) check_load(ck, r, t, 0, make_local(r, t).n);
  // Loading into runs: every other run of 5 elements.
  const Local L = make_local(1, 2);
  std::vector<FlatRun> runs;
  for (std::int64_t lo = 3, at = 0; lo < L.n; lo += 10, at += 5)
    runs.push_back({lo, at, std::min<std::int64_t>(5, L.n - lo)});
  Tensor data = Tensor::zeros(Shape{static_cast<std::int64_t>(runs.size()) * 5}, DType::kF32);
  load_checkpoint(ck, L.slots, {{"adam_v", data, runs}}, 1, 2);
  for (const FlatRun& r : runs)
    for (std::int64_t j = 0; j < r.length; ++j)
      ASSERT_EQ(data.data_as<float>()[r.local + j], L.expect[2][r.flat + j]) << r.flat + j;
}

TEST_F(CheckpointTest, LatestSkipsIncompleteAndKeepPrunes) {
  save_layout(dir_.string(), 2, 1, 1);
  // What a crash leaves: a temporary directory of a later step, and one being deleted.
  fs::create_directories(dir_ / ".tmp-step_00000009");
  std::ofstream(dir_ / ".tmp-step_00000009" / "shard-00000.safetensors") << "partial";
  fs::create_directories(dir_ / ".del-step_00000001");
  fs::create_directories(dir_ / "step_notanumber");
  EXPECT_EQ(latest_checkpoint(dir_.string()), (dir_ / "step_00000002").string());
  for (int s : {4, 6, 8}) save_layout(dir_.string(), s, 2, 1, /*keep=*/2);
  std::vector<std::string> names;
  for (const std::string& p : list_checkpoints(dir_.string()))
    names.push_back(fs::path(p).filename());
  EXPECT_EQ(names, (std::vector<std::string>{"step_00000006", "step_00000008"}));
  EXPECT_FALSE(fs::exists(dir_ / ".tmp-step_00000009"));  // cleaned by the next save
  EXPECT_FALSE(fs::exists(dir_ / ".del-step_00000001"));
  // Saving a step again is refused, and the checkpoint there stays as it was.
  // (One rank: the error it throws is rank 0's own.)
  try {
    save_layout(dir_.string(), 8, 1, 1, 2);
    ADD_FAILURE() << "saving step 8 again replaced it";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("already exists"), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_checkpoint_info((dir_ / "step_00000008").string()).layout.dp, 2);
  verify_checkpoint((dir_ / "step_00000008").string());
}

// A job starting at step S sets aside (moves, never deletes) the checkpoints past S, and one at
// S that is not the one it resumed from; latest then sees only what the new history keeps.
TEST_F(CheckpointTest, SetsAsideTheCheckpointsOfALongerHistory) {
  for (int step : {2, 4, 6}) save_layout(dir_.string(), step, 1, 1);
  const std::string from = (dir_ / "step_00000004").string();
  const std::vector<std::string> moved = set_aside_checkpoints(dir_.string(), 4, from + "/");
  ASSERT_EQ(moved.size(), 1u);
  const fs::path aside = fs::path(moved[0]);
  EXPECT_EQ(aside.filename(), "step_00000006");
  EXPECT_EQ(aside.parent_path().parent_path(), dir_);
  EXPECT_EQ(aside.parent_path().filename().string().rfind("superseded-", 0), 0u);
  verify_checkpoint(aside.string());  // whole, and still loadable by name
  EXPECT_EQ(read_checkpoint_info(aside.string()).step, 6);
  EXPECT_EQ(latest_checkpoint(dir_.string()), from);
  // Nothing past the start: nothing moved. A fresh start (0) sets aside everything.
  EXPECT_TRUE(set_aside_checkpoints(dir_.string(), 4, from).empty());
  EXPECT_EQ(set_aside_checkpoints(dir_.string(), 0, "").size(), 2u);
  EXPECT_EQ(latest_checkpoint(dir_.string()), "");
  // The same step, resumed from elsewhere: the one here is another history's.
  save_layout(dir_.string(), 4, 1, 1);
  EXPECT_EQ(set_aside_checkpoints(dir_.string(), 4, aside.string()).size(), 1u);
}

// The manifest's own checksum and its step: an edit by hand is refused, naming the file and the
// field, whatever it changed (the probe's: step 10 -> 7 inside step_00000010).
TEST_F(CheckpointTest, RefusesAnEditedManifest) {
  save_layout(dir_.string(), 10, 1, 1);
  const fs::path ck = dir_ / checkpoint_name(10);
  const fs::path mf = ck / "manifest.json";
  const std::string good = [&] {
    std::ifstream in(mf);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }();
  auto expect_error = [&](const std::string& text, const std::string& msg) {
    std::ofstream(mf, std::ios::trunc) << text;
    try {
      read_checkpoint_info(ck.string());
      ADD_FAILURE() << "expected an error containing '" << msg << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(msg), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(mf.string()), std::string::npos) << e.what();
    }
  };
  nlohmann::json j = nlohmann::json::parse(good);
  ASSERT_EQ(j["version"], 3);
  j["step"] = 7;
  expect_error(j.dump(), "step is 7, but its directory is 'step_00000010'");
  // Sealed again (a deliberate edit): the step still has to match the directory.
  expect_error(ckpt::seal_manifest(j.dump()), "step is 7, but its directory is 'step_00000010'");
  j = nlohmann::json::parse(good);
  j["state"]["seed"] = 1;
  expect_error(j.dump(), "manifest_crc32c is");
  j.erase("manifest_crc32c");
  expect_error(j.dump(), "missing 'manifest_crc32c'");
  // Whitespace and key order are not content.
  j = nlohmann::json::parse(good);
  std::ofstream(mf, std::ios::trunc) << j.dump(4);
  EXPECT_EQ(read_checkpoint_info(ck.string()).step, 10);
  // A copy under another name keeps the manifest's step; a renamed step_N directory is refused.
  std::ofstream(mf, std::ios::trunc) << good;
  fs::copy(ck, dir_ / "best", fs::copy_options::recursive);
  EXPECT_EQ(read_checkpoint_info((dir_ / "best").string()).step, 10);
  fs::rename(dir_ / "best", dir_ / "step_00000011");
  try {
    read_checkpoint_info((dir_ / "step_00000011").string());
    ADD_FAILURE() << "a renamed checkpoint loaded";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("step is 10, but its directory is 'step_00000011'"),
              std::string::npos)
        << e.what();
  }
}

TEST_F(CheckpointTest, RefusesBrokenManifests) {
  save_layout(dir_.string(), 3, 2, 1);
  const fs::path ck = dir_ / checkpoint_name(3);
  const fs::path mf = ck / "manifest.json";
  const std::string good = [&] {
    std::ifstream in(mf);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }();
  auto expect_error = [&](const std::function<void(nlohmann::json&)>& edit,
                          const std::string& msg) {
    nlohmann::json j = nlohmann::json::parse(good);
    edit(j);
    // Sealed: these edits test the checks behind the manifest's own checksum.
    std::ofstream(mf) << ckpt::seal_manifest(j.dump());
    try {
      const Local L = make_local(0, 1);
      std::vector<FlatState> t{{"master", Tensor::zeros(Shape{L.n}, DType::kF32), {}}};
      load_checkpoint(ck.string(), L.slots, t, 0, 1);
      ADD_FAILURE() << "expected an error containing '" << msg << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(msg), std::string::npos) << e.what();
    }
  };
  expect_error([](nlohmann::json& j) { j["pieces"].push_back(j["pieces"][0]); }, "stored twice");
  expect_error([](nlohmann::json& j) { j["pieces"][0]["offsets"][0] = 1 << 30; }, "leaves tensor");
  expect_error([](nlohmann::json& j) { j["pieces"][0]["flat"][1] = 1 << 30; },
               "not within the box");
  expect_error([](nlohmann::json& j) { j["pieces"][0]["file"] = "../../etc/passwd"; },
               "not in 'files'");
  expect_error([](nlohmann::json& j) { j["files"]["../x"] = j["files"]["config.toml"]; },
               "plain file name");
  expect_error([](nlohmann::json& j) { j["version"] = 4; }, "version 4 is not supported");
  expect_error([](nlohmann::json& j) { j["tensors"].erase("ln"); },
               "tensor 'ln' is not in 'tensors'");
  // Each block is checked as it is read: a wrong block checksum is named with its bytes.
  expect_error(
      [](nlohmann::json& j) {
        std::string b = j["files"]["shard-00001.safetensors"]["blocks"];
        b.replace(0, 8, b.substr(0, 8) == "00000000" ? "00000001" : "00000000");
        j["files"]["shard-00001.safetensors"]["blocks"] = b;
      },
      "'shard-00001.safetensors' bytes [0, ");
  expect_error([](nlohmann::json& j) { j["files"]["shard-00001.safetensors"]["blocks"] = "abc"; },
               "expected 1 CRC-32C values");
  // A version 1 manifest (a CRC-32C per whole file, no blocks) still loads, checked whole.
  expect_error(
      [](nlohmann::json& j) {
        j["version"] = 1;
        for (auto& [name, f] : j["files"].items()) {
          f.erase("blocks");
          f.erase("block_bytes");
        }
        j["files"]["shard-00001.safetensors"]["crc32c"] = "00000000";
      },
      "'shard-00001.safetensors' has CRC-32C");
  expect_error([](nlohmann::json& j) { j["files"]["shard-00000.safetensors"]["bytes"] = 5; },
               "the manifest says 5");
  // Dimensions each in range whose product overflows int64 (it did, in Box::numel()).
  expect_error(
      [](nlohmann::json& j) {
        j["tensors"]["ln"]["shape"] = {1ll << 40, 1ll << 40, 1ll << 40};
      },
      "tensors.ln.shape: [1099511627776,1099511627776,1099511627776] has more than 2^50 elements");
}

// Manifests as text: what a JSON parser would take silently or pay for later. Found or suggested
// by fuzzing (tests/fuzz, target checkpoint).
TEST_F(CheckpointTest, RefusesHostileManifestText) {
  save_layout(dir_.string(), 3, 2, 1);
  const fs::path ck = dir_ / checkpoint_name(3);
  const fs::path mf = ck / "manifest.json";
  const std::string good = [&] {
    std::ifstream in(mf);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }();
  auto expect_error = [&](const std::string& text, const std::string& msg) {
    std::ofstream(mf, std::ios::trunc) << text;
    try {
      const Local L = make_local(0, 1);
      std::vector<FlatState> t{{"master", Tensor::zeros(Shape{L.n}, DType::kF32), {}}};
      load_checkpoint(ck.string(), L.slots, t, 0, 1);
      ADD_FAILURE() << "expected an error containing '" << msg << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(msg), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(mf.string()), std::string::npos) << e.what();
    }
  };
  auto with = [&](const std::string& key, const std::string& insert) {
    std::string text = good;
    const auto at = text.find("\"" + key + "\":");
    EXPECT_NE(at, std::string::npos) << key;
    text.insert(at, insert);
    return text;
  };
  // A million levels of arrays in the caller's state: refused while parsing, not when the state
  // is dumped (recursively) later.
  const std::string deep = std::string(1000000, '[') + std::string(1000000, ']');
  expect_error(with("state", "\"deep\": " + deep + ",\n"), "more than 64 levels deep");
  // A file or tensor named twice: the JSON parser keeps one silently.
  expect_error(with("files", "\"files\": {},\n"), "the key 'files' appears twice");
  {
    nlohmann::json j = nlohmann::json::parse(good);
    std::string text = j.dump();
    const std::string key = "\"shard-00000.safetensors\":";
    const auto at = text.find(key);
    text.insert(at, key + j["files"]["shard-00000.safetensors"].dump() + ",");
    expect_error(text, "the key 'shard-00000.safetensors' appears twice");
  }
  expect_error(good.substr(0, good.size() / 2), "is not valid JSON (byte");
}

// ---- the load planner, without files -------------------------------------------------------

// Pieces as `dp` x `tp` ranks would write them (every rank of a TP group its default share),
// each with its stored values, computed from the same expected values the files would hold.
struct Saved {
  std::vector<ckpt::Piece> pieces;
  std::vector<std::vector<float>> data;  // per piece: its elements [flat_lo, flat_hi)
};

Saved saved_pieces(int dp, int tp, const char* kind) {
  Saved s;
  const int k =
      static_cast<int>(std::find_if(std::begin(kKinds), std::end(kKinds),
                                    [&](const char* x) { return std::string(x) == kind; }) -
                       std::begin(kKinds));
  for (int r = 0; r < dp * tp; ++r) {
    const int t = r % tp, d = r / tp;
    const Local L = make_local(t, tp);
    for (const ckpt::Piece& p :
         ckpt::writer_pieces(L.slots, ckpt::default_writes(L.n, d, dp), {kind}, t, tp, r)) {
      s.pieces.push_back(p);
      s.data.emplace_back(L.expect[k].begin() + p.src,
                          L.expect[k].begin() + p.src + (p.flat_hi - p.flat_lo));
    }
  }
  return s;
}

// Carries out a plan in memory: what load_checkpoint does with the files' bytes.
std::vector<float> apply(const ckpt::LoadPlan& plan, const Saved& s, std::int64_t len) {
  std::vector<float> out(static_cast<std::size_t>(len), -1.0f);
  for (const ckpt::ZeroRun& z : plan.zeros) std::fill_n(out.begin() + z.dst, z.length, 0.0f);
  for (const ckpt::CopyRun& c : plan.copies)
    std::copy_n(s.data[c.piece].begin() + c.src, c.length, out.begin() + c.dst);
  return out;
}

TEST(CheckpointPlan, EveryLayoutReshardsToEveryOther) {
  const int layouts[][2] = {{1, 1}, {2, 2}, {3, 1}, {1, 4}, {2, 1}};
  for (const auto& saved : layouts) {
    const Saved s = saved_pieces(saved[0], saved[1], "adam_v");
    for (int tp : {1, 2, 4})
      for (int r = 0; r < tp; ++r) {
        const Local L = make_local(r, tp);
        // Everything, and a ZeRO-style range that starts and ends inside tensors.
        for (const auto& [lo, hi] :
             {std::pair<std::int64_t, std::int64_t>{0, L.n}, {L.n / 3, L.n / 3 + L.n / 5}}) {
          const std::vector<ckpt::LoadTarget> targets{{"adam_v", lo, hi}};
          const ckpt::LoadPlan plan = ckpt::plan_load(s.pieces, L.slots, targets, r, tp, "test");
          const std::vector<float> got = apply(plan, s, hi - lo);
          for (std::int64_t i = lo; i < hi; ++i)
            ASSERT_EQ(got[i - lo], L.expect[2][i])
                << "saved " << saved[0] << "x" << saved[1] << ", loaded tp " << r << "/" << tp
                << ", element " << i;
        }
      }
  }
}

// The same layout reads each piece as one run: a piece's box is the target's, so its rows are
// contiguous in both and merge.
TEST(CheckpointPlan, TheSameLayoutCopiesEachPieceWhole) {
  const Saved s = saved_pieces(1, 2, "master");
  const Local L = make_local(1, 2);
  const std::vector<ckpt::LoadTarget> targets{{"master", 0, L.n}};
  const ckpt::LoadPlan plan = ckpt::plan_load(s.pieces, L.slots, targets, 1, 2, "test");
  std::size_t mine = 0;
  for (const ckpt::Piece& p : s.pieces)
    if (p.file == ckpt::shard_file_name(1)) ++mine;
  // TP rank 1's own pieces, and the replicated tensors TP rank 0 wrote: one run each.
  EXPECT_EQ(plan.copies.size(), mine + 1) << "proj.b is written by TP rank 0, ln by rank 1";
  for (const ckpt::CopyRun& c : plan.copies) {
    const ckpt::Piece& p = s.pieces[c.piece];
    if (p.tensor == "wte") continue;  // padding rows are zeros, not copied
    EXPECT_EQ(c.length, p.flat_hi - p.flat_lo) << p.key;
  }
}

TEST(CheckpointPlan, PaddingRowsAreZerosNotReads) {
  // Saved at TP = 1 (wte: the 200 real rows), loaded by TP rank 3 of 4, whose wte shard ends
  // in rows past the real vocabulary: zeros in the plan, and no copy writes them.
  const Saved s = saved_pieces(1, 1, "master");
  const Local L = make_local(3, 4);
  const std::vector<ckpt::LoadTarget> targets{{"master", 0, L.n}};
  const ckpt::LoadPlan plan = ckpt::plan_load(s.pieces, L.slots, targets, 3, 4, "test");
  const std::int64_t first_row = 3 * padded_vocab(4) / 4;
  ASSERT_EQ(plan.zeros.size(), 1u);
  EXPECT_EQ(plan.zeros[0].dst, (kVocab - first_row) * kC);
  EXPECT_EQ(plan.zeros[0].length, std::int64_t{padded_vocab(4) - kVocab} * kC);
  for (const ckpt::CopyRun& c : plan.copies)
    EXPECT_FALSE(c.dst < plan.zeros[0].dst + plan.zeros[0].length &&
                 plan.zeros[0].dst < c.dst + c.length);
}

TEST(CheckpointPlan, RefusesElementsStoredTwiceOrNotAtAll) {
  Saved s = saved_pieces(2, 1, "master");
  const Local L = make_local(0, 1);
  const std::vector<ckpt::LoadTarget> targets{{"master", 0, L.n}};
  auto expect_error = [&](const std::vector<ckpt::Piece>& pieces, const std::string& msg) {
    try {
      ckpt::plan_load(pieces, L.slots, targets, 0, 1, "test");
      ADD_FAILURE() << "expected an error containing '" << msg << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(msg), std::string::npos) << e.what();
    }
  };
  std::vector<ckpt::Piece> twice = s.pieces;
  twice.push_back(s.pieces[3]);
  expect_error(twice, "is stored twice");
  std::vector<ckpt::Piece> missing = s.pieces;
  missing.erase(missing.begin() + 2);
  expect_error(missing, "the checkpoint is incomplete");
}

// A Llama with fewer KV heads than TP ranks (llama-tiny: 4 heads, 2 KV heads; Qwen2's k/v biases
// too): saved at TP 4, where each KV slice is held by two ranks, every slice is written once
// (plan_load refuses an element stored twice), and DP 2 x TP 4, TP 2 and TP 1 layouts load it,
// and TP 4 loads what TP 1 and TP 2 saved; every element is the full tensor's.
TEST(CheckpointPlan, ReplicatedKvHeadsAreWrittenOnceAndReshard) {
  models::LlamaConfig cfg = models::LlamaConfig::preset("llama-tiny");
  cfg.n_layer = 1;
  cfg.arch = "qwen2";
  cfg.qkv_bias = true;
  cfg.padded_vocab = models::GPTConfig::pad_vocab(cfg.vocab_size, 128 * 4);
  // Element i of tensor t of the TP = 1 layout holds t * 2^20 + i (exact in fp32 here).
  const std::vector<models::ParamInfo> whole = models::Llama::param_layout(cfg, 1);
  std::map<std::string, Tensor> full;
  for (std::size_t t = 0; t < whole.size(); ++t) {
    std::vector<float> v(static_cast<std::size_t>(whole[t].numel()));
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>((t << 20) + i);
    // Rows past the real vocabulary are layout padding, loaded as zeros.
    if (whole[t].real_rows >= 0)
      std::fill(v.begin() + whole[t].real_rows * whole[t].full_shape[1], v.end(), 0.0f);
    full[whole[t].name] = Tensor::from_floats(v, whole[t].full_shape, DType::kF32);
  }
  auto local = [&](int rank, int tp) {
    const std::vector<models::ParamInfo> slots = models::Llama::param_layout(cfg, tp);
    Tensor flat = Tensor::zeros(Shape{flat_numel(slots, "test")}, DType::kF32);
    for (const models::ParamInfo& s : slots) {
      Tensor mine = slot_view(flat, s);
      copy_slot_shard(mine, full.at(s.name), s, rank, tp);
    }
    return std::make_pair(slots, flat.to_floats());
  };
  auto save = [&](int dp, int tp) {
    Saved out;
    for (int r = 0; r < dp * tp; ++r) {
      const auto [slots, values] = local(r % tp, tp);
      const auto runs = ckpt::default_writes(static_cast<std::int64_t>(values.size()), r / tp, dp);
      for (const ckpt::Piece& p : ckpt::writer_pieces(slots, runs, {"master"}, r % tp, tp, r)) {
        out.pieces.push_back(p);
        out.data.emplace_back(values.begin() + p.src,
                              values.begin() + p.src + (p.flat_hi - p.flat_lo));
      }
    }
    return out;
  };
  const Saved at4 = save(2, 4);
  std::map<std::string, std::int64_t> written;
  for (const ckpt::Piece& p : at4.pieces) written[p.tensor] += p.flat_hi - p.flat_lo;
  for (const models::ParamInfo& s : whole) {
    if (s.name.find("k_proj") != std::string::npos || s.name.find("v_proj") != std::string::npos) {
      EXPECT_EQ(written[s.name], s.full_shape.numel()) << s.name << " written once at TP 4";
    }
  }
  const Saved at1 = save(1, 1), at2 = save(1, 2);
  for (const auto& [saved, tp] :
       {std::pair<const Saved*, int>{&at4, 1}, {&at4, 2}, {&at4, 4}, {&at1, 4}, {&at2, 4}}) {
    for (int r = 0; r < tp; ++r) {
      const auto [slots, want] = local(r, tp);
      const std::int64_t n = static_cast<std::int64_t>(want.size());
      const std::vector<ckpt::LoadTarget> targets{{"master", 0, n}};
      const ckpt::LoadPlan plan = ckpt::plan_load(saved->pieces, slots, targets, r, tp, "test");
      const std::vector<float> got = apply(plan, *saved, n);
      std::int64_t bad = 0;
      while (bad < n && got[static_cast<std::size_t>(bad)] == want[static_cast<std::size_t>(bad)])
        ++bad;
      EXPECT_EQ(bad, n) << "TP " << tp << " rank " << r << ": the first wrong element";
    }
  }
}

}  // namespace
}  // namespace meshtrain::parallel
