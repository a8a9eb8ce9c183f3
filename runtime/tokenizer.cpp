#include "runtime/tokenizer.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "runtime/error.hpp"
#include "runtime/file_io.hpp"
#include "runtime/json.hpp"

namespace meshtrain {

namespace {

using Json = nlohmann::json;

// ---- UTF-8 ---------------------------------------------------------------------------------

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

Utf8Step utf8_step(const unsigned char* p, std::size_t n) {
  const unsigned char b0 = p[0];
  if (b0 < 0x80) return {1, true, false};
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    if (n < 2) return {1, false, true};
    return is_cont(p[1]) ? Utf8Step{2, true, false} : Utf8Step{1, false, false};
  }
  if (b0 >= 0xE0 && b0 <= 0xEF) {
    if (n < 2) return {1, false, true};
    const unsigned char lo = b0 == 0xE0 ? 0xA0 : 0x80, hi = b0 == 0xED ? 0x9F : 0xBF;
    if (p[1] < lo || p[1] > hi) return {1, false, false};
    if (n < 3) return {2, false, true};
    return is_cont(p[2]) ? Utf8Step{3, true, false} : Utf8Step{2, false, false};
  }
  if (b0 >= 0xF0 && b0 <= 0xF4) {
    if (n < 2) return {1, false, true};
    const unsigned char lo = b0 == 0xF0 ? 0x90 : 0x80, hi = b0 == 0xF4 ? 0x8F : 0xBF;
    if (p[1] < lo || p[1] > hi) return {1, false, false};
    if (n < 3) return {2, false, true};
    if (!is_cont(p[2])) return {2, false, false};
    if (n < 4) return {3, false, true};
    return is_cont(p[3]) ? Utf8Step{4, true, false} : Utf8Step{3, false, false};
  }
  return {1, false, false};
}

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";

// The offset of the first byte that is not part of valid UTF-8, or npos.
std::size_t first_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  std::size_t i = 0;
  const std::size_t n = s.size();
  while (i < n) {
    // ASCII runs eight bytes at a time.
    while (i + 8 <= n) {
      std::uint64_t w;
      std::memcpy(&w, p + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    const Utf8Step st = utf8_step(p + i, n - i);
    if (!st.valid) return i;
    i += st.len;
  }
  return std::string_view::npos;
}

// The code point at s[i] of valid UTF-8; advances i.
char32_t next_cp(std::string_view s, std::size_t& i) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const unsigned char b0 = p[i];
  if (b0 < 0x80) {
    ++i;
    return b0;
  }
  if (b0 < 0xE0) {
    const char32_t c = ((b0 & 0x1Fu) << 6) | (p[i + 1] & 0x3Fu);
    i += 2;
    return c;
  }
  if (b0 < 0xF0) {
    const char32_t c = ((b0 & 0x0Fu) << 12) | ((p[i + 1] & 0x3Fu) << 6) | (p[i + 2] & 0x3Fu);
    i += 3;
    return c;
  }
  const char32_t c = ((b0 & 0x07u) << 18) | ((p[i + 1] & 0x3Fu) << 12) | ((p[i + 2] & 0x3Fu) << 6) |
                     (p[i + 3] & 0x3Fu);
  i += 4;
  return c;
}

// The code point that ends at s[end) of valid UTF-8, and where it starts.
char32_t prev_cp(std::string_view s, std::size_t end, std::size_t& start) {
  start = end - 1;
  while (start > 0 && is_cont(static_cast<unsigned char>(s[start]))) --start;
  std::size_t i = start;
  return next_cp(s, i);
}

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

// Unicode White_Space (Rust's char::is_whitespace and regex `\s`).
bool is_white_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// Rust regex's Unicode `\w`: Alphabetic, marks, decimal digits, connector punctuation and
// Join_Control. Alphabetic is taken as the letters, Nl and marks plus the symbols that are
// Other_Alphabetic (circled and squared Latin letters); used only for single_word tokens.
bool is_word_char(char32_t c) {
  if (c < 0x80)
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
  if (c == 0x200C || c == 0x200D) return true;
  if ((c >= 0x24B6 && c <= 0x24E9) || (c >= 0x1F130 && c <= 0x1F149) ||
      (c >= 0x1F150 && c <= 0x1F169) || (c >= 0x1F170 && c <= 0x1F189))
    return true;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_PC:
      return true;
    default:
      return false;
  }
}

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

const ByteLevelMap& byte_level() {
  static const ByteLevelMap m;
  return m;
}

// A token's bytes as the ByteLevel decoder gives them: every character mapped back to its byte
// when all of them are byte characters, else the token's own UTF-8 (added tokens like "<|x y|>").
// `mapped` says which.
std::string byte_level_decode(std::string_view token, bool* mapped = nullptr) {
  const ByteLevelMap& m = byte_level();
  std::string out;
  out.reserve(token.size());
  std::size_t i = 0;
  while (i < token.size()) {
    const int b = m.byte_of(next_cp(token, i));
    if (b < 0) {
      if (mapped != nullptr) *mapped = false;
      return std::string(token);
    }
    out += static_cast<char>(b);
  }
  if (mapped != nullptr) *mapped = true;
  return out;
}

