// Internal to the tokenizer (runtime/tokenizer*.cpp), not installed: what its pieces share.
//   tokenizer_unicode.cpp  UTF-8 steps and code points, Unicode classes, GPT-2's byte <-> character
//                          mapping, NFC
//   tokenizer_json.cpp     reading tokenizer.json (Tokenizer::from_file, from_json)
//   tokenizer_bpe.cpp      encoding: added tokens, normalization, pre-tokenization, BPE merges and
//                          the word cache (the hot path, one translation unit)
//   tokenizer.cpp          the public Tokenizer and decoding
// Here: the declarations of the helpers defined in those files, and the types TokenizerImpl
// holds by value (the PCRE2 Regex, the merge map, the word cache, the added tokens' trie), whose
// member functions stay inline so that the encoding's hot loops are compiled into one unit as
// before.
#pragma once

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/error.hpp"
#include "runtime/tokenizer.hpp"

namespace meshtrain {
// External linkage (the pieces share them), so kept out of meshtrain's own names.
namespace tokenizer_detail {

using Json = nlohmann::json;

// ---- UTF-8 (tokenizer_unicode.cpp) -------------------------------------------------------

// One step of Rust's Utf8Chunks over p[0..n) (n >= 1): a valid character of `len` bytes, or an
// invalid sequence of `len` bytes that from_utf8_lossy replaces by one U+FFFD. `incomplete`: the
// input ended inside a sequence that was valid so far (more bytes could still complete it).
struct Utf8Step {
  std::size_t len;
  bool valid;
  bool incomplete;
};

inline bool is_cont(unsigned char c) {
  return (c & 0xC0) == 0x80;
}

Utf8Step utf8_step(const unsigned char* p, std::size_t n);

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";

std::size_t first_invalid_utf8(std::string_view s);
char32_t next_cp(std::string_view s, std::size_t& i);
char32_t prev_cp(std::string_view s, std::size_t end, std::size_t& start);
void append_utf8(std::string& out, char32_t c);
bool is_white_space(char32_t c);
bool is_word_char(char32_t c);
std::string nfc_normalize(std::string_view s);
bool may_change_under_nfc(std::string_view s);

// ---- GPT-2's byte <-> character mapping (bytes_to_unicode) -------------------------------------

struct ByteLevelMap {
  std::array<char32_t, 256> byte_to_cp{};
  std::array<std::int16_t, 324> cp_to_byte{};  // -1: not a byte's character

