#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "runtime/checksum.hpp"
#include "runtime/safetensors.hpp"

namespace meshtrain {
namespace {

namespace fs = std::filesystem;

class Safetensors : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           fmt::format("meshtrain_safetensors_{}_{}", ::getpid(),
                       ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string file(const std::string& name) const { return (dir_ / name).string(); }

  fs::path dir_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(std::uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(n >> (8 * i));
  return s;
}

// A file made of a header (with its true length) and data bytes.
std::string raw_file(const std::string& header, std::size_t data_bytes) {
  return le64(header.size()) + header + std::string(data_bytes, '\x01');
}

std::vector<float> random_floats(std::size_t n, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

// Expects InvalidArgument whose message names the file and contains every fragment.
void expect_invalid(const std::string& path, const std::vector<std::string>& fragments,
                    const std::string& label) {
  try {
    load_safetensors(path);
    ADD_FAILURE() << label << ": the file was accepted";
  } catch (const InvalidArgument& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << label << ": " << msg;
    for (const std::string& f : fragments)
      EXPECT_NE(msg.find(f), std::string::npos) << label << ": expected '" << f << "' in: " << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << label << ": expected InvalidArgument, got: " << e.what();
  }
}

TEST_F(Safetensors, RoundTripsEveryDtypeShapeAndMetadata) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  tensors.emplace_back(
      "z.fp32", Tensor::from_floats(random_floats(2 * 3 * 5, 1), Shape{2, 3, 5}, DType::kF32));
  tensors.emplace_back("a.bf16",
                       Tensor::from_floats(random_floats(13, 2), Shape{13}, DType::kBF16));
  tensors.emplace_back("m.fp16",
                       Tensor::from_floats(random_floats(7 * 3, 3), Shape{7, 3}, DType::kF16));
  tensors.emplace_back("ids", Tensor::from_ints({-5, 0, 7, 2147483647, -2147483647 - 1}, Shape{5}));
  tensors.emplace_back("scalar", Tensor::from_floats({2.5f}, Shape{}, DType::kF32));
  tensors.emplace_back("empty", Tensor::empty(Shape{0, 4}, DType::kBF16));
  tensors.emplace_back("unicode \xce\xbb", Tensor::from_floats({1, 2}, Shape{1, 2}, DType::kF16));
  const std::map<std::string, std::string> meta{{"format", "pt"}, {"step", "12"}, {"empty", ""}};

  const std::string path = file("model.safetensors");
  save_safetensors(path, tensors, meta);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  // The data section starts 8-byte aligned.
  const std::string bytes = read_bytes(path);
  std::uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i)
    header_len |= static_cast<std::uint64_t>(static_cast<std::uint8_t>(bytes[i])) << (8 * i);
  EXPECT_EQ(header_len % 8, 0u);

  const SafetensorsFile loaded = load_safetensors(path);
  EXPECT_EQ(loaded.path, path);
  EXPECT_EQ(loaded.metadata, meta);
  ASSERT_EQ(loaded.tensors.size(), tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_EQ(loaded.tensors[i].first, tensors[i].first) << "order is the order of saving";
    EXPECT_TRUE(loaded.tensors[i].second.is_cpu());
    EXPECT_TRUE(same_bytes(loaded.tensors[i].second, tensors[i].second)) << tensors[i].first;
  }
  EXPECT_TRUE(same_bytes(loaded.at("m.fp16"), tensors[2].second));
  EXPECT_EQ(loaded.find("missing"), nullptr);
  try {
    loaded.at("missing");
    ADD_FAILURE() << "at() of a missing name returned";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("'missing'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

TEST_F(Safetensors, EmptyFileHasNoTensorsAndNoMetadata) {
  const std::string path = file("empty.safetensors");
  save_safetensors(path, {}, {});
  const SafetensorsFile loaded = load_safetensors(path);
  EXPECT_TRUE(loaded.tensors.empty());
  EXPECT_TRUE(loaded.metadata.empty());
}

// Block checksums cover the file's bytes exactly, and the layout alone (read through a callback
// that sees only the header's bytes) says where each tensor's bytes are.
TEST_F(Safetensors, BlockChecksumsAndLayoutWithoutTheData) {
  Tensor a = Tensor::from_floats(random_floats(300, 5), Shape{30, 10}, DType::kF32);
  Tensor b = Tensor::from_floats(random_floats(77, 6), Shape{77}, DType::kBF16);
  const std::string path = file("blocks.safetensors");
  const SavedFile saved = save_safetensors(path, {{"a", a}, {"b", b}}, {{"k", "v"}}, 100);
  const std::string bytes = read_bytes(path);
  ASSERT_EQ(saved.bytes, bytes.size());
  ASSERT_EQ(saved.block_crc32c.size(), (bytes.size() + 99) / 100);
  for (std::size_t k = 0; k < saved.block_crc32c.size(); ++k)
    EXPECT_EQ(saved.block_crc32c[k],
              crc32c(0, bytes.data() + 100 * k, std::min<std::size_t>(100, bytes.size() - 100 * k)))
        << "block " << k;
  EXPECT_EQ(saved.crc32c, crc32c(0, bytes.data(), bytes.size()));
  std::uint64_t furthest = 0;
  const SafetensorsLayout layout =
      read_safetensors_layout(path, bytes.size(), [&](void* dst, std::size_t n, std::uint64_t off) {
        furthest = std::max<std::uint64_t>(furthest, off + n);
        std::memcpy(dst, bytes.data() + off, n);
      });
  ASSERT_EQ(layout.entries.size(), 2u);
  EXPECT_EQ(layout.metadata.at("k"), "v");
  const SafetensorsEntry* ea = layout.find("a");
  ASSERT_NE(ea, nullptr);
  EXPECT_EQ(ea->shape, a.shape());
  EXPECT_EQ(ea->end - ea->begin, a.nbytes());
  EXPECT_EQ(std::memcmp(bytes.data() + ea->begin, a.data(), a.nbytes()), 0);
  EXPECT_EQ(layout.find("b")->dtype, DType::kBF16);
  EXPECT_EQ(layout.find("missing"), nullptr);
  EXPECT_LE(furthest, ea->begin);  // only the header was read
}

TEST_F(Safetensors, ViewsAreSavedAsTheirOwnRange) {
  Tensor big = Tensor::from_floats(random_floats(6 * 4, 4), Shape{6, 4}, DType::kF32);
  const std::string path = file("view.safetensors");
  save_safetensors(path, {{"rows", big.slice(2, 3)}});
  const SafetensorsFile loaded = load_safetensors(path);
  EXPECT_TRUE(same_bytes(loaded.at("rows"), big.slice(2, 3).clone()));
}

TEST_F(Safetensors, BadArgumentsToSaveLeaveTheOldFileAlone) {
  const std::string path = file("keep.safetensors");
  Tensor t = Tensor::from_floats({1, 2, 3}, Shape{3}, DType::kF32);
  save_safetensors(path, {{"t", t}});
  const std::string before = read_bytes(path);
  const std::vector<std::pair<std::string, std::vector<std::pair<std::string, Tensor>>>> bad{
      {"undefined", {{"u", Tensor()}}},
      {"appears twice", {{"t", t}, {"t", t}}},
      {"reserved", {{"__metadata__", t}}},
      {"not valid UTF-8", {{"bad \xff name", t}}},
  };
  for (const auto& [fragment, tensors] : bad) {
    try {
      save_safetensors(path, tensors);
      ADD_FAILURE() << fragment << ": accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
    EXPECT_EQ(read_bytes(path), before) << fragment;
    EXPECT_FALSE(fs::exists(path + ".tmp")) << fragment;
  }
}

TEST_F(Safetensors, OsFailuresAreIoErrorsNamingTheFile) {
  const std::string missing_dir = file("no/such/dir/x.safetensors");
  try {
    save_safetensors(missing_dir, {{"t", Tensor::from_floats({1}, Shape{1}, DType::kF32)}});
    ADD_FAILURE() << "save into a missing directory succeeded";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find(missing_dir), std::string::npos) << e.what();
  }
  const std::string missing = file("missing.safetensors");
  try {
    load_safetensors(missing);
    ADD_FAILURE() << "load of a missing file succeeded";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("No such file"), std::string::npos) << e.what();
  }
  expect_invalid(dir_.string(), {"not a regular file"}, "directory");
}

// One corrupt file per way the header can lie; each must be refused with a clear message.
TEST_F(Safetensors, CorruptFilesAreRefusedWithClearErrors) {
  const std::string ok_entry = R"("t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]})";
  const std::string ok = raw_file("{" + ok_entry + "}", 16);
  ASSERT_NO_THROW({
    write_bytes(file("ok"), ok);
    load_safetensors(file("ok"));
  });
  auto entry = [](const std::string& body) { return "{\"t\": " + body + "}"; };

