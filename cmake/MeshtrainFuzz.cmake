# MESHTRAIN_FUZZ: the libFuzzer build (tests/fuzz/README.md). Clang only. Every source is compiled
# with AddressSanitizer, UndefinedBehaviorSanitizer (any report aborts, so the fuzzer sees it)
# and libFuzzer's coverage instrumentation; tests/fuzz links each target with libFuzzer's main.
# The fuzz preset builds with -O1 and line tables only (quick to build, readable stacks) and
# without NDEBUG, so that nlohmann-json's own assertions (a missing key read through a const
# operator[], ...) are findings too.

if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
  message(FATAL_ERROR "meshtrain: MESHTRAIN_FUZZ needs clang (libFuzzer), but the C++ compiler is "
                      "${CMAKE_CXX_COMPILER_ID} (${CMAKE_CXX_COMPILER}). Use the preset: cmake --preset "
                      "fuzz, or pass -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++. Install "
                      "it with: apt-get install clang libclang-rt-14-dev libomp-dev")
endif()
if(MESHTRAIN_SANITIZE)
  message(FATAL_ERROR "meshtrain: MESHTRAIN_FUZZ already builds with ASan and UBSan; turn "
                      "MESHTRAIN_SANITIZE off")
endif()

include(CheckCXXSourceCompiles)
set(CMAKE_REQUIRED_FLAGS "-fsanitize=fuzzer,address,undefined")
check_cxx_source_compiles([[
#include <cstddef>
#include <cstdint>
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t*, std::size_t) { return 0; }
]] MESHTRAIN_HAVE_LIBFUZZER)
unset(CMAKE_REQUIRED_FLAGS)
if(NOT MESHTRAIN_HAVE_LIBFUZZER)
  message(FATAL_ERROR "meshtrain: clang cannot link a libFuzzer target with ASan and UBSan "
                      "(-fsanitize=fuzzer,address,undefined). Install the runtime with: apt-get "
                      "install libclang-rt-14-dev (the version of your clang)")
endif()

add_compile_options(-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all
                    -fno-omit-frame-pointer -gline-tables-only)
add_link_options(-fsanitize=address,undefined)

# Debian's toml++ is a compiled library; here its parser is compiled into meshtrain from the
# headers instead (the same source, TOML_HEADER_ONLY=1), so that it is instrumented and fuzzed
# with the config reader. Defined before find_package(tomlplusplus), which then keeps it.
add_library(tomlplusplus::tomlplusplus INTERFACE IMPORTED)
# Its internal assertions are off, as in the release build users run: toml++ 3.3.0 asserts in
# parse_key() on a table header such as "[!" where the release build reports the parse error
# ("expected bare key starting character"); fuzzing found it, tests/launch/test_config.cpp checks
# the error.
# (A compile option, not a definition: CMake drops function-like definitions.)
set_target_properties(tomlplusplus::tomlplusplus PROPERTIES
  INTERFACE_COMPILE_DEFINITIONS TOML_HEADER_ONLY=1
  INTERFACE_COMPILE_OPTIONS "-DTOML_ASSERT(expr)=static_assert(true)")