// ---- JSON fields ---------------------------------------------------------------------------

std::string short_dump(const Json& j) {
  std::string s = j.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

// Reads fields of one JSON object, naming "FILE: PATH.KEY" in every complaint.
class Fields {
 public:
  Fields(const std::string& file, const Json& obj, std::string path)
      : file_(file), obj_(obj), path_(std::move(path)) {
    if (!obj.is_object())
      MT_FAIL("{}: {} = {}: expected an object", file_, path_.empty() ? "(top level)" : path_,
              short_dump(obj));
  }
  std::string name(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }
  // nullptr when absent.
  const Json* find(const std::string& key) const {
    const auto it = obj_.find(key);
    return it == obj_.end() ? nullptr : &*it;
  }
  const Json& at(const std::string& key, const char* why = "") const {
    const Json* j = find(key);
    if (j == nullptr) MT_FAIL("{}: {} is missing{}", file_, name(key), why);
    return *j;
  }
  // Absent or null: nullopt.
  std::optional<std::string> opt_string(const std::string& key) const {
    const Json* j = find(key);
    if (j == nullptr || j->is_null()) return std::nullopt;
    if (!j->is_string()) fail(key, *j, "expected a string or null");
    return j->get<std::string>();
  }
  std::string string(const std::string& key) const {
    const Json& j = at(key);
    if (!j.is_string()) fail(key, j, "expected a string");
    return j.get<std::string>();
  }
  bool boolean(const std::string& key, bool fallback) const {
    const Json* j = find(key);
    if (j == nullptr || j->is_null()) return fallback;
    if (!j->is_boolean()) fail(key, *j, "expected true or false");
    return j->get<bool>();
  }
  std::int64_t integer(const std::string& key) const {
    const Json& j = at(key);
    if (!j.is_number_integer()) fail(key, j, "expected an integer");
    return j.get<std::int64_t>();
  }
  [[noreturn]] void fail(const std::string& key, const Json& value, const std::string& why) const {
    MT_FAIL("{}: {} = {}: {}", file_, name(key), short_dump(value), why);
  }
  const std::string& file() const { return file_; }
  const Json& json() const { return obj_; }

 private:
  const std::string& file_;
  const Json& obj_;
  std::string path_;
};

// "type" of a component object, which must be one of `known`.
std::string component_type(const Fields& f) {
  return f.string("type");
}

// ---- PCRE2 ---------------------------------------------------------------------------------

// Oniguruma's `\s` (what `tokenizers` matches with) is Unicode White_Space; PCRE2's, with UCP,
// is the separators and \t\n\v\f\r: the two differ by U+0085 (NEL), which this adds.
std::string widen_whitespace_classes(const std::string& pattern) {
  std::string out;
  out.reserve(pattern.size() + 16);
  bool in_class = false;
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[i + 1];
      if (e == 's') {
        out += in_class ? "\\s\\x{85}" : "[\\s\\x{85}]";
      } else if (e == 'S' && !in_class) {
        out += "[^\\s\\x{85}]";
      } else if (e == 'Q') {
        // \Q...\E quotes everything up to \E.
        const std::size_t end = pattern.find("\\E", i + 2);
        const std::size_t stop = end == std::string::npos ? pattern.size() : end + 2;
        out.append(pattern, i, stop - i);
        i = stop - 1;
        continue;
      } else {
        out += c;
        out += e;
      }
      ++i;
      continue;
    }
    if (in_class) {
      if (c == ']') in_class = false;
      out += c;
      continue;
    }
    if (c == '[') {
      in_class = true;
      out += c;
      // A ']' (after an optional '^') right at the start of a class is a literal.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
      continue;
    }
    out += c;
  }
  return out;
}

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

MatchScratch& match_scratch() {
  thread_local MatchScratch s;
  if (s.data == nullptr || s.context == nullptr) throw std::bad_alloc();
  return s;
}

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

}  // namespace

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