  struct Case {
    std::string label;
    std::string bytes;
    std::vector<std::string> fragments;
  };
  const std::vector<Case> cases{
      {"empty file", "", {"0 bytes long", "too short"}},
      {"7 bytes", std::string(7, '\0'), {"7 bytes long"}},
      {"truncated in the header", ok.substr(0, 20), {"only 12 bytes follow", "truncated"}},
      {"truncated in the data",
       ok.substr(0, ok.size() - 3),
       {"tensor 't'", "past the end of the data section (13 bytes)"}},
      {"header length past EOF", le64(1000) + "{}", {"says 1000 bytes", "only 2 bytes follow"}},
      {"header length 2^63", le64(1ull << 63) + "{}", {"says 9223372036854775808 bytes"}},
      {"header length 0", le64(0), {"too short for a JSON object"}},
      {"bad JSON",
       raw_file(R"({"t": {"dtype": "F32",, "shape": [4]}})", 16),
       {"JSON header is invalid at byte offset 30"}},
      {"not JSON at all", raw_file("hello, world", 0), {"JSON header is invalid at byte offset 8"}},
      {"invalid UTF-8", raw_file("{\"t\xff\": {}}", 0), {"JSON header is invalid"}},
      {"a key twice in an entry",
       raw_file(entry(R"({"dtype": "F32", "shape": [4], "dtype": "I32", "data_offsets": [0, 16]})"),
                16),
       {"an entry of the header has the key 'dtype' twice"}},
      // A number beyond double's range escaped as nlohmann's out_of_range (found by fuzzing).
      {"number overflow",
       raw_file(entry(R"({"dtype": "F32", "shape": [1e999], "data_offsets": [0, 16]})"), 16),
       {"JSON header is invalid", "number overflow"}},
      {"header is an array", raw_file("[1, 2]", 0), {"the header is a JSON array"}},
      {"entry not an object", raw_file(R"({"t": [1, 2]})", 0), {"entry 't' is a JSON array"}},
      {"unknown dtype",
       raw_file(entry(R"({"dtype": "F64", "shape": [2], "data_offsets": [0, 16]})"), 16),
       {"dtype 'F64'", "expected one of F32, BF16, F16, I32"}},
      {"torch dtype name",
       raw_file(entry(R"({"dtype": "float32", "shape": [4], "data_offsets": [0, 16]})"), 16),
       {"dtype 'float32'"}},
      {"dtype not a string",
       raw_file(entry(R"({"dtype": 7, "shape": [4], "data_offsets": [0, 16]})"), 16),
       {"dtype 7, expected a string"}},
      {"missing shape",
       raw_file(entry(R"({"dtype": "F32", "data_offsets": [0, 16]})"), 16),
       {"tensor 't' has no 'shape'"}},
      {"unknown key",
       raw_file(entry(R"({"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "x": 1})"), 16),
       {"unknown key 'x'"}},
      {"offsets past the data",
       raw_file(entry(R"({"dtype": "F32", "shape": [4], "data_offsets": [16, 32]})"), 16),
       {"data_offsets [16, 32] past the end of the data section (16 bytes)"}},
      {"offsets reversed",
       raw_file(entry(R"({"dtype": "F32", "shape": [0], "data_offsets": [16, 0]})"), 16),
       {"begin after end"}},
      {"offsets huge",
       raw_file(
           entry(
               R"({"dtype": "F32", "shape": [4], "data_offsets": [18446744073709551600, 18446744073709551615]})"),
           16),
       {"past the end of the data section"}},
      {"offsets negative",
       raw_file(entry(R"({"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]})"), 16),
       {"negative data offset (-16)"}},
      {"offsets not a pair",
       raw_file(entry(R"({"dtype": "F32", "shape": [4], "data_offsets": [0]})"), 16),
       {"expected [begin, end]"}},
      {"overlap",
       raw_file(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, )"
                R"("b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})",
                24),
       {"tensor 'b' at data bytes [8, 24) overlaps tensor 'a' at [0, 16)"}},
      {"same range twice",
       raw_file(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, )"
                R"("b": {"dtype": "I32", "shape": [4], "data_offsets": [0, 16]}})",
                16),
       {"overlaps"}},
      {"gap",
       raw_file(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, )"
                R"("b": {"dtype": "F32", "shape": [4], "data_offsets": [20, 36]}})",
                36),
       {"data bytes [16, 20) belong to no tensor"}},
      {"trailing bytes",
       raw_file("{" + ok_entry + "}", 20),
       {"20 bytes but the tensors cover only 16"}},
      {"shape/size mismatch",
       raw_file(entry(R"({"dtype": "F32", "shape": [3], "data_offsets": [0, 16]})"), 16),
       {"F32[3] (12 bytes)", "hold 16 bytes"}},
      {"dtype/size mismatch",
       raw_file(entry(R"({"dtype": "BF16", "shape": [4], "data_offsets": [0, 16]})"), 16),
       {"BF16[4] (8 bytes)"}},
      {"negative dim",
       raw_file(entry(R"({"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]})"), 16),
       {"negative dimension (-1)"}},
      {"fractional dim",
       raw_file(entry(R"({"dtype": "F32", "shape": [2.5], "data_offsets": [0, 16]})"), 16),
       {"dimension of 2.5"}},
      {"string dim",
       raw_file(entry(R"({"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]})"), 16),
       {"dimension of \"4\""}},
      {"shape not an array",
       raw_file(entry(R"({"dtype": "F32", "shape": 4, "data_offsets": [0, 16]})"), 16),
       {"shape 4, expected an array"}},
      {"too many dims",
       raw_file(entry(R"({"dtype": "F32", "shape": [1,1,1,1,1,1,4], "data_offsets": [0, 16]})"),
                16),
       {"7 dimensions, at most 6"}},
      {"numel overflow",
       raw_file(
           entry(
               R"({"dtype": "F32", "shape": [4294967296, 4294967296, 4], "data_offsets": [0, 16]})"),
           16),
       {"overflows 64 bits"}},
      {"bytes overflow",
       raw_file(
           entry(R"({"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [0, 16]})"),
           16),
       {"too large"}},
      {"zero dim hides a huge one",
       raw_file(
           entry(R"({"dtype": "F32", "shape": [0, 18446744073709551615], "data_offsets": [0, 0]})"),
           0),
       {"overflows 64 bits"}},
      {"duplicate name",
       raw_file(R"({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, )"
                R"("t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})",
                16),
       {"names 't' twice"}},
      {"metadata not an object",
       raw_file(R"({"__metadata__": [1]})", 0),
       {"__metadata__ is a JSON array"}},
      {"metadata value not a string",
       raw_file(R"({"__metadata__": {"step": 3}})", 0),
       {"__metadata__ key 'step' holds a JSON number, expected a string"}},
      {"deep nesting",
       raw_file("{\"t\": " + std::string(100000, '[') + std::string(100000, ']') + "}", 0),
       {"levels deep"}},
  };
  for (const Case& c : cases) {
    const std::string path = file("corrupt.safetensors");
    write_bytes(path, c.bytes);
    expect_invalid(path, c.fragments, c.label);
  }
}

