#include "launch/toml_guard.hpp"

namespace meshtrain::launch {

std::string toml_hazard(std::string_view s, int& line, int& column) {
  std::size_t i = 0;
  line = 1;
  column = 1;
  auto advance = [&](std::size_t to) {
    for (; i < to && i < s.size(); ++i) {
      if (s[i] == '\n') {
        ++line;
        column = 1;
      } else if ((static_cast<unsigned char>(s[i]) & 0xc0) != 0x80) {
        ++column;
      }
    }
  };
  auto high = [&](std::size_t k) {
    return k < s.size() && static_cast<unsigned char>(s[k]) >= 0x80;
  };
  bool value = false, header = false, line_start = true;
  std::string open;  // the arrays ('[') and inline tables ('{') open in a value, innermost last
  char prev = '\n';  // the last character outside strings and comments that is not a blank
  while (i < s.size()) {
    const char c = s[i];
    if (c == '\n') {
      if (open.empty()) value = header = false;
      line_start = true;
      prev = '\n';
      advance(i + 1);
      continue;
    }
    if (c == ' ' || c == '\t' || c == '\r') {
      advance(i + 1);
      continue;
    }
    if (c == '#') {
      std::size_t e = s.find('\n', i);
      advance(e == std::string_view::npos ? s.size() : e);
      continue;
    }
    if (line_start && !value && c == '[') header = true;
    line_start = false;
    // A quote starts a string only where a key or value starts; elsewhere ("0\"x") toml++ reads
    // it as part of a bare value, and the characters after it as such.
    // ('.' only in a key: in a value it is a float's, "2.'x").
    const bool starts = prev == '\n' || prev == '=' || prev == '[' || prev == ',' || prev == '{' ||
                        (prev == '.' && !value);
    // The same holds for the characters that open a place where a quote may start: in a value,
    // '[' and '{' open an array or a table only where a value starts ("0[" is a bare value's),
    // ',' separates only inside one, and '=' follows a key only in a table.
    bool opens = true;
    if (value && (c == '[' || c == '{')) {
      opens = starts;
      if (opens) open += c;
    } else if (value && (c == ']' || c == '}')) {
      if (!open.empty()) open.pop_back();
    } else if (value && c == ',') {
      opens = !open.empty();
    } else if (c == '=') {
      opens = !header && (!value || (!open.empty() && open.back() == '{'));
      if (!header) value = true;
    }
    prev = opens ? c : 'x';
    if ((c == '"' || c == '\'') && starts) {
      const bool multi = s.compare(i, 3, std::string(3, c)) == 0;
      const std::size_t begin = i;
      std::size_t k = i + (multi ? 3 : 1);
      std::size_t hazard = std::string_view::npos;
      while (k < s.size()) {
        if (s[k] == c && (!multi || s.compare(k, 3, std::string(3, c)) == 0)) break;
        if (!multi && s[k] == '\n') break;
        if (c == '"' && s[k] == '\\') {
          std::size_t j = k + 1;
          if (multi && high(j) && hazard == std::string_view::npos) hazard = j;
          if (multi && j < s.size() &&
              (s[j] == ' ' || s[j] == '\t' || s[j] == '\r' || s[j] == '\n')) {
            while (j < s.size() && (s[j] == ' ' || s[j] == '\t' || s[j] == '\r' || s[j] == '\n'))
              ++j;
            if (high(j) && hazard == std::string_view::npos) hazard = j;
            k = j;
            continue;
          }
          k = j + 1;
          continue;
        }
        ++k;
      }
      std::size_t end = k < s.size() ? k + (multi ? 3 : 1) : s.size();
      // Up to two more quotes close a multi-line string ("""a"""" holds a\").
      for (int extra = 0; multi && extra < 2 && end < s.size() && s[end] == c; ++extra) ++end;
      std::size_t after = end;
      while (after < s.size() && (s[after] == ' ' || s[after] == '\t')) ++after;
      const bool key =
          header || !value || (after < s.size() && (s[after] == '=' || s[after] == '.'));
      if (key)
        for (std::size_t q = begin; q < end; ++q)
          if (high(q)) {
            advance(q);
            return "a quoted key holds a character that is not ASCII (meshtrain's keys are "
                   "ASCII)";
          }
      if (hazard != std::string_view::npos) {
        advance(hazard);
        return "a character that is not ASCII right after a backslash or a line-ending backslash "
               "in a multi-line string is not supported (the TOML library cannot parse it "
               "safely); escape it as \\uXXXX";
      }
      advance(end);
      continue;
    }
    if (high(i))
      return "a character that is not ASCII outside a string or comment (TOML allows them only "
             "there)";
    advance(i + 1);
  }
  return "";
}

}  // namespace meshtrain::launch
