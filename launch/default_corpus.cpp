// The built-in corpus, embedded at build time (see launch/CMakeLists.txt).
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
