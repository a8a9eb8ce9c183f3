// A guard for a bug of the TOML library: toml++ 3.3.0 (Debian 12's) reaches
// __builtin_unreachable(), undefined behaviour, when it asks whether some non-ASCII characters
// are whitespace (upstream marzer/tomlplusplus#295, fixed after 3.3.0; found by fuzzing): a
// non-ASCII character outside strings and comments, in a quoted key, or in a multi-line basic
// string right after a backslash or where a line-ending backslash skips whitespace. TOML allows
// such characters only in strings and comments, and meshtrain's keys are ASCII, so these are
// refused before toml++ sees the text.
//
// Delete when: every toml++ meshtrain builds with has the fix, marzer/tomlplusplus#305 (merged
// 2026-07, after v3.4.0; Debian 12 has 3.3.0). Then remove this file and its two calls in
// launch/config.cpp, and let the config fuzz target (tests/fuzz) confirm that the characters
// refused here are errors, not crashes.
#pragma once

#include <string>
#include <string_view>

namespace meshtrain::launch {

// "" when toml++ can parse `text` safely; else why not, with `line` and `column` (1-based, in
// characters) of the offending character.
std::string toml_hazard(std::string_view text, int& line, int& column);

}  // namespace meshtrain::launch
