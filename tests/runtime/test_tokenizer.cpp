// The tokenizer.json reader's refusals (each names the file and the field), and the tokenizer's
// own contracts on a small hand-made byte-level BPE. Agreement with the `tokenizers` library on
// real configurations is test_tokenizer_hf.py's job.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "runtime/error.hpp"
#include "runtime/tokenizer.hpp"

namespace meshtrain {
namespace {

using Json = nlohmann::json;

// GPT-2's bytes_to_unicode, written out independently of the reader.
std::string byte_char(int b) {
  const bool direct = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
  int cp = b;
  if (!direct) {
    int n = 0;
    for (int x = 0; x < b; ++x) {
      const bool d = (x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE);
      if (!d) ++n;
    }
    cp = 256 + n;
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

// A GPT-2-like tokenizer: the 256 byte characters, a few merges, <|endoftext|> as an added
// special token.
Json small_tokenizer() {
  Json vocab = Json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_char(b)] = b;
  const std::string sp = byte_char(' ');
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"h", "e"},      {"l", "l"}, {"he", "ll"},      {"hell", "o"},     {sp, "w"},
      {sp + "w", "o"}, {"r", "l"}, {sp + "wo", "rl"}, {sp + "worl", "d"}};
  Json merge_list = Json::array();
  for (const auto& [a, b] : merges) {
    vocab[a + b] = static_cast<int>(vocab.size());
    merge_list.push_back(a + " " + b);
  }
  const int n = static_cast<int>(vocab.size());
  Json bl = {{"type", "ByteLevel"},
             {"add_prefix_space", false},
             {"trim_offsets", true},
             {"use_regex", true}};
  return Json{{"version", "1.0"},
              {"truncation", nullptr},
              {"padding", nullptr},
              {"added_tokens",
               {{{"id", n},
                 {"content", "<|endoftext|>"},
                 {"single_word", false},
                 {"lstrip", false},
                 {"rstrip", false},
                 {"normalized", false},
                 {"special", true}}}},
              {"normalizer", nullptr},
              {"pre_tokenizer", bl},
              {"post_processor", bl},
              {"decoder", bl},
              {"model",
               {{"type", "BPE"},
                {"dropout", nullptr},
                {"unk_token", nullptr},
                {"continuing_subword_prefix", ""},
                {"end_of_word_suffix", ""},
                {"fuse_unk", false},
                {"byte_fallback", false},
                {"vocab", vocab},
                {"merges", merge_list}}}};
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// The message of loading `j` as "tok.json".
std::string load_error(const Json& j) {
  return error_of([&] { Tokenizer::from_json(j.dump(), "tok.json"); });
}

#define EXPECT_HAS(haystack, needle)                                                      \
  do {                                                                                    \
    const std::string h_ = (haystack);                                                    \
    EXPECT_NE(h_.find(needle), std::string::npos) << "message: " << h_ << "\n"            \
                                                  << "expected to contain: " << (needle); \
  } while (0)

TEST(Tokenizer, EncodesMergesAndAddedTokens) {
  const Tokenizer t = Tokenizer::from_json(small_tokenizer().dump(), "small");
  EXPECT_EQ(t.vocab_size(), 256 + 9 + 1);
  const std::int32_t hello = *t.token_to_id("hello"), world = *t.token_to_id("Ġworld");
  const std::int32_t eot = *t.token_to_id("<|endoftext|>");
  EXPECT_EQ(t.encode("hello world"), (std::vector<std::int32_t>{hello, world}));
  // Added tokens are split out before pre-tokenization: "world" there has no leading space.
  const auto ids = t.encode("hello<|endoftext|> world!");
  EXPECT_EQ(ids, (std::vector<std::int32_t>{hello, eot, world, '!'}));
  EXPECT_EQ(t.decode(ids), "hello<|endoftext|> world!");
  EXPECT_EQ(t.decode(ids, true), "hello world!");
  EXPECT_TRUE(t.is_special(eot));
  EXPECT_FALSE(t.is_special(hello));
  EXPECT_EQ(t.id_to_token(world), "Ġworld");
  EXPECT_EQ(t.eos_id(), eot);
  EXPECT_EQ(t.bos_id(), std::nullopt);
  EXPECT_TRUE(t.encode("").empty());
  // Byte-level: every byte has a token, so any text round-trips.
  const std::string odd = "tab\there\r\n\xC3\xA9\xE2\x82\xAC \xF0\x9F\x98\x80 \x01";
  EXPECT_EQ(t.decode(t.encode(odd)), odd);
}

TEST(Tokenizer, RefusesInvalidUtf8AndBadIds) {
  const Tokenizer t = Tokenizer::from_json(small_tokenizer().dump(), "small");
  EXPECT_HAS(error_of([&] { t.encode("ok \xC3\x28"); }), "not valid UTF-8 (byte offset 3 of 5)");
  const std::vector<std::int32_t> bad = {1, 2, t.vocab_size()};
  EXPECT_HAS(error_of([&] { t.decode(bad); }), "cannot decode id 266 (position 2)");
  EXPECT_HAS(error_of([&] { t.id_to_token(-1); }), "no token has id -1");
  EXPECT_EQ(t.token_to_id("no such token"), std::nullopt);
}

TEST(Tokenizer, DecodeReplacesInvalidUtf8LikeRust) {
  // Rust's from_utf8_lossy: one U+FFFD per maximal invalid subsequence.
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(utf8_lossy("a\xF0\x90\x80z"), "a" + r + "z");         // truncated 4-byte sequence
  EXPECT_EQ(utf8_lossy("\xED\xA0\x80"), r + r + r);               // a surrogate: 3 invalid bytes
  EXPECT_EQ(utf8_lossy("\xC0\x80"), r + r);                       // overlong
  EXPECT_EQ(utf8_lossy("x\xE2\x82"), "x" + r);                    // cut at the end
  EXPECT_EQ(utf8_lossy("\xF4\x90\x80\x80"), r + r + r + r);       // beyond U+10FFFF
  EXPECT_EQ(utf8_lossy("\xE2\x82\xAC\xFF"), "\xE2\x82\xAC" + r);  // € then a stray byte

  const Tokenizer t = Tokenizer::from_json(small_tokenizer().dump(), "small");
  // "€" is three byte tokens; its first two alone are an incomplete sequence.
  std::vector<std::int32_t> ids = t.encode("\xE2\x82\xAC!");
  ASSERT_EQ(ids.size(), 4u);
  EXPECT_EQ(t.decode_bytes(std::span(ids).first(2)), "\xE2\x82");
  EXPECT_EQ(t.decode(std::span(ids).first(2)), r);
  EXPECT_EQ(t.decode(ids), "\xE2\x82\xAC!");
}

TEST(Tokenizer, StreamDecoderHoldsBackIncompleteCharacters) {
  const Tokenizer t = Tokenizer::from_json(small_tokenizer().dump(), "small");
  const std::string text = "h\xC3\xA9llo \xF0\x9F\x98\x80 world";
  const std::vector<std::int32_t> ids = t.encode(text);
  Tokenizer::StreamDecoder s(t);
  std::string got;
  std::vector<std::string> pieces;
  for (const std::int32_t id : ids) {
    pieces.push_back(s.push(id));
    got += pieces.back();
  }
  got += s.finish();
  EXPECT_EQ(got, text);
  for (const std::string& p : pieces) EXPECT_EQ(utf8_lossy(p), p) << "a piece is not valid UTF-8";
  // An unfinished character at the end becomes U+FFFD, as in decode().
  const std::vector<std::int32_t> cut(ids.begin(), ids.begin() + 2);  // "h" and 0xC3
  std::string partial = s.push(cut[0]);
  partial += s.push(cut[1]);
  EXPECT_EQ(partial, "h");
  EXPECT_EQ(s.finish(), "\xEF\xBF\xBD");
  EXPECT_EQ(t.decode(cut), "h\xEF\xBF\xBD");
}

TEST(Tokenizer, ConcurrentEncodesAgree) {
  const Tokenizer t = Tokenizer::from_json(small_tokenizer().dump(), "small");
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i)
    texts.push_back("hello world " + std::to_string(i * 7919) + " hellohello w\xC3\xB6rld");
  std::vector<std::vector<std::int32_t>> want;
  for (const auto& s : texts) want.push_back(t.encode(s));
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      for (int rep = 0; rep < 20; ++rep)
        for (std::size_t i = 0; i < texts.size(); ++i)
          if (t.encode(texts[(i + k * 31) % texts.size()]) != want[(i + k * 31) % texts.size()])
            ++mismatches[k];
    });
  }
  for (auto& th : threads) th.join();
  for (int k = 0; k < 4; ++k) EXPECT_EQ(mismatches[k], 0) << "thread " << k;
}