namespace {

// ---- reading tokenizer.json ----------------------------------------------------------------

void read_normalizer(TokenizerImpl& t, const Json& j, const std::string& file,
                     const std::string& path) {
  if (j.is_null()) return;
  const Fields f(file, j, path);
  const std::string type = component_type(f);
  if (type == "NFC") {
    t.nfc = true;
  } else if (type == "Sequence") {
    const Json& list = f.at("normalizers");
    if (!list.is_array()) f.fail("normalizers", list, "expected an array");
    for (std::size_t i = 0; i < list.size(); ++i)
      read_normalizer(t, list[i], file, f.name("normalizers") + "[" + std::to_string(i) + "]");
  } else {
    f.fail("type", f.at("type"), "only the NFC normalizer (or none) is supported");
  }
}

// Appends the pre-tokenizer's stages; `byte_level_seen` marks the ByteLevel stage (last).
void read_pre_tokenizer(TokenizerImpl& t, const Json& j, const std::string& file,
                        const std::string& path, bool& byte_level_seen) {
  const Fields f(file, j, path);
  const std::string type = component_type(f);
  if (type == "Sequence") {
    const Json& list = f.at("pretokenizers");
    if (!list.is_array()) f.fail("pretokenizers", list, "expected an array");
    for (std::size_t i = 0; i < list.size(); ++i)
      read_pre_tokenizer(t, list[i], file, f.name("pretokenizers") + "[" + std::to_string(i) + "]",
                         byte_level_seen);
    return;
  }
  if (byte_level_seen)
    MT_FAIL(
        "{}: {}: a {} pre-tokenizer after ByteLevel is not supported (ByteLevel must come "
        "last)",
        file, path, type);
  if (type == "ByteLevel") {
    byte_level_seen = true;
    t.add_prefix_space = f.boolean("add_prefix_space", true);
    f.boolean("trim_offsets", true);  // offsets only: no effect on ids
    if (f.boolean("use_regex", true)) {
      // GPT-2's pattern, as `tokenizers` compiles it for ByteLevel(use_regex=true).
      t.byte_level_regex = std::make_unique<Regex>(
          R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)", false,
          file, f.name("use_regex"));
    }
  } else if (type == "Split") {
    const Json& pattern = f.at("pattern");
    const Fields pf(file, pattern, f.name("pattern"));
    std::unique_ptr<Regex> re;
    if (const auto rx = pf.opt_string("Regex")) {
      re = std::make_unique<Regex>(*rx, false, file, pf.name("Regex"));
    } else if (const auto lit = pf.opt_string("String")) {
      re = std::make_unique<Regex>(*lit, true, file, pf.name("String"));
    } else {
      f.fail("pattern", pattern, "expected {\"Regex\": ...} or {\"String\": ...}");
    }
    const std::string behavior = f.string("behavior");
    if (behavior != "Isolated")
      f.fail("behavior", f.at("behavior"), "only \"Isolated\" is supported");
    if (f.boolean("invert", false)) f.fail("invert", f.at("invert"), "only false is supported");
    t.splits.push_back(std::move(re));
  } else {
    f.fail("type", f.at("type"),
           "only the ByteLevel and Split pre-tokenizers (or a Sequence of them) are supported");
  }
}

void read_decoder(const Json& j, const std::string& file, const std::string& path) {
  if (j.is_null()) MT_FAIL("{}: {} = null: byte-level BPE needs the ByteLevel decoder", file, path);
  const Fields f(file, j, path);
  const std::string type = component_type(f);
  if (type == "ByteLevel") return;
  if (type == "Sequence") {
    const Json& list = f.at("decoders");
    if (!list.is_array() || list.empty()) f.fail("decoders", list, "expected a non-empty array");
    for (std::size_t i = 0; i < list.size(); ++i)
      read_decoder(list[i], file, f.name("decoders") + "[" + std::to_string(i) + "]");
    return;
  }
  f.fail("type", f.at("type"), "only the ByteLevel decoder is supported");
}

void read_post_processor(TokenizerImpl& t, const Json& j, const std::string& file,
                         const std::string& path, bool& template_seen) {
  if (j.is_null()) return;
  const Fields f(file, j, path);
  const std::string type = component_type(f);
  if (type == "ByteLevel") return;  // trims offsets only
  if (type == "Sequence") {
    const Json& list = f.at("processors");
    if (!list.is_array()) f.fail("processors", list, "expected an array");
    for (std::size_t i = 0; i < list.size(); ++i)
      read_post_processor(t, list[i], file, f.name("processors") + "[" + std::to_string(i) + "]",
                          template_seen);
    return;
  }
  if (type != "TemplateProcessing")
    f.fail("type", f.at("type"),
           "only the ByteLevel and TemplateProcessing post-processors are supported");
  if (template_seen) MT_FAIL("{}: {}: a second TemplateProcessing is not supported", file, path);
  template_seen = true;
  const Json& specials = f.at("special_tokens");
  const Fields sf(file, specials, f.name("special_tokens"));
  const Json& single = f.at("single");
  if (!single.is_array()) f.fail("single", single, "expected an array");
  bool seen_a = false;
  for (std::size_t i = 0; i < single.size(); ++i) {
    const std::string at = f.name("single") + "[" + std::to_string(i) + "]";
    const Fields item(file, single[i], at);
    if (const Json* st = item.find("SpecialToken")) {
      const Fields sp(file, *st, item.name("SpecialToken"));
      const std::string name = sp.string("id");
      const Json* entry = sf.find(name);
      if (entry == nullptr) sp.fail("id", sp.at("id"), "not a key of " + f.name("special_tokens"));
      const Fields ef(file, *entry, sf.name(name));
      const Json& ids = ef.at("ids");
      if (!ids.is_array() || ids.empty()) ef.fail("ids", ids, "expected a non-empty array of ids");
      for (const Json& id : ids) {
        if (!id.is_number_integer() || id.get<std::int64_t>() < 0 ||
            id.get<std::int64_t>() >= static_cast<std::int64_t>(t.tokens.size()))
          ef.fail("ids", ids, fmt::format("every id must be a token id below {}", t.tokens.size()));
        (seen_a ? t.suffix_ids : t.prefix_ids).push_back(id.get<std::int32_t>());
      }
    } else if (const Json* seq = item.find("Sequence")) {
      const Fields sq(file, *seq, item.name("Sequence"));
      const std::string id = sq.string("id");
      if (id != "A")
        sq.fail("id", sq.at("id"), "the single-sequence template can only hold sequence A");
      if (seen_a) sq.fail("id", sq.at("id"), "sequence A appears twice");
      seen_a = true;
    } else {
      MT_FAIL("{}: {} = {}: expected {{\"SpecialToken\": ...}} or {{\"Sequence\": ...}}", file, at,
              short_dump(single[i]));
    }
  }
  if (!seen_a) f.fail("single", single, "the template never places the text (Sequence A)");
}

