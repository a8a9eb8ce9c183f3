// Fuzz target: Hugging Face tokenizer.json files (runtime/tokenizer.hpp): Tokenizer::from_file,
// then, for what it accepts, encoding of a few fixed texts, of each added token inside text and of
// the input itself, decoding the ids back (whole and streamed).
#include <nlohmann/json.hpp>

#include "runtime/tokenizer.hpp"
#include "tests/fuzz/fuzz.hpp"

namespace meshtrain::fuzz {

namespace {

using Json = nlohmann::json;

// GPT-2's bytes_to_unicode for byte b, as UTF-8.
std::string byte_char(int b) {
  auto direct = [](int x) {
    return (x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || x >= 0xAE;
  };
  int cp = b;
  if (!direct(b)) {
    cp = 256;
    for (int x = 0; x < b; ++x) cp += direct(x) ? 0 : 1;
  }
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

Json byte_level(bool use_regex) {
  return {{"type", "ByteLevel"},
          {"add_prefix_space", false},
          {"trim_offsets", true},
          {"use_regex", use_regex}};
}

Json added(int id, const std::string& content) {
  return {{"id", id},        {"content", content},  {"single_word", false}, {"lstrip", false},
          {"rstrip", false}, {"normalized", false}, {"special", true}};
}

// A small byte-level BPE: the 256 byte characters and a few merges; merges as "a b" or [a, b].
Json model(bool pairs, bool ignore_merges) {
  Json vocab = Json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_char(b)] = b;
  const std::string sp = byte_char(' ');
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"t", "h"}, {"th", "e"}, {sp, "the"}, {"i", "n"}, {sp, "in"}, {"e", "r"}, {"1", "2"}};
  Json list = Json::array();
  for (const auto& [a, b] : merges) {
    vocab[a + b] = static_cast<int>(vocab.size());
    list.push_back(pairs ? Json::array({a, b}) : Json(a + " " + b));
  }
  return {{"type", "BPE"},     {"dropout", nullptr},     {"unk_token", nullptr},
          {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", ignore_merges},
          {"vocab", vocab},    {"merges", list}};
}

const char* kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

}  // namespace

void write_seeds(const std::string& dir) {
  // GPT-2 style.
  Json gpt2 = {{"version", "1.0"},
               {"truncation", nullptr},
               {"padding", nullptr},
               {"added_tokens", {added(263, "<|endoftext|>")}},
               {"normalizer", nullptr},
               {"pre_tokenizer", byte_level(true)},
               {"post_processor", byte_level(true)},
               {"decoder", byte_level(true)},
               {"model", model(false, false)}};
  // Llama 3 style: Split + ByteLevel, ignore_merges, a template adding <|begin_of_text|>.
  Json llama = gpt2;
  llama["added_tokens"] = {added(263, "<|begin_of_text|>"), added(264, "<|end_of_text|>")};
  llama["pre_tokenizer"] = {{"type", "Sequence"},
                            {"pretokenizers",
                             {{{"type", "Split"},
                               {"pattern", {{"Regex", kLlama3Pattern}}},
                               {"behavior", "Isolated"},
                               {"invert", false}},
                              byte_level(false)}}};
  llama["post_processor"] = {
      {"type", "Sequence"},
      {"processors",
       {byte_level(true),
        {{"type", "TemplateProcessing"},
         {"single",
          {{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
           {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
         {"pair", Json::array()},
         {"special_tokens",
          {{"<|begin_of_text|>",
            {{"id", "<|begin_of_text|>"}, {"ids", {263}}, {"tokens", {"<|begin_of_text|>"}}}}}}}}}};
  llama["model"] = model(true, true);
  // Qwen2 style: NFC.
  Json qwen = llama;
  qwen["normalizer"] = {{"type", "NFC"}};
  qwen["added_tokens"] = {added(263, "<|endoftext|>"), added(264, "<|im_start|>"),
                          added(265, "<|im_end|>")};
  qwen["post_processor"] = byte_level(false);
  qwen["model"] = model(false, false);
  for (const auto& [name, j] :
       {std::pair<const char*, Json>{"gpt2", gpt2}, {"llama3", llama}, {"qwen2", qwen}}) {
    const std::string text = j.dump(1);
    write_file(dir + "/seed-" + name + ".json", text.data(), text.size());
  }
}

}  // namespace meshtrain::fuzz

using namespace meshtrain;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string path = fuzz::scratch_dir() + "/tokenizer.json";
  fuzz::write_file(path, data, size);
  fuzz::g_accepted = fuzz::accepts(path, [&] {
    const Tokenizer t = Tokenizer::from_file(path);
    FUZZ_EXPECT(t.vocab_size() >= 1, "vocab_size {}", t.vocab_size());
    std::vector<std::string> texts = {"The thing in 12345 there's THE end.\n\n  \t x\r\n",
                                      "h\xC3\xA9llo e\xCC\x81 \xE4\xBD\xA0\xE5\xA5\xBD "
                                      "\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD 1\xEF\xB8\x8F\xE2\x83\xA3",
                                      ""};
    const std::string_view input(reinterpret_cast<const char*>(data),
                                 std::min<std::size_t>(size, 4096));
    if (utf8_lossy(input) == input) texts.emplace_back(input);
    std::size_t n_added = 0;
    for (const AddedToken& a : t.added_tokens()) {
      if (++n_added > 16) break;
      texts.push_back("a " + a.content + a.content + "b " + a.content);
    }
    for (const std::string& text : texts) {
      for (const bool special : {true, false}) {
        const std::vector<std::int32_t> ids = t.encode(text, special);
        for (const std::int32_t id : ids)
          FUZZ_EXPECT(id >= 0 && id < t.vocab_size(), "id {} of vocab {}", id, t.vocab_size());
        const std::string decoded = t.decode(ids);
        FUZZ_EXPECT(utf8_lossy(decoded) == decoded, "decode gave invalid UTF-8");
        Tokenizer::StreamDecoder stream(t);
        std::string streamed;
        for (const std::int32_t id : ids) streamed += stream.push(id);
        streamed += stream.finish();
        FUZZ_EXPECT(streamed == decoded, "streamed decode differs");
        t.decode(ids, true);
      }
    }
    for (std::int32_t id = 0; id < std::min(t.vocab_size(), 512); ++id) {
      const std::string& token = t.id_to_token(id);
      const auto back = t.token_to_id(token);
      FUZZ_EXPECT(back == id, "token_to_id(id_to_token({})) = {}", id, back.value_or(-1));
    }
  });
  return 0;
}
