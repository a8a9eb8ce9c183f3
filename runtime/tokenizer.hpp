// Byte-level BPE tokenizers read from Hugging Face `tokenizer.json` files: the kind GPT-2,
// Llama 3 and Qwen2 use. Encoding and decoding give the ids and text that the `tokenizers`
// library (0.19) gives for the same file.
//
// What a file may hold (anything else is refused with InvalidArgument naming the file and the
// JSON field, e.g. `tok.json: model.type = "Unigram": only BPE is supported`):
//   normalizer      null, NFC, or a Sequence of those (NFC by utf8proc)
//   pre_tokenizer   ByteLevel, or a Sequence of Split pre-tokenizers (a Regex or String pattern,
//                   behavior Isolated, invert false) ending in exactly one ByteLevel; ByteLevel's
//                   add_prefix_space and use_regex (GPT-2's pattern) are honoured. Patterns are
//                   compiled once by PCRE2 (UTF, UCP, JIT where available); `\s` (and `\S`
//                   outside brackets) is widened by U+0085 to match Oniguruma's, which
//                   `tokenizers` uses; other syntax follows PCRE2.
//   model           BPE with vocab ids 0..N-1, merges as "a b" strings or [a, b] pairs,
//                   ignore_merges, unk_token/fuse_unk; no dropout, byte_fallback,
//                   continuing_subword_prefix or end_of_word_suffix
//   added_tokens    split out of the text before pre-tokenization (leftmost-longest), with their
//                   lstrip, rstrip, single_word and normalized flags (single_word's word
//                   characters: letters, marks, Nd, Pc, joiners, approximating Rust's Unicode
//                   \w); their ids are the ones `tokenizers` assigns (a file whose ids disagree
//                   is refused), so ids are dense: model vocab 0..N-1, then the new added ones
//   post_processor  null, ByteLevel (no effect on ids), TemplateProcessing (its single-sequence
//                   template: e.g. Llama 3's <|begin_of_text|>), or a Sequence of those
//   decoder         ByteLevel (or a Sequence holding only ByteLevel)
//   truncation, padding: null (an absent component is null, as for `tokenizers`)
//
// Thread safety: a Tokenizer is immutable after construction; every const member function may
// be called from any number of threads at once (the per-word cache inside is sharded and
// locked). Copies share the loaded tables and the cache (a moved-from Tokenizer may only be
// assigned or destroyed). A StreamDecoder belongs to one stream (one thread at a time) and
// keeps the tables alive.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace meshtrain {

struct TokenizerImpl;  // tokenizer_impl.hpp

// A token of `added_tokens` (special or not) as the file describes it.
struct AddedToken {
  std::int32_t id = 0;
  std::string content;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
  bool normalized = false;
};

class Tokenizer {
 public:
  // Reads and checks a tokenizer.json. Throws IoError when the file cannot be read and
  // InvalidArgument (naming the file and the field) when its content is malformed or uses
  // something this reader does not support.
  static Tokenizer from_file(const std::string& path);
  // The same from the file's text; `where` names it in messages (usually its path).
  static Tokenizer from_json(std::string_view json, const std::string& where);

  // Token ids of `text`, which must be valid UTF-8 (InvalidArgument naming the byte offset
  // otherwise). add_special_tokens applies the post-processor's template (Llama 3: a leading
  // <|begin_of_text|>), as `tokenizers`' encode(text, add_special_tokens=True) does; added and
  // special tokens written in the text are recognised either way.
  std::vector<std::int32_t> encode(std::string_view text, bool add_special_tokens = true) const;
  // Appends the ids of `text` to `out` (no allocation per call once `out` has grown).
  void encode_append(std::string_view text, std::vector<std::int32_t>& out,
                     bool add_special_tokens = true) const;

  // Text of the ids as `tokenizers`' decode gives it: the bytes of the tokens, with each
  // invalid UTF-8 sequence replaced by U+FFFD as Rust's String::from_utf8_lossy does. Unlike
  // the Python binding, special tokens are kept unless skip_special_tokens is set. An id that
  // is not a token (negative or >= vocab_size()) throws InvalidArgument naming its position
  // (`tokenizers` drops such ids silently).
  std::string decode(std::span<const std::int32_t> ids, bool skip_special_tokens = false) const;
  // The raw bytes of the ids (possibly a partial UTF-8 sequence): decode() before the U+FFFD
  // replacement.
  std::string decode_bytes(std::span<const std::int32_t> ids,
                           bool skip_special_tokens = false) const;

  // The id of a token, written as the file writes it (byte-level form: "Ġthe" for " the"), or
  // of an added token; nullopt when there is none.
  std::optional<std::int32_t> token_to_id(std::string_view token) const;
  // The token of an id as the file writes it; throws InvalidArgument for an id outside
  // [0, vocab_size()).
  const std::string& id_to_token(std::int32_t id) const;
  // One more than the largest id (model vocabulary and added tokens): the embedding needs at
  // least this many rows. Every id below it is a token.
  std::int32_t vocab_size() const;
  bool is_special(std::int32_t id) const;
  const std::vector<AddedToken>& added_tokens() const;

  // The beginning-of-sequence token: the special token the post-processor's template puts
  // before the text (Llama 3: <|begin_of_text|>), if any.
  std::optional<std::int32_t> bos_id() const;
  // The end-of-sequence token: the special token the template puts after the text, else the
  // first special token named <|end_of_text|>, <|endoftext|> or </s> (GPT-2 and Qwen2:
  // <|endoftext|>). Chat models end turns with another token (<|eot_id|>, <|im_end|>), which
  // their generation_config.json names; look it up with token_to_id.
  std::optional<std::int32_t> eos_id() const;

  // The path or name the tokenizer was read from.
  const std::string& source() const;

  // Incremental decoding for streaming generation: push ids one at a time and get the text
  // each completes. The concatenation of every push() and the final finish() equals decode()
  // of all the ids: bytes of an unfinished UTF-8 sequence are held back until it completes
  // (or proves invalid and becomes U+FFFD).
  class StreamDecoder {
   public:
    explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = false);
    // The text completed by this id (possibly empty).
    std::string push(std::int32_t id);
    // What is still held back (an incomplete sequence at the end becomes U+FFFD); the decoder
    // is then empty and may be reused.
    std::string finish();

   private:
    std::shared_ptr<const TokenizerImpl> impl_;
    bool skip_special_;
    std::string pending_;
  };

 private:
  explicit Tokenizer(std::shared_ptr<const TokenizerImpl> impl);
  std::shared_ptr<const TokenizerImpl> impl_;
};

// Rust's String::from_utf8_lossy: each maximal invalid subsequence becomes U+FFFD.
std::string utf8_lossy(std::string_view bytes);

}  // namespace meshtrain