TEST_F(Safetensors, HeaderLengthAboveTheCapIsRefusedBeforeAllocating) {
  // A sparse 200 MB file whose header length claims 150 MB: within the file, above the cap.
  const std::string path = file("huge.safetensors");
  write_bytes(path, le64(150'000'000) + "{}");
  fs::resize_file(path, 200'000'000);
  expect_invalid(path, {"header length 150000000 exceeds the limit of 100000000 bytes"}, "cap");
}

// Every truncation and many random byte changes of a valid file either load or raise
// InvalidArgument: never a crash, another exception, or a huge allocation.
TEST_F(Safetensors, MutatedFilesNeverCrash) {
  const std::string path = file("m.safetensors");
  save_safetensors(path,
                   {{"w", Tensor::from_floats(random_floats(12, 5), Shape{3, 4}, DType::kBF16)},
                    {"b", Tensor::from_floats(random_floats(4, 6), Shape{4}, DType::kF32)}},
                   {{"k", "v"}});
  const std::string good = read_bytes(path);
  int count = 0;
  auto try_load = [&](const std::string& bytes, const std::string& label) {
    // A new file each time: rewriting one file in place is slow on some filesystems.
    const std::string mutated = file(fmt::format("mutated{}.safetensors", count++));
    write_bytes(mutated, bytes);
    try {
      load_safetensors(mutated);
    } catch (const InvalidArgument&) {
    } catch (const std::exception& e) {
      ADD_FAILURE() << label << ": unexpected " << e.what();
    }
  };
  for (std::size_t n = 0; n < good.size(); ++n) try_load(good.substr(0, n), "truncated");
  std::mt19937 gen(1234);
  std::uniform_int_distribution<std::size_t> pos(0, good.size() - 1);
  const std::string interesting = "{}[]\":,-0123456789eE. \xff";
  std::uniform_int_distribution<std::size_t> pick(0, interesting.size() - 1);
  for (int i = 0; i < 3000; ++i) {
    std::string bytes = good;
    for (int k = 0; k <= i % 3; ++k) bytes[pos(gen)] = interesting[pick(gen)];
    try_load(bytes, fmt::format("mutation {}", i));
  }
}

