// The tokenizer's Unicode: UTF-8 steps and code points (Rust's Utf8Chunks and from_utf8_lossy's
// rules), the White_Space and \w classes, GPT-2's byte <-> character mapping (bytes_to_unicode)
// and NFC by utf8proc. Declared in runtime/tokenizer_impl.hpp.
#include <utf8proc.h>

#include <array>
#include <cstdlib>
#include <cstring>

#include "runtime/error.hpp"
#include "runtime/tokenizer_impl.hpp"

namespace meshtrain::tokenizer_detail {

// ---- UTF-8 ---------------------------------------------------------------------------------

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

const ByteLevelMap& byte_level() {
  static const ByteLevelMap m;
  return m;
}

// A token's bytes as the ByteLevel decoder gives them: every character mapped back to its byte
// when all of them are byte characters, else the token's own UTF-8 (added tokens like "<|x y|>").
// `mapped` says which.
std::string byte_level_decode(std::string_view token, bool* mapped) {
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

}  // namespace meshtrain::tokenizer_detail