void read_model(TokenizerImpl& t, const Fields& top) {
  const std::string& file = top.file();
  const Fields m(file, top.at("model"), "model");
  const std::string type = m.string("type");
  if (type != "BPE") m.fail("type", m.at("type"), "only BPE is supported");
  if (const Json* d = m.find("dropout"); d != nullptr && !d->is_null()) {
    if (!d->is_number() || d->get<double>() != 0.0)
      m.fail("dropout", *d, "only null or 0 is supported (dropout makes encoding random)");
  }
  if (m.boolean("byte_fallback", false))
    m.fail("byte_fallback", m.at("byte_fallback"),
           "only false is supported (byte-level BPE needs no fallback)");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const auto v = m.opt_string(key);
    if (v && !v->empty())
      m.fail(key, m.at(key), "only null or \"\" is supported for byte-level BPE");
  }
  t.ignore_merges = m.boolean("ignore_merges", false);
  t.fuse_unk = m.boolean("fuse_unk", false);

  const Json& vocab = m.at("vocab");
  if (!vocab.is_object() || vocab.empty())
    m.fail("vocab", vocab, "expected a non-empty object of token: id");
  const std::size_t n = vocab.size();
  if (n > (std::size_t{1} << 24))
    m.fail("vocab", vocab, fmt::format("{} tokens: at most 2^24 are supported", n));
  t.model_size = static_cast<std::int32_t>(n);
  t.tokens.assign(n, std::string());
  std::vector<bool> seen(n, false);
  t.model_vocab.reserve(n);
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const Json& id = it.value();
    if (!id.is_number_integer() || id.get<std::int64_t>() < 0 ||
        id.get<std::int64_t>() >= static_cast<std::int64_t>(n))
      MT_FAIL("{}: model.vocab[{}] = {}: ids must be 0..{} (each token once)", file,
              short_dump(Json(it.key())), short_dump(id), n - 1);
    const auto i = static_cast<std::size_t>(id.get<std::int64_t>());
    if (seen[i])
      MT_FAIL("{}: model.vocab[{}] = {}: the id is given to two tokens ('{}' too)", file,
              short_dump(Json(it.key())), i, t.tokens[i]);
    seen[i] = true;
    t.tokens[i] = it.key();
    t.model_vocab.emplace(it.key(), static_cast<std::int32_t>(i));
  }
  const ByteLevelMap& bl = byte_level();
  for (int b = 0; b < 256; ++b) {
    std::string ch;
    append_utf8(ch, bl.byte_to_cp[b]);
    const auto it = t.model_vocab.find(ch);
    t.byte_id[b] = it == t.model_vocab.end() ? -1 : it->second;
  }
  if (t.ignore_merges) {
    t.model_vocab_bytes.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      bool mapped = false;
      std::string bytes = byte_level_decode(t.tokens[i], &mapped);
      if (mapped) t.model_vocab_bytes.emplace(std::move(bytes), static_cast<std::int32_t>(i));
    }
  }
  if (const auto unk = m.opt_string("unk_token")) {
    const auto it = t.model_vocab.find(*unk);
    if (it == t.model_vocab.end()) m.fail("unk_token", m.at("unk_token"), "not in model.vocab");
    t.unk_id = it->second;
  }

  const Json& merges = m.at("merges");
  if (!merges.is_array()) m.fail("merges", merges, "expected an array");
  t.merges.reserve(merges.size());
  std::string joined;
  for (std::size_t r = 0; r < merges.size(); ++r) {
    const Json& e = merges[r];
    std::string a, b;
    if (e.is_string()) {
      const std::string& s = e.get_ref<const std::string&>();
      const std::size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        MT_FAIL("{}: model.merges[{}] = {}: expected \"LEFT RIGHT\" (one space)", file, r,
                short_dump(e));
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      MT_FAIL("{}: model.merges[{}] = {}: expected \"LEFT RIGHT\" or [\"LEFT\", \"RIGHT\"]", file,
              r, short_dump(e));
    }
    joined = a + b;
    const auto ia = t.model_vocab.find(a), ib = t.model_vocab.find(b),
               ij = t.model_vocab.find(joined);
    if (ia == t.model_vocab.end() || ib == t.model_vocab.end() || ij == t.model_vocab.end()) {
      const std::string& missing = ia == t.model_vocab.end()   ? a
                                   : ib == t.model_vocab.end() ? b
                                                               : joined;
      MT_FAIL("{}: model.merges[{}] = {}: '{}' is not in model.vocab", file, r, short_dump(e),
              missing);
    }
    if (r > 0x7fffffff) MT_FAIL("{}: model.merges: more than 2^31 merges", file);
    t.merges.put(ia->second, ib->second, static_cast<std::int32_t>(r), ij->second);
  }
}