// Files interoperate with Python: read with json + struct + torch.frombuffer (Debian has no
// safetensors package), and a file written by Python that way reads back here.
TEST_F(Safetensors, InteroperatesWithPython) {
  // Values exactly representable in every dtype, so both sides can compare exactly.
  auto values = [](std::size_t n) {
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i)
      v[i] = static_cast<float>(static_cast<int>(i * 37 % 101) - 50) / 8.0f;
    return v;
  };
  const std::string from_cpp = file("from_cpp.safetensors");
  const std::string from_py = file("from_py.safetensors");
  save_safetensors(from_cpp,
                   {{"f32", Tensor::from_floats(values(2 * 3 * 5), Shape{2, 3, 5}, DType::kF32)},
                    {"bf16", Tensor::from_floats(values(13), Shape{13}, DType::kBF16)},
                    {"f16", Tensor::from_floats(values(12), Shape{4, 3}, DType::kF16)},
                    {"i32", Tensor::from_ints({3, -1, 50303, -2147483647 - 1}, Shape{2, 2})},
                    {"empty", Tensor::empty(Shape{0, 3}, DType::kF32)}},
                   {{"format", "pt"}, {"note", "written by meshtrain"}});

  const std::string script = R"PY(
import json, struct, sys, torch
src, dst = sys.argv[1], sys.argv[2]
DT = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I32": torch.int32}
with open(src, "rb") as f:
    blob = f.read()