  ByteLevelMap() {
    cp_to_byte.fill(-1);
    std::array<bool, 256> direct{};
    for (int b = '!'; b <= '~'; ++b) direct[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      byte_to_cp[b] = direct[b] ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
      cp_to_byte[byte_to_cp[b]] = static_cast<std::int16_t>(b);
    }
  }
  int byte_of(char32_t c) const { return c < cp_to_byte.size() ? cp_to_byte[c] : -1; }
};

const ByteLevelMap& byte_level();
std::string byte_level_decode(std::string_view token, bool* mapped = nullptr);

// ---- JSON and PCRE2 patterns (tokenizer_json.cpp) ----------------------------------------

std::string short_dump(const Json& j);
std::string widen_whitespace_classes(const std::string& pattern);

// ---- PCRE2 matching (the state: tokenizer_bpe.cpp) ---------------------------------------

// Per-thread PCRE2 match state: match data for the whole-match offsets and a JIT stack.
struct MatchScratch {
  pcre2_match_data* data = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* stack = nullptr;
  MatchScratch() {
    data = pcre2_match_data_create(1, nullptr);
    context = pcre2_match_context_create(nullptr);
    stack = pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, nullptr);
    if (context != nullptr && stack != nullptr) pcre2_jit_stack_assign(context, nullptr, stack);
  }
  ~MatchScratch() {
    pcre2_match_data_free(data);
    pcre2_match_context_free(context);
    pcre2_jit_stack_free(stack);
  }
};

MatchScratch& match_scratch();

class Regex {
 public:
  Regex(const std::string& pattern, bool literal, const std::string& file,
        const std::string& field) {
    const std::string compiled = literal ? pattern : widen_whitespace_classes(pattern);
    int err = 0;
    PCRE2_SIZE offset = 0;
    const std::uint32_t options = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(compiled.data()), compiled.size(), options,
                          &err, &offset, nullptr);
    if (code_ == nullptr) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof(msg));
      MT_FAIL("{}: {} = {}: not a regular expression PCRE2 accepts ({} at character {})", file,
              field, short_dump(Json(pattern)), reinterpret_cast<const char*>(msg), offset);
    }
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
    where_ = file + ": " + field;
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // The pieces `tokenizers` makes of s with this pattern and SplitDelimiterBehavior::Isolated
  // (the matches, and the text between them), without the empty ones; Oniguruma's iteration
  // over matches (an empty match right where the previous match ended is skipped).
  template <typename F>
  void split_isolated(std::string_view s, F&& emit) const {
    MatchScratch& ms = match_scratch();
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    const std::size_t n = s.size();
    std::size_t search = 0, prev = 0;
    std::size_t last_match_end = std::string_view::npos;
    while (search <= n) {
      const int rc =
          jit_ ? pcre2_jit_match(code_, subject, n, search, 0, ms.data, ms.context)
               : pcre2_match(code_, subject, n, search, PCRE2_NO_UTF_CHECK, ms.data, ms.context);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof(msg));
        throw Error(fmt::format("{}: matching the pattern failed on a piece of {} bytes: {}",
                                where_, n, reinterpret_cast<const char*>(msg)));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(ms.data);
      const std::size_t start = ov[0], end = ov[1];
      if (start == end && last_match_end == end) {
        if (search >= n) break;
        std::size_t i = search;
        next_cp(s, i);
        search = i;
        continue;
      }
      search = end;
      last_match_end = end;
      if (prev < start) emit(s.substr(prev, start - prev));
      if (start < end) emit(s.substr(start, end - start));
      prev = end;
    }
    if (prev < n) emit(s.substr(prev));
  }

 private:
  pcre2_code* code_ = nullptr;
  bool jit_ = false;
  std::string where_;  // "FILE: FIELD", for messages
};

// ---- hashing -------------------------------------------------------------------------------

inline std::uint64_t mix64(std::uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}

struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using StringIdMap = std::unordered_map<std::string, std::int32_t, StringHash, std::equal_to<>>;

// Merges: (left id, right id) -> (rank, merged id), open addressing with linear probing.
class MergeMap {
 public:
  void reserve(std::size_t n) {
    std::size_t cap = 16;
    while (cap < 2 * n + 1) cap *= 2;
    slots_.assign(cap, Slot{kEmpty, 0, 0});
    mask_ = cap - 1;
  }
  // A later merge of the same pair replaces the earlier one (as a HashMap collect does).
  void put(std::int32_t a, std::int32_t b, std::int32_t rank, std::int32_t id) {
    const std::uint64_t key = pack(a, b);
    for (std::size_t i = mix64(key) & mask_;; i = (i + 1) & mask_) {
      if (slots_[i].key == kEmpty || slots_[i].key == key) {
        slots_[i] = Slot{key, rank, id};
        return;
      }
    }
  }
  // nullptr-free lookup: returns false when the pair has no merge.
  bool get(std::int32_t a, std::int32_t b, std::int32_t& rank, std::int32_t& id) const {
    if (slots_.empty()) return false;
    const std::uint64_t key = pack(a, b);
    for (std::size_t i = mix64(key) & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.key == key) {
        rank = s.rank;
        id = s.id;
        return true;
      }
      if (s.key == kEmpty) return false;
    }
  }

 private:
  static constexpr std::uint64_t kEmpty = ~std::uint64_t{0};
  static std::uint64_t pack(std::int32_t a, std::int32_t b) {
    return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) |
           static_cast<std::uint32_t>(b);
  }
  struct Slot {
    std::uint64_t key;
    std::int32_t rank, id;
  };
  std::vector<Slot> slots_;
  std::size_t mask_ = 0;
};