void read_added_tokens(TokenizerImpl& t, const Fields& top) {
  const std::string& file = top.file();
  const Json* list = top.find("added_tokens");
  if (list == nullptr || list->is_null()) return;
  if (!list->is_array()) top.fail("added_tokens", *list, "expected an array");
  // `tokenizers` ignores the ids written here and gives each token the id it has in the model
  // vocabulary, or else the next id after the vocabulary, in file order; a file whose ids differ
  // would encode differently there, so it is refused.
  std::int32_t next_id = t.model_size;
  for (std::size_t i = 0; i < list->size(); ++i) {
    const std::string at = "added_tokens[" + std::to_string(i) + "]";
    const Fields f(file, (*list)[i], at);
    AddedToken a;
    a.content = f.string("content");
    if (a.content.empty()) f.fail("content", f.at("content"), "an added token cannot be empty");
    a.special = f.boolean("special", false);
    a.lstrip = f.boolean("lstrip", false);
    a.rstrip = f.boolean("rstrip", false);
    a.single_word = f.boolean("single_word", false);
    a.normalized = f.boolean("normalized", !a.special);
    const std::int64_t written = f.integer("id");
    if (t.added_ids.count(a.content) != 0)
      f.fail("content", f.at("content"), "this added token appears twice");
    const auto in_model = t.model_vocab.find(a.content);
    const std::int32_t id = in_model != t.model_vocab.end() ? in_model->second : next_id++;
    if (written != id)
      f.fail("id", f.at("id"),
             fmt::format("`tokenizers` gives this token id {} ({}); the file disagrees", id,
                         in_model != t.model_vocab.end()
                             ? "its id in model.vocab"
                             : "the next id after model.vocab and the added tokens before it"));
    a.id = id;
    t.added_ids.emplace(a.content, id);
    t.added_index.emplace(id, t.added.size());
    t.added.push_back(std::move(a));
  }
  t.tokens.resize(static_cast<std::size_t>(next_id));
  for (const AddedToken& a : t.added) t.tokens[static_cast<std::size_t>(a.id)] = a.content;
}

std::string nfc_normalize(std::string_view s) {
  utf8proc_uint8_t* out = nullptr;
  const utf8proc_ssize_t n = utf8proc_map(
      reinterpret_cast<const utf8proc_uint8_t*>(s.data()), static_cast<utf8proc_ssize_t>(s.size()),
      &out, static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  if (n < 0) {
    std::free(out);
    throw Error(fmt::format("NFC normalization failed: {}", utf8proc_errmsg(n)));
  }
  std::string r(reinterpret_cast<const char*>(out), static_cast<std::size_t>(n));
  std::free(out);
  return r;
}

// Whether NFC could change s: only code points from U+0300 on (combining marks, and the
// characters whose NFC differs from them or that compose with a preceding one) can, and their
// UTF-8 starts with a byte of 0xCC or more.
bool may_change_under_nfc(std::string_view s) {
  for (const char c : s)
    if (static_cast<unsigned char>(c) >= 0xCC) return true;
  return false;
}

// Llama 3's tokenizer.json is 9 MB; a directory, FIFO or device is refused naming the path.
std::string read_text_file(const std::string& path) {
  return read_file(path, std::uint64_t{1} << 30, "tokenizer file");
}

}  // namespace

// ---- encoding ------------------------------------------------------------------------------

void TokenizerImpl::encode(std::string_view text, std::vector<std::int32_t>& out,
                           bool add_special) const {
  const std::size_t bad = first_invalid_utf8(text);
  MT_CHECK(bad == std::string_view::npos,
           "tokenizer '{}': the text is not valid UTF-8 (byte offset {} of {})", source, bad,
           text.size());
  if (add_special) out.insert(out.end(), prefix_ids.begin(), prefix_ids.end());
  split_added(text, raw_trie, out, false);
  if (add_special) out.insert(out.end(), suffix_ids.begin(), suffix_ids.end());
}