(n,) = struct.unpack("<Q", blob[:8])
header = json.loads(blob[8:8 + n])
data = blob[8 + n:]
meta = header.pop("__metadata__")
assert meta == {"format": "pt", "note": "written by meshtrain"}, meta
def load(name):
    e = header[name]
    b, end = e["data_offsets"]
    if b == end:
        return torch.empty(e["shape"], dtype=DT[e["dtype"]])
    return torch.frombuffer(bytearray(data[b:end]), dtype=DT[e["dtype"]]).reshape(e["shape"])
def values(n):
    return torch.tensor([((i * 37) % 101 - 50) / 8.0 for i in range(n)], dtype=torch.float64)
expect = {"f32": values(30).reshape(2, 3, 5).float(), "bf16": values(13).bfloat16(),
          "f16": values(12).reshape(4, 3).half(),
          "i32": torch.tensor([[3, -1], [50303, -2**31]], dtype=torch.int32),
          "empty": torch.empty(0, 3)}
assert list(header) == list(expect), list(header)
for name, want in expect.items():
    got = load(name)
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, got.shape)
    assert torch.equal(got, want), (name, got, want)
# Write back in Hugging Face's layout: keys sorted, header padded with spaces to 8 bytes.
out = {"py_bf16": values(6).reshape(2, 3).bfloat16(),
       "py_i32": torch.arange(-2, 3, dtype=torch.int32)}
hdr, chunks, off = {"__metadata__": {"from": "python"}}, [], 0
for name, t in out.items():
    raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
    hdr[name] = {"dtype": {v: k for k, v in DT.items()}[t.dtype], "shape": list(t.shape),
                 "data_offsets": [off, off + len(raw)]}
    chunks.append(raw)
    off += len(raw)
text = json.dumps(hdr, sort_keys=True).encode()
text += b" " * (-len(text) % 8)
with open(dst, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))
)PY";
  const std::string script_path = file("interop.py");
  write_bytes(script_path, script);
  const std::string cmd = fmt::format("'{}' '{}' '{}' '{}' 2>&1", MESHTRAIN_TORCH_PYTHON,
                                      script_path, from_cpp, from_py);
  FILE* pipe = ::popen(cmd.c_str(), "r");
  ASSERT_NE(pipe, nullptr) << cmd;
  std::string output;
  char buf[4096];
  while (std::size_t n = std::fread(buf, 1, sizeof(buf), pipe)) output.append(buf, n);
  const int status = ::pclose(pipe);
  ASSERT_EQ(status, 0) << "python side failed:\n" << output;

  const SafetensorsFile back = load_safetensors(from_py);
  EXPECT_EQ(back.metadata, (std::map<std::string, std::string>{{"from", "python"}}));
  ASSERT_EQ(back.tensors.size(), 2u);
  EXPECT_EQ(back.at("py_bf16").dtype(), DType::kBF16);
  EXPECT_EQ(back.at("py_bf16").shape(), (Shape{2, 3}));
  EXPECT_EQ(back.at("py_bf16").to_floats(), values(6));
  EXPECT_EQ(back.at("py_i32").to_ints(), (std::vector<std::int32_t>{-2, -1, 0, 1, 2}));
}

}  // namespace
}  // namespace meshtrain