// A fast hash of short byte strings (words), eight bytes at a time.
inline std::uint64_t hash_word(std::string_view s) {
  std::uint64_t h = 0x9E3779B97F4A7C15ull ^ s.size();
  std::size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    std::uint64_t w;
    std::memcpy(&w, s.data() + i, 8);
    h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 31;
  }
  if (i < s.size()) {
    std::uint64_t w = 0;
    std::memcpy(&w, s.data() + i, s.size() - i);
    h = (h ^ w) * 0x94d049bb133111ebull;
  }
  return mix64(h);
}

// The per-word cache: raw word bytes -> ids. 16 shards, each with its own lock (threads rarely
// wait on one another) and an open-addressing table over byte arenas. Bounded: a full shard
// takes no more words (as `tokenizers`' cache does), so the words seen first, which in text are
// mostly the frequent ones, stay.
class WordCache {
 public:
  static constexpr std::size_t kShards = 16;
  static constexpr std::size_t kSlots = 16384;  // per shard, a power of two
  static constexpr std::size_t kEntries = kSlots / 2;
  static constexpr std::size_t kMaxWordBytes = 255;  // longer words are not cached
  static constexpr std::size_t kMaxIds = 255;

  bool get(std::string_view word, std::uint64_t h, std::vector<std::int32_t>& out) const {
    Shard& s = shards_[h >> 60];
    std::lock_guard<std::mutex> lock(s.mu);
    const Slot* slot = s.find(word, h);
    if (slot == nullptr) return false;
    out.insert(out.end(), s.ids.begin() + slot->ids, s.ids.begin() + slot->ids + slot->n_ids);
    return true;
  }
  void put(std::string_view word, std::uint64_t h, const std::int32_t* ids, std::size_t n) const {
    if (word.size() > kMaxWordBytes || n > kMaxIds) return;
    Shard& s = shards_[h >> 60];
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.entries >= kEntries) return;
    if (s.slots.empty()) s.slots.resize(kSlots);
    if (s.find(word, h) != nullptr) return;  // another thread was first
    std::size_t i = h & (kSlots - 1);
    while (s.slots[i].used) i = (i + 1) & (kSlots - 1);
    s.slots[i] = Slot{h,
                      static_cast<std::uint32_t>(s.keys.size()),
                      static_cast<std::uint32_t>(s.ids.size()),
                      static_cast<std::uint8_t>(word.size()),
                      static_cast<std::uint8_t>(n),
                      true};
    s.keys.append(word);
    s.ids.insert(s.ids.end(), ids, ids + n);
    ++s.entries;
  }

 private:
  struct Slot {
    std::uint64_t hash = 0;
    std::uint32_t key = 0, ids = 0;  // offsets into the arenas
    std::uint8_t key_len = 0, n_ids = 0;
    bool used = false;
  };
  struct Shard {
    std::mutex mu;
    std::vector<Slot> slots;  // allocated on first use
    std::string keys;
    std::vector<std::int32_t> ids;
    std::size_t entries = 0;
    const Slot* find(std::string_view word, std::uint64_t h) const {
      if (slots.empty()) return nullptr;
      for (std::size_t i = h & (kSlots - 1);; i = (i + 1) & (kSlots - 1)) {
        const Slot& sl = slots[i];
        if (!sl.used) return nullptr;
        if (sl.hash == h && sl.key_len == word.size() &&
            std::memcmp(keys.data() + sl.key, word.data(), word.size()) == 0)
          return &sl;
      }
    }
  };
  mutable std::array<Shard, kShards> shards_;
};

