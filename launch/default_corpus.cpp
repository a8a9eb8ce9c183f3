// The built-in corpus, embedded at build time (see launch/CMakeLists.txt).
#include "launch/default_corpus.hpp"

asm(".section .rodata\n"
    ".global mt_default_corpus_begin\n"
    ".type mt_default_corpus_begin, @object\n"
    "mt_default_corpus_begin:\n"
    ".incbin \"" MESHTRAIN_CORPUS_PATH
    "\"\n"
    ".global mt_default_corpus_end\n"
    ".type mt_default_corpus_end, @object\n"
    "mt_default_corpus_end:\n"
    ".byte 0\n"
    ".previous\n");

extern "C" const char mt_default_corpus_begin[];
extern "C" const char mt_default_corpus_end[];

namespace meshtrain::launch {

std::string_view default_corpus() {
  return std::string_view(
      mt_default_corpus_begin,
      static_cast<std::size_t>(mt_default_corpus_end - mt_default_corpus_begin));
}

}  // namespace meshtrain::launch
