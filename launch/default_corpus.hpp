// The built-in default corpus: Debian's fortune cookies, embedded at build time
// (launch/CMakeLists.txt), what `meshtrain train` trains on without data.train.
#pragma once

#include <string_view>

namespace meshtrain::launch {

std::string_view default_corpus();

}  // namespace meshtrain::launch
