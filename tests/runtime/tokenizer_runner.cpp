// The C++ side of test_tokenizer_hf.py: loads a tokenizer.json, encodes texts and decodes id
// sequences that the script wrote, and writes what it got for the script to compare with the
// `tokenizers` library's results.
//
//   tokenizer_runner TOKENIZER.json CASES.bin OUT.bin
//
// CASES.bin (little-endian): u32 text count, then each text as u32 length + UTF-8 bytes; u32
// sequence count, then each id sequence as u32 length + i32 ids.
// OUT.bin: i32 vocab_size, bos, eos (-1 when none); every id's token as u32 length + bytes; per
// text its ids with and without the special tokens (u32 count + i32 ids each); per id sequence
// decode(), decode(skip_special_tokens) and the StreamDecoder's concatenated output (u32 length
// + bytes each).
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "runtime/error.hpp"
#include "runtime/tokenizer.hpp"

namespace {

class Reader {
 public:
  explicit Reader(std::string bytes) : bytes_(std::move(bytes)) {}
  std::uint32_t u32() {
    std::uint32_t v = 0;
    take(&v, 4);
    return v;
  }
  std::string str() {
    std::string s(u32(), '\0');
    take(s.data(), s.size());
    return s;
  }
  std::vector<std::int32_t> ids() {
    std::vector<std::int32_t> v(u32());
    take(v.data(), v.size() * 4);
    return v;
  }

 private:
  void take(void* dst, std::size_t n) {
    if (pos_ + n > bytes_.size()) throw std::runtime_error("CASES.bin is truncated");
    std::copy_n(bytes_.data() + pos_, n, static_cast<char*>(dst));
    pos_ += n;
  }
  std::string bytes_;
  std::size_t pos_ = 0;
};

void put_u32(std::string& out, std::uint32_t v) {
  out.append(reinterpret_cast<char*>(&v), 4);
}
void put_i32(std::string& out, std::int32_t v) {
  out.append(reinterpret_cast<char*>(&v), 4);
}
void put_str(std::string& out, const std::string& s) {
  put_u32(out, static_cast<std::uint32_t>(s.size()));
  out += s;
}
void put_ids(std::string& out, const std::vector<std::int32_t>& ids) {
  put_u32(out, static_cast<std::uint32_t>(ids.size()));
  out.append(reinterpret_cast<const char*>(ids.data()), ids.size() * 4);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s TOKENIZER.json CASES.bin OUT.bin\n", argv[0]);
    return 2;
  }
  try {
    const meshtrain::Tokenizer tok = meshtrain::Tokenizer::from_file(argv[1]);
    std::ifstream in(argv[2], std::ios::binary);
    Reader r(std::string(std::istreambuf_iterator<char>(in), {}));
    std::string out;
    put_i32(out, tok.vocab_size());
    put_i32(out, tok.bos_id().value_or(-1));
    put_i32(out, tok.eos_id().value_or(-1));
    for (std::int32_t id = 0; id < tok.vocab_size(); ++id) put_str(out, tok.id_to_token(id));
    const std::uint32_t texts = r.u32();
    std::vector<std::int32_t> ids;
    for (std::uint32_t i = 0; i < texts; ++i) {
      const std::string text = r.str();
      put_ids(out, tok.encode(text, true));
      ids.clear();
      tok.encode_append(text, ids, false);
      put_ids(out, ids);
    }
    const std::uint32_t seqs = r.u32();
    for (std::uint32_t i = 0; i < seqs; ++i) {
      const std::vector<std::int32_t> seq = r.ids();
      put_str(out, tok.decode(seq));
      put_str(out, tok.decode(seq, true));
      meshtrain::Tokenizer::StreamDecoder stream(tok);
      std::string streamed;
      for (const std::int32_t id : seq) streamed += stream.push(id);
      streamed += stream.finish();
      put_str(out, streamed);
    }
    std::ofstream(argv[3], std::ios::binary) << out;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tokenizer_runner: %s\n", e.what());
    return 1;
  }
  return 0;
}
