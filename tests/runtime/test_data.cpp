#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

#include <gtest/gtest.h>

#include "runtime/data.hpp"

namespace meshtrain::data {
namespace {

namespace fs = std::filesystem;

class DataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("mt_data_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  void write_bytes(const std::string& name, const std::string& bytes) const {
    std::ofstream(path(name), std::ios::binary) << bytes;
  }
  fs::path dir_;
};

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST_F(DataTest, ShardRoundTrip) {
  std::vector<std::uint16_t> toks;
  for (int i = 0; i < 1000; ++i) toks.push_back(static_cast<std::uint16_t>((i * 7919) % 50257));
  write_token_shard(path("a.bin"), toks);
  TokenFile f(path("a.bin"), Format::kAuto);
  EXPECT_FALSE(f.is_text());
  ASSERT_EQ(f.size(), 1000);
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(f.token(i), toks[i]);
  EXPECT_EQ(f.max_token(), *std::max_element(toks.begin(), toks.end()));
  EXPECT_FALSE(fs::exists(path("a.bin.tmp")));
}

TEST_F(DataTest, BadShardsGiveClearErrors) {
  write_token_shard(path("good.bin"), std::vector<std::uint16_t>(100, 5));
  std::string good;
  {
    std::ifstream in(path("good.bin"), std::ios::binary);
    good.assign(std::istreambuf_iterator<char>(in), {});
  }
  write_bytes("short.bin", good.substr(0, 500));
  EXPECT_NE(error_of([&] {
              TokenFile(path("short.bin"), Format::kAuto);
            }).find("shorter than the 1024-byte header"),
            std::string::npos);
  write_bytes("trunc.bin", good.substr(0, good.size() - 2));
  const std::string trunc = error_of([&] { TokenFile(path("trunc.bin"), Format::kAuto); });
  EXPECT_NE(trunc.find("truncated"), std::string::npos) << trunc;
  EXPECT_NE(trunc.find("trunc.bin"), std::string::npos) << trunc;
  std::string bad_magic = good;
  bad_magic[0] = 1;
  write_bytes("magic.bin", bad_magic);
  EXPECT_NE(error_of([&] { TokenFile(path("magic.bin"), Format::kAuto); }).find("magic"),
            std::string::npos);
  std::string bad_version = good;
  bad_version[4] = 7;
  write_bytes("version.bin", bad_version);
  EXPECT_NE(error_of([&] { TokenFile(path("version.bin"), Format::kAuto); }).find("version 7"),
            std::string::npos);
  EXPECT_NE(error_of([&] { TokenFile(path("missing.bin"), Format::kAuto); }).find("cannot open"),
            std::string::npos);
  write_bytes("empty.txt", "");
  EXPECT_NE(error_of([&] { TokenFile(path("empty.txt"), Format::kAuto); }).find("empty"),
            std::string::npos);
  EXPECT_THROW(parse_format("csv"), InvalidArgument);
}

TEST_F(DataTest, TextIsBytes) {
  write_bytes("t.txt", "h\xc3\xa9llo");
  TokenFile f(path("t.txt"), Format::kAuto);
  EXPECT_TRUE(f.is_text());
  ASSERT_EQ(f.size(), 6);
  EXPECT_EQ(f.token(1), 0xc3);
  EXPECT_EQ(f.max_token(), 0xc3);
}

TEST_F(DataTest, EveryEpochVisitsEveryWindowOnce) {
  std::string text(1000, 'a');
  write_bytes("t.txt", text);
  TokenFile f(path("t.txt"), Format::kText);
  Sampler s({Span{&f, 0, f.size()}}, 16, 1234);
  const std::int64_t w = s.windows();
  EXPECT_EQ(w, (1000 - 1) / 16);
  for (int epoch = 0; epoch < 2; ++epoch) {
    std::set<std::int64_t> seen;
    for (std::int64_t g = epoch * w; g < (epoch + 1) * w; ++g) seen.insert(s.window_of(g));
    EXPECT_EQ(static_cast<std::int64_t>(seen.size()), w);
    EXPECT_EQ(*seen.rbegin(), w - 1);
  }
  // Another seed, another order.
  Sampler other({Span{&f, 0, f.size()}}, 16, 99);
  std::vector<std::int64_t> a, b;
  for (std::int64_t g = 0; g < w; ++g) {
    a.push_back(s.window_of(g));
    b.push_back(other.window_of(g));
  }
  EXPECT_NE(a, b);
}

TEST_F(DataTest, RanksSplitTheGlobalBatchAndTargetsShiftByOne) {
  std::string text;
  for (int i = 0; i < 5000; ++i) text += static_cast<char>('a' + (i * 31 + i / 7) % 26);
  write_bytes("t.txt", text);
  TokenFile f(path("t.txt"), Format::kText);
  Sampler s({Span{&f, 0, 3000}, Span{&f, 3000, 5000}}, 32, 7);
  Tensor in = Tensor::empty(Shape{4, 32}, DType::kI32),
         tg = Tensor::empty(Shape{4, 32}, DType::kI32);
  s.batch(3, 0, 1, in, tg);
  auto all_in = in.to_ints(), all_tg = tg.to_ints();
  for (int i = 0; i < 4; ++i)
    for (int t = 0; t + 1 < 32; ++t) EXPECT_EQ(all_tg[i * 32 + t], all_in[i * 32 + t + 1]);
  Tensor in2 = Tensor::empty(Shape{2, 32}, DType::kI32),
         tg2 = Tensor::empty(Shape{2, 32}, DType::kI32);
  for (int r = 0; r < 2; ++r) {
    s.batch(3, r, 2, in2, tg2);
    auto part = in2.to_ints();
    for (int i = 0; i < 64; ++i) EXPECT_EQ(part[i], all_in[r * 64 + i]);
  }
  // Same step, same batch: deterministic.
  Tensor again = Tensor::empty(Shape{4, 32}, DType::kI32);
  s.batch(3, 0, 1, again, tg);
  EXPECT_EQ(again.to_ints(), all_in);
}

TEST_F(DataTest, DatasetSplitsAndChecksSize) {
  write_bytes("t.txt", std::string(2000, 'x'));
  Dataset d({path("t.txt")}, {}, Format::kAuto, 0.1, 64, 1);
  EXPECT_EQ(d.train().tokens(), 1800);
  ASSERT_NE(d.val(), nullptr);
  EXPECT_EQ(d.val()->tokens(), 200);
  EXPECT_TRUE(d.is_text());
  const std::string e = error_of([&] { Dataset({path("t.txt")}, {}, Format::kAuto, 0.01, 64, 1); });
  EXPECT_NE(e.find("validation data has 20 tokens"), std::string::npos) << e;
  EXPECT_NE(e.find(path("t.txt")), std::string::npos)
      << e;  // names the file (fuzzing found it did not)
  // Too short for one window: the error names the file too.
  write_bytes("short.bin", "");
  write_token_shard(path("short.bin"), {1, 2, 3});
  const std::string s =
      error_of([&] { Dataset({path("short.bin")}, {}, Format::kAuto, 0.0, 8, 1); });
  EXPECT_NE(s.find("too few for one sequence"), std::string::npos) << s;
  EXPECT_NE(s.find(path("short.bin")), std::string::npos) << s;
  EXPECT_NE(error_of([&] {
              Dataset({path("nothing_*.bin")}, {}, Format::kAuto, 0.1, 8, 1);
            }).find("matches no file"),
            std::string::npos);
}

}  // namespace
}  // namespace meshtrain::data