TEST(Tokenizer, TemplateGivesBosAndAddSpecialIsOptional) {
  Json j = small_tokenizer();
  const int n = j["added_tokens"][0]["id"].get<int>();
  j["added_tokens"].push_back(
      {{"id", n + 1}, {"content", "<|begin_of_text|>"}, {"special", true}, {"normalized", false}});
  j["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single",
       {{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
        {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
      {"pair", Json::array()},
      {"special_tokens",
       {{"<|begin_of_text|>",
         {{"id", "<|begin_of_text|>"}, {"ids", {n + 1}}, {"tokens", {"<|begin_of_text|>"}}}}}}};
  const Tokenizer t = Tokenizer::from_json(j.dump(), "t");
  EXPECT_EQ(t.bos_id(), n + 1);
  EXPECT_EQ(t.encode("hello").front(), n + 1);
  EXPECT_EQ(t.encode("hello", false).size(), 1u);
}

TEST(Tokenizer, MergesAsPairsEqualMergesAsStrings) {
  Json j = small_tokenizer();
  const Tokenizer a = Tokenizer::from_json(j.dump(), "a");
  Json pairs = Json::array();
  for (const Json& m : j["model"]["merges"]) {
    const std::string s = m.get<std::string>();
    pairs.push_back({s.substr(0, s.find(' ')), s.substr(s.find(' ') + 1)});
  }
  j["model"]["merges"] = pairs;
  const Tokenizer b = Tokenizer::from_json(j.dump(), "b");
  for (const char* s : {"hello world", "hellohello", " worldworld", "xyz"})
    EXPECT_EQ(a.encode(s), b.encode(s)) << s;
}

TEST(Tokenizer, FromFileNamesTheFile) {
  const std::string dir = ::testing::TempDir() + "mt_tok_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/tokenizer.json";
  std::ofstream(path) << small_tokenizer().dump();
  EXPECT_EQ(Tokenizer::from_file(path).source(), path);
  Json j = small_tokenizer();
  j["model"]["type"] = "Unigram";
  std::ofstream(path) << j.dump();
  EXPECT_HAS(error_of([&] { Tokenizer::from_file(path); }),
             path + ": model.type = \"Unigram\": only BPE is supported");
  EXPECT_HAS(error_of([&] { Tokenizer::from_file(dir + "/missing.json"); }),
             "cannot open tokenizer file '" + dir + "/missing.json'");
  std::filesystem::remove_all(dir);
}

// Every refusal names the file ("tok.json") and the field.
TEST(Tokenizer, RefusesWhatItDoesNotSupportNamingFileAndField) {
  const Json base = small_tokenizer();
  auto with = [&](const std::function<void(Json&)>& edit) {
    Json j = base;
    edit(j);
    return load_error(j);
  };
  EXPECT_HAS(with([](Json& j) { j["model"]["type"] = "WordPiece"; }),
             "tok.json: model.type = \"WordPiece\": only BPE is supported");
  EXPECT_HAS(with([](Json& j) { j["model"].erase("type"); }), "tok.json: model.type is missing");
  EXPECT_HAS(with([](Json& j) { j.erase("model"); }), "tok.json: model is missing");
  EXPECT_HAS(with([](Json& j) { j["model"]["dropout"] = 0.1; }), "tok.json: model.dropout = 0.1");
  EXPECT_HAS(with([](Json& j) { j["model"]["byte_fallback"] = true; }),
             "tok.json: model.byte_fallback = true");
  EXPECT_HAS(with([](Json& j) { j["model"]["continuing_subword_prefix"] = "##"; }),
             "tok.json: model.continuing_subword_prefix = \"##\"");
  EXPECT_HAS(with([](Json& j) { j["model"]["end_of_word_suffix"] = "</w>"; }),
             "tok.json: model.end_of_word_suffix = \"</w>\"");
  EXPECT_HAS(with([](Json& j) { j["model"]["unk_token"] = "<unk>"; }),
             "tok.json: model.unk_token = \"<unk>\": not in model.vocab");
  EXPECT_HAS(with([](Json& j) { j["model"]["vocab"] = Json::array(); }), "tok.json: model.vocab");
  EXPECT_HAS(with([](Json& j) { j["model"]["vocab"]["zz"] = 100000; }),
             "tok.json: model.vocab[\"zz\"] = 100000: ids must be 0..");
  EXPECT_HAS(with([](Json& j) { j["model"]["vocab"]["zz"] = 5; }), "the id is given to two tokens");
  EXPECT_HAS(with([](Json& j) { j["model"]["merges"][3] = "hell q"; }),
             "tok.json: model.merges[3] = \"hell q\": 'hellq' is not in model.vocab");
  EXPECT_HAS(with([](Json& j) { j["model"]["merges"][2] = "a b c"; }),
             "tok.json: model.merges[2] = \"a b c\": expected \"LEFT RIGHT\"");
  EXPECT_HAS(with([](Json& j) { j["model"]["merges"][1] = 7; }), "tok.json: model.merges[1] = 7");
  EXPECT_HAS(with([](Json& j) { j["model"]["merges"] = "x"; }), "tok.json: model.merges = \"x\"");
  EXPECT_HAS(with([](Json& j) {
               j["normalizer"] = {{"type", "NFKC"}};
             }),
             "tok.json: normalizer.type = \"NFKC\": only the NFC normalizer");
  EXPECT_HAS(with([](Json& j) {
               j["normalizer"] = {{"type", "Sequence"},
                                  {"normalizers", {{{"type", "NFC"}}, {{"type", "Lowercase"}}}}};
             }),
             "tok.json: normalizer.normalizers[1].type = \"Lowercase\"");
  EXPECT_HAS(with([](Json& j) {
               j["pre_tokenizer"] = {{"type", "Whitespace"}};
             }),
             "tok.json: pre_tokenizer.type = \"Whitespace\"");
  EXPECT_HAS(with([](Json& j) { j["pre_tokenizer"] = nullptr; }), "tok.json: pre_tokenizer = null");
  const Json split = {{"type", "Split"},
                      {"pattern", {{"Regex", "\\s+"}}},
                      {"behavior", "Isolated"},
                      {"invert", false}};
  EXPECT_HAS(with([&](Json& j) {
               Json s = split;
               s["behavior"] = "Removed";
               j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {s, base["decoder"]}}};
             }),
             "tok.json: pre_tokenizer.pretokenizers[0].behavior = \"Removed\"");
  EXPECT_HAS(with([&](Json& j) {
               Json s = split;
               s["invert"] = true;
               j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {s, base["decoder"]}}};
             }),
             "tok.json: pre_tokenizer.pretokenizers[0].invert = true");
  EXPECT_HAS(with([&](Json& j) {
               Json s = split;
               s["pattern"] = {{"Regex", "(unclosed"}};
               j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {s, base["decoder"]}}};
             }),
             "tok.json: pre_tokenizer.pretokenizers[0].pattern.Regex = \"(unclosed\"");
  EXPECT_HAS(with([&](Json& j) {
               Json s = split;
               s["pattern"] = {{"Glob", "*"}};
               j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {s, base["decoder"]}}};
             }),
             "tok.json: pre_tokenizer.pretokenizers[0].pattern = {\"Glob\":\"*\"}");
  EXPECT_HAS(
      with([&](Json& j) {
        j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {base["decoder"], split}}};
      }),
      "tok.json: pre_tokenizer.pretokenizers[1]: a Split pre-tokenizer after ByteLevel");
  EXPECT_HAS(with([&](Json& j) {
               j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {split}}};
             }),
             "tok.json: pre_tokenizer = {\"pretokenizers\"");
  EXPECT_HAS(with([](Json& j) { j["pre_tokenizer"]["add_prefix_space"] = "yes"; }),
             "tok.json: pre_tokenizer.add_prefix_space = \"yes\": expected true or false");
  EXPECT_HAS(with([](Json& j) {
               j["decoder"] = {{"type", "WordPiece"}};
             }),
             "tok.json: decoder.type = \"WordPiece\"");
  EXPECT_HAS(with([](Json& j) { j["decoder"] = nullptr; }), "tok.json: decoder = null");
  EXPECT_HAS(with([](Json& j) {
               j["post_processor"] = {{"type", "RobertaProcessing"}};
             }),
             "tok.json: post_processor.type = \"RobertaProcessing\"");
  EXPECT_HAS(with([](Json& j) {
               j["post_processor"] = {
                   {"type", "TemplateProcessing"},
                   {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}}},
                   {"special_tokens", Json::object()}};
             }),
             "tok.json: post_processor.single[0].SpecialToken.id = \"<s>\": not a key of "
             "post_processor.special_tokens");
  EXPECT_HAS(with([](Json& j) {
               j["post_processor"] = {{"type", "TemplateProcessing"},
                                      {"single", {{{"Sequence", {{"id", "B"}, {"type_id", 0}}}}}},
                                      {"special_tokens", Json::object()}};
             }),
             "tok.json: post_processor.single[0].Sequence.id = \"B\"");
  EXPECT_HAS(with([](Json& j) { j["added_tokens"][0]["id"] = 7; }),
             "tok.json: added_tokens[0].id = 7: `tokenizers` gives this token id 265");
  EXPECT_HAS(with([](Json& j) { j["added_tokens"][0]["content"] = ""; }),
             "tok.json: added_tokens[0].content = \"\"");
  EXPECT_HAS(
      with([](Json& j) { j["added_tokens"].push_back(j["added_tokens"][0]); }),
      "tok.json: added_tokens[1].content = \"<|endoftext|>\": this added token appears twice");
  EXPECT_HAS(with([](Json& j) { j["added_tokens"][0]["special"] = 1; }),
             "tok.json: added_tokens[0].special = 1");
  EXPECT_HAS(with([](Json& j) {
               j["truncation"] = {{"max_length", 512}};
             }),
             "tok.json: truncation = {\"max_length\":512}: must be null");
  EXPECT_HAS(with([](Json& j) { j["padding"] = {{"length", 512}}; }), "tok.json: padding = ");
  EXPECT_HAS(with([](Json& j) { j = Json::array(); }), "tok.json: (top level) = []");
  EXPECT_HAS(error_of([] { Tokenizer::from_json("{\"model\": ", "tok.json"); }),
             "tok.json is not valid JSON");
}

}  // namespace
}  // namespace meshtrain
