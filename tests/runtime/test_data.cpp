#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
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

TEST_F(DataTest, Llama3ShardsHoldUint32Tokens) {
  std::vector<std::int32_t> toks;
  for (int i = 0; i < 1000; ++i) toks.push_back((i * 104729) % 128256);
  toks.push_back(128255);
  write_token_shard(path("l.bin"), toks, 128256);
  const TokenFile f(path("l.bin"), Format::kAuto);
  EXPECT_EQ(f.token_width(), 4);
  ASSERT_EQ(f.size(), 1001);
  for (int i = 0; i < 1001; ++i) ASSERT_EQ(f.token(i), toks[i]);
  EXPECT_EQ(f.max_token(), 128255);
  EXPECT_EQ(fs::file_size(path("l.bin")), 1024u + 4 * 1001);
  EXPECT_FALSE(fs::exists(path("l.bin.tmp")));
  std::int32_t header[3];
  std::ifstream(path("l.bin"), std::ios::binary).read(reinterpret_cast<char*>(header), 12);
  EXPECT_EQ(header[0], 20240801);
  EXPECT_EQ(header[1], 7);
  EXPECT_EQ(header[2], 1001);

  // The writer picks GPT-2's format whenever every id fits 16 bits.
  write_token_shard(path("g.bin"), std::vector<std::int32_t>{0, 65535, 7}, 65536);
  EXPECT_EQ(TokenFile(path("g.bin"), Format::kAuto).token_width(), 2);
  EXPECT_EQ(TokenFile(path("g.bin"), Format::kAuto).token(1), 65535);
  write_token_shard(path("w.bin"), std::vector<std::int32_t>{0, 65536, 7}, 65537);
  EXPECT_EQ(TokenFile(path("w.bin"), Format::kAuto).token_width(), 4);
  const std::string e = error_of([&] {
    write_token_shard(path("x.bin"), std::vector<std::int32_t>{1, 2, 500}, 500);
  });
  EXPECT_NE(e.find("token 2 is id 500, outside the vocabulary of 500"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(path("x.bin")));
  EXPECT_FALSE(fs::exists(path("x.bin.tmp")));
}

TEST_F(DataTest, ShardHeaderMustMatchTokenWidth) {
  write_token_shard(path("l.bin"), std::vector<std::int32_t>(100, 70000), 128256);
  std::string llama;
  {
    std::ifstream in(path("l.bin"), std::ios::binary);
    llama.assign(std::istreambuf_iterator<char>(in), {});
  }
  // Llama 3's magic with GPT-2's version.
  std::string v = llama;
  v[4] = 1;
  write_bytes("v.bin", v);
  std::string m = error_of([&] { TokenFile(path("v.bin"), Format::kAuto); });
  EXPECT_NE(m.find("'" + path("v.bin") + "' has version 1 at byte 4"), std::string::npos) << m;
  EXPECT_NE(m.find("does not match its token width"), std::string::npos) << m;
  // GPT-2's header on uint32 tokens: the size says so.
  std::string g = llama;
  const std::int32_t gpt2[2] = {20240520, 1};
  std::memcpy(g.data(), gpt2, 8);
  write_bytes("g.bin", g);
  m = error_of([&] { TokenFile(path("g.bin"), Format::kAuto); });
  EXPECT_NE(m.find("declares 100 tokens, which as uint16 need exactly 1224 bytes"),
            std::string::npos)
      << m;
  EXPECT_NE(m.find("its size fits 100 4-byte tokens"), std::string::npos) << m;
  // A uint32 token beyond int32.
  std::string big = llama;
  const std::uint32_t huge = 0x80000000u;
  std::memcpy(big.data() + 1024 + 4 * 3, &huge, 4);
  write_bytes("big.bin", big);
  m = error_of([&] { TokenFile(path("big.bin"), Format::kAuto); });
  EXPECT_NE(m.find("token 3 (byte offset 1036) is 2147483648"), std::string::npos) << m;
  EXPECT_NE(m.find(path("big.bin")), std::string::npos) << m;
  // A truncated Llama 3 shard.
  write_bytes("t.bin", llama.substr(0, llama.size() - 4));
  m = error_of([&] { TokenFile(path("t.bin"), Format::kAuto); });
  EXPECT_NE(m.find("truncated"), std::string::npos) << m;
}

// Fuzzing found that the unigram entropy counted ids in a table as long as the largest id: with
// Llama 3 shards, up to 2^31 entries.
TEST_F(DataTest, EntropyOfHugeIdsNeedsNoHugeTable) {
  const std::int32_t top = 2147483646;
  write_token_shard(path("h.bin"), std::vector<std::int32_t>{1, top, 1, 2, top, 1, 1, 3}, top + 1);
  const Dataset d({path("h.bin")}, {}, Format::kAuto, 0.0, 1, 1);
  EXPECT_EQ(d.max_token(), top);
  // Four 1s, two of the top id, one 2, one 3 (the whole file is training data).
  const double want = -(0.5 * std::log(0.5) + 0.25 * std::log(0.25) + 2 * 0.125 * std::log(0.125));
  EXPECT_NEAR(d.unigram_entropy(), want, 1e-12);
}

TEST_F(DataTest, TokensOutsideTheVocabularyNameFileAndOffset) {
  std::vector<std::uint16_t> toks(100, 7);
  toks[5] = 300;
  toks[60] = 900;
  write_token_shard(path("a.bin"), std::vector<std::uint16_t>(50, 1));
  write_token_shard(path("b.bin"), toks);
  const Dataset d({path("a.bin"), path("b.bin")}, {}, Format::kAuto, 0.1, 8, 1);
  EXPECT_EQ(d.max_token(), 900);
  d.check_vocab(901);
  const std::string e = error_of([&] { d.check_vocab(256); });
  EXPECT_NE(e.find("token shard '" + path("b.bin") +
                   "' holds token id 300 at token 5 (byte offset 1034), outside the model's "
                   "vocabulary of 256 (ids 0..255); its largest id is 900"),
            std::string::npos)
      << e;
  write_bytes("t.txt", "abc\xff");
  const TokenFile t(path("t.txt"), Format::kAuto);
  const std::string te = error_of([&] { t.check_vocab(128); });
  EXPECT_NE(te.find("text data file '" + path("t.txt") +
                    "' holds token id 255 at token 3 (byte "
                    "offset 3)"),
            std::string::npos)
      << te;
}

}  // namespace
}  // namespace meshtrain::data
