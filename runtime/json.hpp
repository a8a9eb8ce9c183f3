// Parsing JSON that comes from files (checkpoint manifests, Hugging Face config.json): nlohmann's
// parser with the two guards that untrusted input needs.
//
// - Depth: the parser itself is iterative, but dump(), comparison and copies of the value it
//   returns recurse once per level, so "[[[[...]]]]" a few hundred thousand levels deep would
//   overflow the stack after a successful parse. Nesting beyond max_depth is refused.
// - Duplicate keys: nlohmann keeps one of two equal keys of an object silently; a file that
//   names a tensor or a file twice is refused instead.
#pragma once

#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/error.hpp"

namespace meshtrain {

// Parses `text`; throws InvalidArgument starting with `where` (the file) for invalid JSON ("WHERE
// is not valid JSON (byte N): reason"), nesting deeper than max_depth (the root is depth 1), or an
// object that has a key twice. Json: nlohmann::json or nlohmann::ordered_json.
template <typename Json>
Json parse_json_file_text(std::string_view text, const std::string& where, int max_depth) {
  std::vector<std::set<std::string>> keys;  // one set per open object
  auto guard = [&](int depth, typename Json::parse_event_t event, Json& parsed) {
    using E = typename Json::parse_event_t;
    if (event == E::object_start || event == E::array_start) {
      MT_CHECK(depth < max_depth,
               "{}: the JSON nests objects or arrays more than {} levels deep (not a file of this "
               "kind)",
               where, max_depth);
      if (event == E::object_start) keys.emplace_back();
    } else if (event == E::object_end) {
      if (!keys.empty()) keys.pop_back();
    } else if (event == E::key && !keys.empty()) {
      MT_CHECK(keys.back().insert(parsed.template get<std::string>()).second,
               "{}: the key '{}' appears twice in one JSON object", where,
               parsed.template get<std::string>());
    }
    return true;
  };
  try {
    return Json::parse(text.begin(), text.end(), guard);
  } catch (const typename Json::parse_error& e) {
    std::string reason = e.what();
    if (auto pos = reason.find("column "); pos != std::string::npos) {
      if (auto colon = reason.find(": ", pos); colon != std::string::npos)
        reason = reason.substr(colon + 2);
    }
    MT_FAIL("{} is not valid JSON (byte {}): {}", where, e.byte > 0 ? e.byte - 1 : 0, reason);
  } catch (const typename Json::exception& e) {
    // out_of_range 406: a number beyond double's range ("1e999"), which JSON's grammar allows.
    std::string reason = e.what();
    if (auto pos = reason.find("] "); pos != std::string::npos) reason = reason.substr(pos + 2);
    MT_FAIL("{} is not valid JSON: {}", where, reason);
  }
}

}  // namespace meshtrain
