#include "runtime/data.hpp"

#include <fcntl.h>
#include <glob.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <unordered_map>

#include "runtime/file_io.hpp"
#include "runtime/rng.hpp"

namespace meshtrain::data {

Format parse_format(const std::string& name) {
  if (name == "auto") return Format::kAuto;
  if (name == "tokens") return Format::kTokens;
  if (name == "text") return Format::kText;
  MT_FAIL("unknown data format '{}': expected auto, tokens or text", name);
}

namespace {
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

TokenFile::TokenFile(const std::string& path, Format format) : path_(path) {
  text_ = format == Format::kText || (format == Format::kAuto && !ends_with(path, ".bin"));
  // A directory, a FIFO or a device (/dev/zero) is refused here, without blocking.
  Fd fd = open_regular_file(path, "data file");
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0)
    throw IoError(fmt::format("cannot stat data file '{}': {}", path, std::strerror(errno)));
  map_bytes_ = static_cast<std::size_t>(st.st_size);
  if (map_bytes_ > 0) {
    map_ = ::mmap(nullptr, map_bytes_, PROT_READ, MAP_PRIVATE, fd.get(), 0);
    if (map_ == MAP_FAILED) {
      map_ = nullptr;
      throw IoError(fmt::format("cannot map data file '{}': {}", path, std::strerror(errno)));
    }
  }
  fd.close(path);
  try {
    bytes_ = static_cast<const std::uint8_t*>(map_);
    if (text_) {
      count_ = static_cast<std::int64_t>(map_bytes_);
      MT_CHECK(count_ > 0, "text data file '{}' is empty", path);
      for (std::int64_t i = 0; i < count_; ++i)
        max_token_ = std::max<std::int32_t>(max_token_, bytes_[i]);
      return;
    }
    MT_CHECK(map_bytes_ >= kShardHeaderBytes,
             "'{}' is not an llm.c token shard: {} bytes, shorter than the {}-byte header", path,
             map_bytes_, kShardHeaderBytes);
    std::int32_t header[3];
    std::memcpy(header, bytes_, sizeof(header));
    MT_CHECK(header[0] == kShardMagic || header[0] == kShardMagicLlama3,
             "'{}' is not an llm.c token shard: magic {} at byte 0, expected {} (GPT-2, uint16 "
             "tokens) or {} (Llama 3, uint32 tokens) (use data.format = \"text\" for a text file)",
             path, header[0], kShardMagic, kShardMagicLlama3);
    const bool llama3 = header[0] == kShardMagicLlama3;
    width_ = llama3 ? 4 : 2;
    const std::int32_t version = llama3 ? kShardVersionLlama3 : kShardVersion;
    MT_CHECK(header[1] == version,
             "token shard '{}' has version {} at byte 4, but its magic {} (byte 0) is the {} "
             "format's, whose version is {} ({} tokens){}",
             path, header[1], header[0], llama3 ? "Llama 3" : "GPT-2", version,
             llama3 ? "uint32" : "uint16",
             header[1] == (llama3 ? kShardVersion : kShardVersionLlama3)
                 ? fmt::format(": version {} is the {} format's, so the header does not match its "
                               "token width",
                               header[1], llama3 ? "GPT-2" : "Llama 3")
                 : "");
    MT_CHECK(header[2] > 0, "token shard '{}' declares {} tokens at byte 8, expected at least 1",
             path, header[2]);
    const auto count = static_cast<std::uint64_t>(header[2]);
    const std::uint64_t want = kShardHeaderBytes + static_cast<std::uint64_t>(width_) * count;
    const int other = width_ == 2 ? 4 : 2;
    MT_CHECK(map_bytes_ == want,
             "token shard '{}' is {} bytes but its header (byte 8) declares {} tokens, which as "
             "{} need exactly {} bytes: the file is truncated or corrupt{}",
             path, map_bytes_, header[2], width_ == 2 ? "uint16" : "uint32", want,
             map_bytes_ == kShardHeaderBytes + other * count
                 ? fmt::format(" (its size fits {} {}-byte tokens: magic and version (bytes 0 and "
                               "4) do not match the token width)",
                               header[2], other)
                 : "");
    count_ = header[2];
    if (width_ == 2) {
      tokens16_ = reinterpret_cast<const std::uint16_t*>(bytes_ + kShardHeaderBytes);
      for (std::int64_t i = 0; i < count_; ++i)
        max_token_ = std::max<std::int32_t>(max_token_, tokens16_[i]);
    } else {
      tokens32_ = reinterpret_cast<const std::uint32_t*>(bytes_ + kShardHeaderBytes);
      std::uint32_t most = 0;
      for (std::int64_t i = 0; i < count_; ++i) most = std::max(most, tokens32_[i]);
      if (most > 0x7fffffffu) {
        std::int64_t i = 0;
        while (tokens32_[i] <= 0x7fffffffu) ++i;
        MT_FAIL(
            "token shard '{}': token {} (byte offset {}) is {}, beyond the largest token id "
            "2^31 - 1",
            path, i, kShardHeaderBytes + 4 * static_cast<std::uint64_t>(i), tokens32_[i]);
      }
      max_token_ = static_cast<std::int32_t>(most);
    }
  } catch (...) {
    if (map_ != nullptr) ::munmap(map_, map_bytes_);
    map_ = nullptr;
    throw;
  }
}

TokenFile::~TokenFile() {
  if (map_ != nullptr) ::munmap(map_, map_bytes_);
}

TokenFile::TokenFile(TokenFile&& o) noexcept
    : path_(std::move(o.path_)),
      map_(o.map_),
      map_bytes_(o.map_bytes_),
      bytes_(o.bytes_),
      tokens16_(o.tokens16_),
      tokens32_(o.tokens32_),
      count_(o.count_),
      text_(o.text_),
      width_(o.width_),
      max_token_(o.max_token_) {
  o.map_ = nullptr;
}

void TokenFile::check_vocab(std::int32_t vocab_size) const {
  if (max_token_ < vocab_size) return;
  std::int64_t i = 0;
  while (token(i) < vocab_size) ++i;
  const std::uint64_t offset = (text_ ? 0 : kShardHeaderBytes) +
                               static_cast<std::uint64_t>(width_) * static_cast<std::uint64_t>(i);
  MT_FAIL(
      "{} '{}' holds token id {} at token {} (byte offset {}), outside the model's "
      "vocabulary of {} (ids 0..{}){}",
      text_ ? "text data file" : "token shard", path_, token(i), i, offset, vocab_size,
      vocab_size - 1,
      max_token_ != token(i) ? fmt::format("; its largest id is {}", max_token_) : "");
}

namespace {

// Writes header + data atomically and durably (runtime/file_io.hpp's AtomicFileWriter).
void write_shard_file(const std::string& path, std::int32_t magic, std::int32_t version,
                      std::size_t count, const void* data, std::size_t bytes) {
  MT_CHECK(count >= 1 && count <= 0x7fffffffu,
           "write_token_shard '{}': {} tokens; a shard holds 1 to 2^31 - 1", path, count);
  std::int32_t header[256] = {};
  header[0] = magic;
  header[1] = version;
  header[2] = static_cast<std::int32_t>(count);
  AtomicFileWriter out(path);
  out.write(header, sizeof(header));
  out.write(data, bytes);
  out.commit();
}

}  // namespace

void write_token_shard(const std::string& path, std::span<const std::int32_t> tokens,
                       std::int32_t vocab_size) {
  MT_CHECK(vocab_size >= 1, "write_token_shard '{}': vocabulary size {}, expected at least 1", path,
           vocab_size);
  for (std::size_t i = 0; i < tokens.size(); ++i)
    MT_CHECK(tokens[i] >= 0 && tokens[i] < vocab_size,
             "write_token_shard '{}': token {} is id {}, outside the vocabulary of {}", path, i,
             tokens[i], vocab_size);
  if (vocab_size <= 65536) {
    const std::vector<std::uint16_t> narrow(tokens.begin(), tokens.end());
    write_shard_file(path, kShardMagic, kShardVersion, narrow.size(), narrow.data(),
                     narrow.size() * 2);
  } else {
    write_shard_file(path, kShardMagicLlama3, kShardVersionLlama3, tokens.size(), tokens.data(),
                     tokens.size() * 4);
  }
}

void write_token_shard(const std::string& path, const std::vector<std::uint16_t>& tokens) {
  write_shard_file(path, kShardMagic, kShardVersion, tokens.size(), tokens.data(),
                   tokens.size() * 2);
}

namespace {
// The files of some spans, for messages: "'a.bin', 'b.bin'" (at most three, then a count).
std::string file_list(const std::vector<Span>& spans) {
  std::vector<std::string> names;
  for (const Span& s : spans)
    if (std::find(names.begin(), names.end(), s.file->path()) == names.end())
      names.push_back(s.file->path());
  std::string out;
  for (std::size_t i = 0; i < names.size() && i < 3; ++i) out += (i ? ", '" : "'") + names[i] + "'";
  if (names.size() > 3) out += fmt::format(" and {} more", names.size() - 3);
  return out;
}

// A pseudo-random bijection of [0, n): a 4-round Feistel network on the smallest even-bit
// power-of-two domain holding n, with cycle walking back into [0, n).
std::uint64_t permute(std::uint64_t x, std::uint64_t n, const Philox& rng) {
  if (n <= 1) return 0;
  int bits = std::max(2, 64 - std::countl_zero(n - 1));
  bits += bits & 1;
  const int half = bits / 2;
  const std::uint64_t mask = (std::uint64_t{1} << half) - 1;
  do {
    std::uint64_t l = x >> half, r = x & mask;
    for (std::uint64_t round = 0; round < 4; ++round) {
      const std::uint64_t f = rng.block((round << 40) ^ r)[0] & mask;
      const std::uint64_t next = l ^ f;
      l = r;
      r = next;
    }
    x = (l << half) | r;
  } while (x >= n);
  return x;
}
}  // namespace

Sampler::Sampler(std::vector<Span> spans, int seq, std::uint64_t seed)
    : spans_(std::move(spans)), seq_(seq), seed_(seed) {
  MT_CHECK(seq >= 1, "sequence length must be at least 1, got {}", seq);
  for (const Span& s : spans_) {
    first_window_.push_back(windows_);
    const std::int64_t len = s.end - s.begin;
    tokens_ += len;
    if (len > seq) windows_ += (len - 1) / seq;
  }
  MT_CHECK(windows_ > 0,
           "the data has {} tokens in {} file part(s) ({}), too few for one sequence of {} + 1 "
           "tokens",
           tokens_, spans_.size(), file_list(spans_), seq);
}

std::int64_t Sampler::window_of(std::int64_t g) const {
  const std::int64_t epoch = g / windows_;
  return static_cast<std::int64_t>(
      permute(static_cast<std::uint64_t>(g % windows_), static_cast<std::uint64_t>(windows_),
              Philox(seed_, 0x5eed0000ull + static_cast<std::uint64_t>(epoch))));
}

void Sampler::batch(std::int64_t step, int dp_rank, int dp_size, Tensor& inputs,
                    Tensor& targets) const {
  MT_CHECK(dp_size >= 1 && dp_rank >= 0 && dp_rank < dp_size, "bad data-parallel rank {} of {}",
           dp_rank, dp_size);
  MT_CHECK(inputs.dtype() == DType::kI32 && inputs.ndim() == 2 && inputs.dim(1) == seq_ &&
               targets.shape() == inputs.shape() && targets.dtype() == DType::kI32 &&
               inputs.is_cpu() && targets.is_cpu(),
           "sampler batch: inputs and targets must be int32 CPU [B, {}], got {} and {}", seq_,
           inputs.str(), targets.str());
  const std::int64_t b = inputs.dim(0);
  std::int32_t* in = inputs.data_as<std::int32_t>();
  std::int32_t* tg = targets.data_as<std::int32_t>();
  for (std::int64_t row = 0; row < b; ++row) {
    const std::int64_t g = (step * dp_size + dp_rank) * b + row;
    const std::int64_t w = window_of(g);
    const auto it = std::upper_bound(first_window_.begin(), first_window_.end(), w) - 1;
    const Span& s = spans_[static_cast<std::size_t>(it - first_window_.begin())];
    const std::int64_t start = s.begin + (w - *it) * seq_;
    for (int t = 0; t < seq_; ++t) {
      in[row * seq_ + t] = s.file->token(start + t);
      tg[row * seq_ + t] = s.file->token(start + t + 1);
    }
  }
}

std::vector<std::string> expand_paths(const std::vector<std::string>& patterns) {
  std::vector<std::string> out;
  for (const std::string& p : patterns) {
    if (p.find_first_of("*?[") == std::string::npos) {
      out.push_back(p);
      continue;
    }
    glob_t g{};
    const int rc = ::glob(p.c_str(), 0, nullptr, &g);
    std::vector<std::string> matches;
    if (rc == 0)
      for (std::size_t i = 0; i < g.gl_pathc; ++i) matches.emplace_back(g.gl_pathv[i]);
    ::globfree(&g);
    MT_CHECK(!matches.empty(), "data path pattern '{}' matches no file", p);
    std::sort(matches.begin(), matches.end());
    out.insert(out.end(), matches.begin(), matches.end());
  }
  return out;
}

Dataset::Dataset(const std::vector<std::string>& train_paths,
                 const std::vector<std::string>& val_paths, Format format, double val_fraction,
                 int seq, std::uint64_t seed) {
  MT_CHECK(!train_paths.empty(), "no training data files given");
  MT_CHECK(val_fraction >= 0 && val_fraction < 1, "validation fraction must be in [0, 1), got {}",
           val_fraction);
  std::vector<Span> train, val;
  for (const std::string& p : expand_paths(train_paths)) {
    files_.push_back(std::make_unique<TokenFile>(p, format));
    const TokenFile* f = files_.back().get();
    const std::int64_t n = f->size();
    const std::int64_t cut =
        val_paths.empty() ? n - static_cast<std::int64_t>(static_cast<double>(n) * val_fraction)
                          : n;
    train.push_back(Span{f, 0, cut});
    if (cut < n) val.push_back(Span{f, cut, n});
  }
  for (const std::string& p : expand_paths(val_paths)) {
    files_.push_back(std::make_unique<TokenFile>(p, format));
    val.push_back(Span{files_.back().get(), 0, files_.back()->size()});
  }
  train_ = std::make_unique<Sampler>(std::move(train), seq, seed);
  if (!val.empty()) {
    std::int64_t val_tokens = 0;
    for (const Span& s : val) val_tokens += s.end - s.begin;
    MT_CHECK(val_tokens > seq,
             "validation data has {} tokens ({}), too few for one sequence of {} + 1 tokens; "
             "lower the sequence length or raise the validation fraction",
             val_tokens, file_list(val), seq);
    val_ = std::make_unique<Sampler>(std::move(val), seq, seed ^ 0x7a11da7aull);
  }
}

std::int32_t Dataset::max_token() const {
  std::int32_t m = 0;
  for (const auto& f : files_) m = std::max(m, f->max_token());
  return m;
}

void Dataset::check_vocab(std::int32_t vocab_size) const {
  for (const auto& f : files_) f->check_vocab(vocab_size);
}

double Dataset::unigram_entropy() const {
  // Counts per id: a dense table for vocabularies of up to 2^22 ids, else (a Llama 3 shard can
  // hold ids up to 2^31 - 1) a hash table of the ids present, summed in id order all the same.
  std::vector<std::pair<std::int32_t, std::int64_t>> counts;
  std::int64_t total = 0;
  if (max_token() < (1 << 22)) {
    std::vector<std::int64_t> dense(static_cast<std::size_t>(max_token()) + 1, 0);
    for (const Span& s : train_->spans())
      for (std::int64_t i = s.begin; i < s.end; ++i)
        ++dense[static_cast<std::size_t>(s.file->token(i))];
    for (std::size_t id = 0; id < dense.size(); ++id)
      if (dense[id] != 0) counts.emplace_back(static_cast<std::int32_t>(id), dense[id]);
  } else {
    std::unordered_map<std::int32_t, std::int64_t> sparse;
    for (const Span& s : train_->spans())
      for (std::int64_t i = s.begin; i < s.end; ++i) ++sparse[s.file->token(i)];
    counts.assign(sparse.begin(), sparse.end());
    std::sort(counts.begin(), counts.end());
  }
  for (const Span& s : train_->spans()) total += s.end - s.begin;
  double h = 0.0;
  for (const auto& [id, c] : counts) {
    const double p = static_cast<double>(c) / static_cast<double>(total);
    h -= p * std::log(p);
  }
  return h;
}

bool Dataset::is_text() const {
  return !files_.empty() && files_.front()->is_text();
}

}  // namespace meshtrain::data
