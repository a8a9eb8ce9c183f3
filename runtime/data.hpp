// Token data: llm.c token shards, raw UTF-8 text as bytes, and the deterministic sampler that
// hands every data-parallel rank its slice of each global batch.
//
// Shard formats (llm.c's dev/data/data_common.py): a 1024-byte header of 256 little-endian
// int32 (magic, version, token count, then zeros), then the tokens:
//   GPT-2    magic 20240520, version 1, uint16 tokens (vocabularies of up to 65,536 ids)
//   Llama 3  magic 20240801, version 7, uint32 tokens (larger vocabularies)
// The file size must be exactly 1024 + width x count. Text files are their bytes, one token
// each (vocabulary 256).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "runtime/tensor.hpp"

namespace meshtrain::data {

inline constexpr std::int32_t kShardMagic = 20240520;  // GPT-2: uint16 tokens
inline constexpr std::int32_t kShardVersion = 1;
inline constexpr std::int32_t kShardMagicLlama3 = 20240801;  // Llama 3: uint32 tokens
inline constexpr std::int32_t kShardVersionLlama3 = 7;
inline constexpr std::size_t kShardHeaderBytes = 1024;

enum class Format { kAuto, kTokens, kText };
// "auto" (".bin" files are token shards, anything else text), "tokens" or "text".
Format parse_format(const std::string& name);

// A read-only memory-mapped file of tokens. Move-only.
class TokenFile {
 public:
  // Opens and validates; throws InvalidArgument (bad content, naming the file, byte offset
  // and what was expected: a magic or version that is not llm.c's, a version that does not
  // match the magic's token width, a size that disagrees with the count, a uint32 token beyond
  // 2^31 - 1) or IoError (the OS refused).
  TokenFile(const std::string& path, Format format);
  ~TokenFile();
  TokenFile(TokenFile&& o) noexcept;
  TokenFile& operator=(TokenFile&&) = delete;
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;

  const std::string& path() const { return path_; }
  std::int64_t size() const { return count_; }
  bool is_text() const { return text_; }
  // Bytes per token: 1 (text), 2 (GPT-2 shard) or 4 (Llama 3 shard).
  int token_width() const { return width_; }
  std::int32_t token(std::int64_t i) const {
    if (width_ == 2) return static_cast<std::int32_t>(tokens16_[i]);
    if (width_ == 4) return static_cast<std::int32_t>(tokens32_[i]);
    return static_cast<std::int32_t>(bytes_[i]);
  }
  // The largest token id in the file (scanned once at open).
  std::int32_t max_token() const { return max_token_; }
  // Throws InvalidArgument unless every token is below vocab_size, naming the file, the first
  // token outside the vocabulary, its index and its byte offset in the file.
  void check_vocab(std::int32_t vocab_size) const;

 private:
  std::string path_;
  void* map_ = nullptr;
  std::size_t map_bytes_ = 0;
  const std::uint8_t* bytes_ = nullptr;
  const std::uint16_t* tokens16_ = nullptr;
  const std::uint32_t* tokens32_ = nullptr;
  std::int64_t count_ = 0;
  bool text_ = false;
  int width_ = 1;
  std::int32_t max_token_ = 0;
};

// Writes an llm.c shard of 1 to 2^31 - 1 tokens, each in [0, vocab_size): GPT-2's format
// (uint16) when every id of the vocabulary fits 16 bits (vocab_size <= 65,536), else Llama 3's
// (uint32). Durable: written to `path.tmp`, flushed to disk (fsync), renamed over `path`, and
// the directory entry flushed (runtime/file_io.hpp); on failure `path.tmp` is removed and an
// existing `path` left as it was. Throws InvalidArgument (a token outside the vocabulary, naming
// its position) or IoError.
void write_token_shard(const std::string& path, std::span<const std::int32_t> tokens,
                       std::int32_t vocab_size);
// The same in GPT-2's format, from uint16 tokens.
void write_token_shard(const std::string& path, const std::vector<std::uint16_t>& tokens);

// A range of tokens of one file: the unit a split draws windows from.
struct Span {
  const TokenFile* file;
  std::int64_t begin, end;
};

// Sequences of seq + 1 tokens drawn without overlap from a set of spans. Sample g of the whole
// run (g = step x global batch + dp_rank x batch + row) is window perm_epoch(g mod W) of epoch
// g / W, where W is the number of windows and perm_epoch a pseudo-random bijection seeded by
// (seed, epoch). So a batch depends only on (seed, step, dp_rank, dp_size): runs resume
// exactly and split across any number of ranks, and every epoch sees every window once.
class Sampler {
 public:
  Sampler(std::vector<Span> spans, int seq, std::uint64_t seed);

  std::int64_t windows() const { return windows_; }
  const std::vector<Span>& spans() const { return spans_; }
  std::int64_t tokens() const { return tokens_; }
  int seq() const { return seq_; }

  // Fills inputs and targets (int32 [batch, seq], CPU) for this rank's part of a global step.
  void batch(std::int64_t step, int dp_rank, int dp_size, Tensor& inputs, Tensor& targets) const;
  // The window of sample g (for tests): index into the concatenated spans' windows.
  std::int64_t window_of(std::int64_t g) const;

 private:
  std::vector<Span> spans_;
  std::vector<std::int64_t> first_window_;  // prefix sums of windows per span
  int seq_;
  std::uint64_t seed_;
  std::int64_t windows_ = 0;
  std::int64_t tokens_ = 0;
};

// Training and validation data from files: explicit validation files, or else the last
// val_fraction of the training tokens (split per file, so validation never overlaps training).
class Dataset {
 public:
  Dataset(const std::vector<std::string>& train_paths, const std::vector<std::string>& val_paths,
          Format format, double val_fraction, int seq, std::uint64_t seed);

  const Sampler& train() const { return *train_; }
  // Null when there is no validation data.
  const Sampler* val() const { return val_.get(); }
  // The largest token id over all files.
  std::int32_t max_token() const;
  // Throws InvalidArgument unless every token of every file is below vocab_size (the model's
  // vocabulary), naming the first file with one outside it and that token's index and byte
  // offset (TokenFile::check_vocab).
  void check_vocab(std::int32_t vocab_size) const;
  // Entropy in nats of the training tokens' unigram distribution: the loss of the best model
  // that ignores context, which a trained model must beat.
  double unigram_entropy() const;
  bool is_text() const;

 private:
  std::vector<std::unique_ptr<TokenFile>> files_;
  std::unique_ptr<Sampler> train_, val_;
};

// Expands a list of paths, where an entry may be a glob ("data/train_*.bin"), sorted.
// Throws InvalidArgument when an entry matches nothing.
std::vector<std::string> expand_paths(const std::vector<std::string>& patterns);

}  // namespace meshtrain::data