// AddedVocabulary::find_matches of `tokenizers`: the trie's matches with each token's
// single_word, lstrip and rstrip rules; the text between them goes on to normalization (first
// pass) or pre-tokenization (second pass, on normalized text).
void TokenizerImpl::split_added(std::string_view s, const TokenTrie& trie,
                                std::vector<std::int32_t>& out, bool normalized_pass) const {
  auto rest = [&](std::string_view piece) {
    if (piece.empty()) return;
    if (normalized_pass)
      pre_tokenize(piece, 0, out);
    else
      normalize_then_split(piece, out);
  };
  if (trie.empty()) {
    rest(s);
    return;
  }
  std::size_t start_offset = 0, from = 0, mb = 0, me = 0;
  std::int32_t index = 0;
  while (trie.find(s, from, mb, me, index)) {
    from = me;  // the matcher goes on after its own match, whatever the flags make of it
    const AddedToken& tok = added[static_cast<std::size_t>(index)];
    std::size_t start = mb, stop = me;
    if (tok.single_word) {
      bool start_space = true, stop_space = true;
      if (start > 0) {
        std::size_t b;
        start_space = !is_word_char(prev_cp(s, start, b));
      }
      if (stop < s.size()) {
        std::size_t i = stop;
        stop_space = !is_word_char(next_cp(s, i));
      }
      if (!start_space || !stop_space) continue;
    }
    if (tok.lstrip) {
      std::size_t new_start = start;
      while (new_start > 0) {
        std::size_t b;
        if (!is_white_space(prev_cp(s, new_start, b))) break;
        new_start = b;
      }
      start = std::max(new_start, start_offset);
    }
    if (tok.rstrip) {
      while (stop < s.size()) {
        std::size_t i = stop;
        if (!is_white_space(next_cp(s, i))) break;
        stop = i;
      }
    }
    if (start_offset < start) rest(s.substr(start_offset, start - start_offset));
    out.push_back(tok.id);
    start_offset = stop;
  }
  if (start_offset < s.size()) rest(s.substr(start_offset));
}

void TokenizerImpl::normalize_then_split(std::string_view piece,
                                         std::vector<std::int32_t>& out) const {
  if (nfc && may_change_under_nfc(piece)) {
    const std::string normalized = nfc_normalize(piece);
    split_added(normalized, normalized_trie, out, true);
  } else {
    split_added(piece, normalized_trie, out, true);
  }
}

void TokenizerImpl::pre_tokenize(std::string_view piece, std::size_t stage,
                                 std::vector<std::int32_t>& out) const {
  if (stage < splits.size()) {
    splits[stage]->split_isolated(piece,
                                  [&](std::string_view sub) { pre_tokenize(sub, stage + 1, out); });
    return;
  }
  if (add_prefix_space && piece[0] != ' ') {
    std::string spaced;
    spaced.reserve(piece.size() + 1);
    spaced += ' ';
    spaced += piece;
    byte_level_words(spaced, out);
  } else {
    byte_level_words(piece, out);
  }
}

void TokenizerImpl::byte_level_words(std::string_view piece, std::vector<std::int32_t>& out) const {
  if (byte_level_regex)
    byte_level_regex->split_isolated(piece, [&](std::string_view w) { bpe(w, out); });
  else
    bpe(piece, out);
}

void TokenizerImpl::bpe(std::string_view word, std::vector<std::int32_t>& out) const {
  if (ignore_merges) {
    const auto it = model_vocab_bytes.find(word);
    if (it != model_vocab_bytes.end()) {
      out.push_back(it->second);
      return;
    }
  }
  if (word.size() == 1 && byte_id[static_cast<unsigned char>(word[0])] >= 0) {
    out.push_back(byte_id[static_cast<unsigned char>(word[0])]);
    return;
  }
  const std::uint64_t h = hash_word(word);
  if (cache.get(word, h, out)) return;
  const std::size_t before = out.size();
  merge_word(word, out);
  cache.put(word, h, out.data() + before, out.size() - before);
}

namespace {
struct Symbol {
  std::int32_t id;
  std::int32_t prev, next;  // -1: none
  bool alive;
};
struct MergeCandidate {
  std::int32_t rank, pos, new_id;
  // The heap's top is the largest: make the lowest rank, then the lowest position, largest.
  bool operator<(const MergeCandidate& o) const {
    return rank != o.rank ? rank > o.rank : pos > o.pos;
  }
};
}  // namespace