// Leftmost-longest matching of the added tokens (what aho-corasick's MatchKind::LeftmostLongest
// finds), as a byte trie.
class TokenTrie {
 public:
  void add(std::string_view content, std::int32_t token) {
    if (nodes_.empty()) nodes_.emplace_back();
    std::int32_t at = 0;
    for (const char ch : content) {
      const auto c = static_cast<unsigned char>(ch);
      std::int32_t next = child(at, c);
      if (next < 0) {
        next = static_cast<std::int32_t>(nodes_.size());
        nodes_[at].next.emplace_back(c, next);
        nodes_.emplace_back();
      }
      at = next;
    }
    nodes_[at].token = token;
    first_[static_cast<unsigned char>(content[0])] = true;
  }
  bool empty() const { return nodes_.empty(); }

  // The next match starting at or after `from`: sets begin/end/token, or returns false.
  bool find(std::string_view s, std::size_t from, std::size_t& begin, std::size_t& end,
            std::int32_t& token) const {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    for (std::size_t i = from; i < s.size(); ++i) {
      if (!first_[p[i]]) continue;
      std::int32_t at = 0, best = -1;
      std::size_t best_end = 0;
      for (std::size_t j = i; j < s.size(); ++j) {
        at = child(at, p[j]);
        if (at < 0) break;
        if (nodes_[at].token >= 0) {
          best = nodes_[at].token;
          best_end = j + 1;
        }
      }
      if (best >= 0) {
        begin = i;
        end = best_end;
        token = best;
        return true;
      }
    }
    return false;
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, std::int32_t>> next;
    std::int32_t token = -1;
  };
  std::int32_t child(std::int32_t at, unsigned char c) const {
    for (const auto& [k, v] : nodes_[at].next)
      if (k == c) return v;
    return -1;
  }
  std::vector<Node> nodes_;
  std::array<bool, 256> first_{};
};

}  // namespace tokenizer_detail

// TokenizerImpl and the tokenizer's .cpp files name the helpers unqualified, as when they were
// one file.
using namespace tokenizer_detail;

// ---- the loaded tokenizer ------------------------------------------------------------------

struct TokenizerImpl {
  std::string source;

  // Normalizer.
  bool nfc = false;

  // Pre-tokenizer: Split stages, then ByteLevel.
  std::vector<std::unique_ptr<Regex>> splits;
  bool add_prefix_space = false;
  std::unique_ptr<Regex> byte_level_regex;  // null: use_regex = false

  // Model.
  std::int32_t model_size = 0;
  StringIdMap model_vocab;                  // token as written -> id
  StringIdMap model_vocab_bytes;            // token's bytes -> id (byte-character tokens)
  std::array<std::int32_t, 256> byte_id{};  // byte -> id of its character, or -1
  MergeMap merges;
  bool ignore_merges = false;
  std::int32_t unk_id = -1;
  bool fuse_unk = false;

  // Added tokens.
  std::vector<AddedToken> added;                              // file order
  StringIdMap added_ids;                                      // content -> id
  std::unordered_map<std::int32_t, std::size_t> added_index;  // id -> index into added
  TokenTrie raw_trie, normalized_trie;                        // values: index into added

  // Post-processor template.
  std::vector<std::int32_t> prefix_ids, suffix_ids;

  // Every id: the token as written, its decoded bytes, whether special.
  std::vector<std::string> tokens;
  std::vector<std::string> token_bytes;
  std::vector<bool> special;

  std::optional<std::int32_t> bos, eos;

  WordCache cache;

  void encode(std::string_view text, std::vector<std::int32_t>& out, bool add_special) const;
  void split_added(std::string_view text, const TokenTrie& trie, std::vector<std::int32_t>& out,
                   bool normalized_pass) const;
  void normalize_then_split(std::string_view piece, std::vector<std::int32_t>& out) const;
  void pre_tokenize(std::string_view piece, std::size_t stage,
                    std::vector<std::int32_t>& out) const;
  void byte_level_words(std::string_view piece, std::vector<std::int32_t>& out) const;
  void bpe(std::string_view word, std::vector<std::int32_t>& out) const;
  void merge_word(std::string_view word, std::vector<std::int32_t>& out) const;
};

}  // namespace meshtrain
