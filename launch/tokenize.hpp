// Text to llm.c token shards with a Hugging Face tokenizer: `meshtrain tokenize` and the
// trainer's data.tokenizer.
//
// Documents: a file is cut into sections at blank lines ("\n\n", kept with the section before
// it) as llm.c's tinyshakespeare and tinystories scripts do, or taken whole (split = "file").
// Each document is encoded without special tokens (encode(doc, false)) and preceded by one
// separator: the tokenizer's bos_id() when it has one (Llama 3's <|begin_of_text|>), else its
// eos_id() (GPT-2's and Qwen2's <|endoftext|>, llm.c's convention), else nothing. Shards are
// written with write_token_shard: GPT-2's uint16 format for vocabularies up to 65,536 ids, else
// Llama 3's uint32 one (runtime/data.hpp).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/tokenizer.hpp"

namespace meshtrain::launch {

// The separator put before each document: bos, else eos, else -1 (none).
std::int32_t document_separator(const Tokenizer& tok);

// Every document of `text` encoded, separators included, in order. Documents are encoded on
// `threads` threads (0: the machine's cores); `done_bytes` (optional) grows by the bytes
// encoded as they finish, for a progress bar.
std::vector<std::int32_t> tokenize_text(const Tokenizer& tok, std::string_view text,
                                        bool split_blank_lines, int threads,
                                        std::atomic<std::int64_t>* done_bytes = nullptr);

struct TokenizeOptions {
  std::string tokenizer;           // tokenizer.json
  std::vector<std::string> files;  // text files or globs
  std::string out;                 // directory for the shards
  double val_fraction = 0.05;      // of the tokens, the last documents, into val_000000.bin
  std::int64_t shard_tokens = 100'000'000;  // per train shard (llm.c's size)
  bool split_blank_lines = true;            // false: each file is one document
  int threads = 0;                          // 0: the machine's cores
  bool progress = true;                     // a progress line on stderr
};
struct TokenizeResult {
  std::int64_t bytes = 0, train_tokens = 0, val_tokens = 0;
  std::int32_t vocab_size = 0;
  std::vector<std::string> shards;  // train shards, then the validation shard
  double seconds = 0;
};
// Reads every file and encodes it before creating `out` or writing anything (a missing file or
// an unreadable tokenizer leaves nothing behind); then writes out/train_NNNNNN.bin shards and
// out/val_000000.bin, each atomically. Throws InvalidArgument naming the file (or flag) that is
// wrong: no files, a directory, an empty corpus, val_fraction outside [0, 0.5].
TokenizeResult tokenize_files(const TokenizeOptions& opt);

// Tokenizes one text file into an llm.c shard at `shard_path` (the trainer's data.tokenizer:
// split at blank lines, the tokenizer's separators). Returns the number of tokens.
std::int64_t tokenize_file_to_shard(const Tokenizer& tok, const std::string& text_path,
                                    const std::string& shard_path, int threads);

// The trainer's data files with text made into tokens: each text file (format "text", or
// "auto" and not ending in .bin, as runtime/data.hpp decides) is tokenized into a shard in
// `dir` when `tok` is given; without one, a text file under a vocabulary other than the byte
// one (256) throws InvalidArgument naming the file and the fix (its bytes are not that
// vocabulary's ids). Token shards pass through. Returns the files to open.
struct TextStats {
  std::int64_t files = 0, bytes = 0, tokens = 0;  // text files, their bytes and tokens
};
std::vector<std::string> text_files_to_shards(const std::vector<std::string>& files,
                                              const std::string& format, const Tokenizer* tok,
                                              int vocab_size, const std::string& dir, int threads,
                                              TextStats* stats = nullptr);

}  // namespace meshtrain::launch