// Word::merge_all of `tokenizers`: start from one symbol per byte (its byte character's id),
// and repeatedly apply the merge of lowest rank (leftmost among equals), found with a heap
// whose stale entries are skipped.
void TokenizerImpl::merge_word(std::string_view word, std::vector<std::int32_t>& out) const {
  thread_local std::vector<Symbol> symbols;
  thread_local std::vector<MergeCandidate> heap_storage;
  symbols.clear();
  // Unknown bytes: dropped without an unk token, else one unk each (or one per run: fuse_unk).
  bool last_was_unk = false;
  for (const char ch : word) {
    const std::int32_t id = byte_id[static_cast<unsigned char>(ch)];
    if (id >= 0) {
      symbols.push_back(Symbol{id, 0, 0, true});
      last_was_unk = false;
    } else if (unk_id >= 0) {
      if (!(fuse_unk && last_was_unk)) symbols.push_back(Symbol{unk_id, 0, 0, true});
      last_was_unk = true;
    }
  }
  const auto n = static_cast<std::int32_t>(symbols.size());
  if (n == 0) return;
  for (std::int32_t i = 0; i < n; ++i) {
    symbols[i].prev = i - 1;
    symbols[i].next = i + 1 < n ? i + 1 : -1;
  }
  if (n <= 32) {
    // Few symbols (most words): find the lowest-rank pair by a scan, leftmost among equals,
    // which merges in the heap's order without one.
    thread_local std::vector<std::int32_t> pair_rank, pair_id;
    pair_rank.resize(static_cast<std::size_t>(n));
    pair_id.resize(static_cast<std::size_t>(n));
    auto rate = [&](std::int32_t i) {  // the pair (i, next of i)
      const std::int32_t j = symbols[i].next;
      if (j < 0 || !merges.get(symbols[i].id, symbols[j].id, pair_rank[i], pair_id[i]))
        pair_rank[i] = std::numeric_limits<std::int32_t>::max();
    };
    for (std::int32_t i = 0; i < n; ++i) rate(i);
    for (;;) {
      std::int32_t best = std::numeric_limits<std::int32_t>::max(), pos = -1;
      for (std::int32_t i = 0; i >= 0; i = symbols[i].next) {
        if (pair_rank[i] < best) {
          best = pair_rank[i];
          pos = i;
        }
      }
      if (pos < 0) break;
      Symbol& cur = symbols[pos];
      const std::int32_t right = cur.next;
      cur.id = pair_id[pos];
      cur.next = symbols[right].next;
      symbols[right].alive = false;
      if (cur.next >= 0) symbols[cur.next].prev = pos;
      rate(pos);
      if (cur.prev >= 0) rate(cur.prev);
    }
    for (std::int32_t i = 0; i >= 0; i = symbols[i].next) out.push_back(symbols[i].id);
    return;
  }
  std::vector<MergeCandidate>& heap = heap_storage;
  heap.clear();
  auto push = [&](MergeCandidate c) {
    heap.push_back(c);
    std::push_heap(heap.begin(), heap.end());
  };
  std::int32_t rank = 0, new_id = 0;
  for (std::int32_t i = 0; i + 1 < n; ++i)
    if (merges.get(symbols[i].id, symbols[i + 1].id, rank, new_id))
      heap.push_back(MergeCandidate{rank, i, new_id});
  std::make_heap(heap.begin(), heap.end());
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end());
    const MergeCandidate top = heap.back();
    heap.pop_back();
    Symbol& cur = symbols[top.pos];
    if (!cur.alive || cur.next < 0) continue;
    const std::int32_t right_pos = cur.next;
    const Symbol right = symbols[right_pos];
    // A stale entry: the pair at this position is no longer the one this merge was for.
    if (!merges.get(cur.id, right.id, rank, new_id) || new_id != top.new_id) continue;
    cur.id = top.new_id;
    cur.next = right.next;
    symbols[right_pos].alive = false;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (cur.prev >= 0 && merges.get(symbols[cur.prev].id, cur.id, rank, new_id))
      push(MergeCandidate{rank, cur.prev, new_id});
    if (cur.next >= 0 && merges.get(cur.id, symbols[cur.next].id, rank, new_id))
      push(MergeCandidate{rank, top.pos, new_id});
  }
  for (const Symbol& s : symbols)
    if (s.alive) out.push_back(s.id);
}

// ---- Tokenizer -----------------------------------------------------------------------------

Tokenizer::Tokenizer(std::shared_ptr<const TokenizerImpl> impl) : impl_(std::move(impl)) {}

Tokenizer Tokenizer::from_file(const std::string& path) {
  return from_json(read_text_file(path), path);
}

Tokenizer Tokenizer::from_json(std::string_view text, const std::string& where) {
  const Json root = parse_json_file_text<Json>(text, where, 64);
  const Fields top(where, root, "");
  auto t = std::make_shared<TokenizerImpl>();
  t->source = where;
  for (const char* key : {"truncation", "padding"}) {
    const Json* j = top.find(key);
    if (j != nullptr && !j->is_null())
      top.fail(key, *j, "must be null: meshtrain's tokenizer neither truncates nor pads");
  }
  read_model(*t, top);
  read_added_tokens(*t, top);
  // Absent components are null, as for `tokenizers`.
  static const Json kNull;
  auto component = [&](const char* key) -> const Json& {
    const Json* j = top.find(key);
    return j == nullptr ? kNull : *j;
  };
  read_normalizer(*t, component("normalizer"), where, "normalizer");
  bool byte_level_seen = false;
  const Json& pre = component("pre_tokenizer");
  if (pre.is_null())
    MT_FAIL("{}: pre_tokenizer = null: byte-level BPE needs a ByteLevel pre-tokenizer", where);
  read_pre_tokenizer(*t, pre, where, "pre_tokenizer", byte_level_seen);
  if (!byte_level_seen)
    MT_FAIL("{}: pre_tokenizer = {}: byte-level BPE needs a ByteLevel pre-tokenizer (last)", where,
            short_dump(pre));
  read_decoder(component("decoder"), where, "decoder");
  bool template_seen = false;
  read_post_processor(*t, component("post_processor"), where, "post_processor", template_seen);

  // Tries of the added tokens: those matched in the text as written, and the normalized ones,
  // matched (in their normalized form) in the normalized text.
  for (std::size_t i = 0; i < t->added.size(); ++i) {
    const AddedToken& a = t->added[i];
    if (!a.normalized) {
      t->raw_trie.add(a.content, static_cast<std::int32_t>(i));
    } else {
      const std::string c = t->nfc ? nfc_normalize(a.content) : a.content;
      if (!c.empty()) t->normalized_trie.add(c, static_cast<std::int32_t>(i));
    }
  }

  const std::size_t total = t->tokens.size();
  t->token_bytes.resize(total);
  t->special.assign(total, false);
  for (std::size_t i = 0; i < total; ++i) t->token_bytes[i] = byte_level_decode(t->tokens[i]);
  for (const AddedToken& a : t->added)
    if (a.special) t->special[static_cast<std::size_t>(a.id)] = true;

  if (!t->prefix_ids.empty()) t->bos = t->prefix_ids.front();
  if (!t->suffix_ids.empty()) {
    t->eos = t->suffix_ids.back();
  } else {
    for (const char* name : {"<|end_of_text|>", "<|endoftext|>", "</s>"}) {
      const auto it = t->added_ids.find(std::string_view(name));
      if (it != t->added_ids.end() && t->special[static_cast<std::size_t>(it->second)]) {
        t->eos = it->second;
        break;
      }
    }
  }
  return Tokenizer(std::move(t));
}

std::vector<std::int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::vector<std::int32_t> out;
  out.reserve(text.size() / 3 + 4);
  impl_->encode(text, out, add_special_tokens);
  return out;
}

void Tokenizer::encode_append(std::string_view text, std::vector<std::int32_t>& out,
                              bool add_special_tokens) const {
  impl_->encode(text, out, add_special_tokens);
}

std::string Tokenizer::decode_bytes(std::span<const std::int32_t> ids,
                                    bool skip_special_tokens) const {
  const TokenizerImpl& t = *impl_;
  std::string out;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const std::int32_t id = ids[i];
    MT_CHECK(id >= 0 && static_cast<std::size_t>(id) < t.tokens.size(),
             "tokenizer '{}': cannot decode id {} (position {}): ids are 0..{}", t.source, id, i,
             t.tokens.size() - 1);
    if (skip_special_tokens && t.special[static_cast<std::size_t>(id)]) continue;
    out += t.token_bytes[static_cast<std::size_t>(id)];
  }
  return out;
}

std::string Tokenizer::decode(std::span<const std::int32_t> ids, bool skip_special_tokens) const {
  return utf8_lossy(decode_bytes(ids, skip_special_tokens));
}

std::optional<std::int32_t> Tokenizer::token_to_id(std::string_view token) const {
  if (const auto it = impl_->added_ids.find(token); it != impl_->added_ids.end()) return it->second;
  if (const auto it = impl_->model_vocab.find(token); it != impl_->model_vocab.end())
    return it->second;
  return std::nullopt;
}

const std::string& Tokenizer::id_to_token(std::int32_t id) const {
  MT_CHECK(id >= 0 && static_cast<std::size_t>(id) < impl_->tokens.size(),
           "tokenizer '{}': no token has id {} (ids are 0..{})", impl_->source, id,
           impl_->tokens.size() - 1);
  return impl_->tokens[static_cast<std::size_t>(id)];
}

std::int32_t Tokenizer::vocab_size() const {
  return static_cast<std::int32_t>(impl_->tokens.size());
}

bool Tokenizer::is_special(std::int32_t id) const {
  return id >= 0 && static_cast<std::size_t>(id) < impl_->special.size() &&
         impl_->special[static_cast<std::size_t>(id)];
}

const std::vector<AddedToken>& Tokenizer::added_tokens() const {
  return impl_->added;
}
std::optional<std::int32_t> Tokenizer::bos_id() const {
  return impl_->bos;
}
std::optional<std::int32_t> Tokenizer::eos_id() const {
  return impl_->eos;
}
const std::string& Tokenizer::source() const {
  return impl_->source;
}

// ---- decoding ------------------------------------------------------------------------------

std::string utf8_lossy(std::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  const std::size_t n = bytes.size();
  std::string out;
  out.reserve(n);
  std::size_t i = 0;
  while (i < n) {
    const Utf8Step st = utf8_step(p + i, n - i);
    if (st.valid)
      out.append(bytes.data() + i, st.len);
    else
      out += kReplacement;
    i += st.len;
  }
  return out;
}

Tokenizer::StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : impl_(tokenizer.impl_), skip_special_(skip_special_tokens) {}

std::string Tokenizer::StreamDecoder::push(std::int32_t id) {
  const TokenizerImpl& t = *impl_;
  MT_CHECK(id >= 0 && static_cast<std::size_t>(id) < t.tokens.size(),
           "tokenizer '{}': cannot decode id {}: ids are 0..{}", t.source, id, t.tokens.size() - 1);
  if (!(skip_special_ && t.special[static_cast<std::size_t>(id)]))
    pending_ += t.token_bytes[static_cast<std::size_t>(id)];
  const auto* p = reinterpret_cast<const unsigned char*>(pending_.data());
  const std::size_t n = pending_.size();
  std::string out;
  std::size_t i = 0;
  while (i < n) {
    const Utf8Step st = utf8_step(p + i, n - i);
    if (st.incomplete) break;  // wait for the bytes that decide it
    if (st.valid)
      out.append(pending_, i, st.len);
    else
      out += kReplacement;
    i += st.len;
  }
  pending_.erase(0, i);
  return out;
}

std::string Tokenizer::StreamDecoder::finish() {
  std::string out = utf8_lossy(pending_);
  pending_.clear();
  return out;
}

}  // namespace meshtrain
