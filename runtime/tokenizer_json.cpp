// Reading tokenizer.json: the checked field access that names FILE: PATH.KEY in every complaint,
// the PCRE2 pattern fix-up, each component's reader (normalizer, pre-tokenizer, model,
// added tokens, post-processor, decoder) and Tokenizer::from_file / from_json, which build the
// TokenizerImpl (runtime/tokenizer_impl.hpp) that encoding and decoding use.

#include <nlohmann/json.hpp>

#include "runtime/error.hpp"
#include "runtime/file_io.hpp"
#include "runtime/json.hpp"
#include "runtime/tokenizer_impl.hpp"

namespace meshtrain {
namespace tokenizer_detail {

// ---- JSON fields ---------------------------------------------------------------------------

std::string short_dump(const Json& j) {
  std::string s = j.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

}  // namespace tokenizer_detail

namespace {

// Reads fields of one JSON object, naming "FILE: PATH.KEY" in every complaint.
class Fields {
 public:
  Fields(const std::string& file, const Json& obj, std::string path)
      : file_(file), obj_(obj), path_(std::move(path)) {
    if (!obj.is_object())
      MT_FAIL("{}: {} = {}: expected an object", file_, path_.empty() ? "(top level)" : path_,
              short_dump(obj));
  }
  std::string name(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }
  // nullptr when absent.
  const Json* find(const std::string& key) const {
    const auto it = obj_.find(key);
    return it == obj_.end() ? nullptr : &*it;
  }
  const Json& at(const std::string& key, const char* why = "") const {
    const Json* j = find(key);
    if (j == nullptr) MT_FAIL("{}: {} is missing{}", file_, name(key), why);
    return *j;
  }
  // Absent or null: nullopt.
  std::optional<std::string> opt_string(const std::string& key) const {
    const Json* j = find(key);
    if (j == nullptr || j->is_null()) return std::nullopt;
    if (!j->is_string()) fail(key, *j, "expected a string or null");
    return j->get<std::string>();
  }
  std::string string(const std::string& key) const {
    const Json& j = at(key);
    if (!j.is_string()) fail(key, j, "expected a string");
    return j.get<std::string>();
  }
  bool boolean(const std::string& key, bool fallback) const {
    const Json* j = find(key);
    if (j == nullptr || j->is_null()) return fallback;
    if (!j->is_boolean()) fail(key, *j, "expected true or false");
    return j->get<bool>();
  }
  std::int64_t integer(const std::string& key) const {
    const Json& j = at(key);
    if (!j.is_number_integer()) fail(key, j, "expected an integer");
    return j.get<std::int64_t>();
  }
  [[noreturn]] void fail(const std::string& key, const Json& value, const std::string& why) const {
    MT_FAIL("{}: {} = {}: {}", file_, name(key), short_dump(value), why);
  }
  const std::string& file() const { return file_; }
  const Json& json() const { return obj_; }

 private:
  const std::string& file_;
  const Json& obj_;
  std::string path_;
};

// "type" of a component object, which must be one of `known`.
std::string component_type(const Fields& f) {
  return f.string("type");
}

}  // namespace

namespace tokenizer_detail {

// ---- PCRE2 ---------------------------------------------------------------------------------

// Oniguruma's `\s` (what `tokenizers` matches with) is Unicode White_Space; PCRE2's, with UCP,
// is the separators and \t\n\v\f\r: the two differ by U+0085 (NEL), which this adds.
std::string widen_whitespace_classes(const std::string& pattern) {
  std::string out;
  out.reserve(pattern.size() + 16);
  bool in_class = false;
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[i + 1];
      if (e == 's') {
        out += in_class ? "\\s\\x{85}" : "[\\s\\x{85}]";
      } else if (e == 'S' && !in_class) {
        out += "[^\\s\\x{85}]";
      } else if (e == 'Q') {
        // \Q...\E quotes everything up to \E.
        const std::size_t end = pattern.find("\\E", i + 2);
        const std::size_t stop = end == std::string::npos ? pattern.size() : end + 2;
        out.append(pattern, i, stop - i);
        i = stop - 1;
        continue;
      } else {
        out += c;
        out += e;
      }
      ++i;
      continue;
    }
    if (in_class) {
      if (c == ']') in_class = false;
      out += c;
      continue;
    }
    if (c == '[') {
      in_class = true;
      out += c;
      // A ']' (after an optional '^') right at the start of a class is a literal.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
      continue;
    }
    out += c;
  }
  return out;
}

}  // namespace tokenizer_detail

namespace {

// ---- reading tokenizer.json ----------------------------------------------------------------

void read_normalizer(TokenizerImpl& t, const Json& j, const std::string& file,
                     const std::string& path) {
  if (j.is_null()) return;
  const Fields f(file, j, path);
  const std::string type = component_type(f);
  if (type == "NFC") {
    t.nfc = true;
  } else if (type == "Sequence") {
    const Json& list = f.at("normalizers");
    if (!list.is_array()) f.fail("normalizers", list, "expected an array");
    for (std::size_t i = 0; i < list.size(); ++i)
      read_normalizer(t, list[i], file, f.name("normalizers") + "[" + std::to_string(i) + "]");
  } else {
    f.fail("type", f.at("type"), "only the NFC normalizer (or none) is supported");
  }
}

// Appends the pre-tokenizer's stages; `byte_level_seen` marks the ByteLevel stage (last).
void read_pre_tokenizer(TokenizerImpl& t, const Json& j, const std::string& file,
                        const std::string& path, bool& byte_level_seen) {
  const Fields f(file, j, path);
  const std::string type = component_type(f);
  if (type == "Sequence") {
    const Json& list = f.at("pretokenizers");
    if (!list.is_array()) f.fail("pretokenizers", list, "expected an array");
    for (std::size_t i = 0; i < list.size(); ++i)
      read_pre_tokenizer(t, list[i], file, f.name("pretokenizers") + "[" + std::to_string(i) + "]",
                         byte_level_seen);
    return;
  }
  if (byte_level_seen)
    MT_FAIL(
        "{}: {}: a {} pre-tokenizer after ByteLevel is not supported (ByteLevel must come "
        "last)",
        file, path, type);
  if (type == "ByteLevel") {
    byte_level_seen = true;
    t.add_prefix_space = f.boolean("add_prefix_space", true);
    f.boolean("trim_offsets", true);  // offsets only: no effect on ids
    if (f.boolean("use_regex", true)) {
      // GPT-2's pattern, as `tokenizers` compiles it for ByteLevel(use_regex=true).
      t.byte_level_regex = std::make_unique<Regex>(
          R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)", false,
          file, f.name("use_regex"));
    }
  } else if (type == "Split") {
    const Json& pattern = f.at("pattern");
    const Fields pf(file, pattern, f.name("pattern"));
    std::unique_ptr<Regex> re;
    if (const auto rx = pf.opt_string("Regex")) {
      re = std::make_unique<Regex>(*rx, false, file, pf.name("Regex"));
    } else if (const auto lit = pf.opt_string("String")) {
      re = std::make_unique<Regex>(*lit, true, file, pf.name("String"));
    } else {
      f.fail("pattern", pattern, "expected {\"Regex\": ...} or {\"String\": ...}");
    }
    const std::string behavior = f.string("behavior");
    if (behavior != "Isolated")
      f.fail("behavior", f.at("behavior"), "only \"Isolated\" is supported");
    if (f.boolean("invert", false)) f.fail("invert", f.at("invert"), "only false is supported");
    t.splits.push_back(std::move(re));
  } else {
    f.fail("type", f.at("type"),
           "only the ByteLevel and Split pre-tokenizers (or a Sequence of them) are supported");
  }
}

void read_decoder(const Json& j, const std::string& file, const std::string& path) {
  if (j.is_null()) MT_FAIL("{}: {} = null: byte-level BPE needs the ByteLevel decoder", file, path);
  const Fields f(file, j, path);
  const std::string type = component_type(f);
  if (type == "ByteLevel") return;
  if (type == "Sequence") {
    const Json& list = f.at("decoders");
    if (!list.is_array() || list.empty()) f.fail("decoders", list, "expected a non-empty array");
    for (std::size_t i = 0; i < list.size(); ++i)
      read_decoder(list[i], file, f.name("decoders") + "[" + std::to_string(i) + "]");
    return;
  }
  f.fail("type", f.at("type"), "only the ByteLevel decoder is supported");
}

void read_post_processor(TokenizerImpl& t, const Json& j, const std::string& file,
                         const std::string& path, bool& template_seen) {
  if (j.is_null()) return;
  const Fields f(file, j, path);
  const std::string type = component_type(f);
  if (type == "ByteLevel") return;  // trims offsets only
  if (type == "Sequence") {
    const Json& list = f.at("processors");
    if (!list.is_array()) f.fail("processors", list, "expected an array");
    for (std::size_t i = 0; i < list.size(); ++i)
      read_post_processor(t, list[i], file, f.name("processors") + "[" + std::to_string(i) + "]",
                          template_seen);
    return;
  }
  if (type != "TemplateProcessing")
    f.fail("type", f.at("type"),
           "only the ByteLevel and TemplateProcessing post-processors are supported");
  if (template_seen) MT_FAIL("{}: {}: a second TemplateProcessing is not supported", file, path);
  template_seen = true;
  const Json& specials = f.at("special_tokens");
  const Fields sf(file, specials, f.name("special_tokens"));
  const Json& single = f.at("single");
  if (!single.is_array()) f.fail("single", single, "expected an array");
  bool seen_a = false;
  for (std::size_t i = 0; i < single.size(); ++i) {
    const std::string at = f.name("single") + "[" + std::to_string(i) + "]";
    const Fields item(file, single[i], at);
    if (const Json* st = item.find("SpecialToken")) {
      const Fields sp(file, *st, item.name("SpecialToken"));
      const std::string name = sp.string("id");
      const Json* entry = sf.find(name);
      if (entry == nullptr) sp.fail("id", sp.at("id"), "not a key of " + f.name("special_tokens"));
      const Fields ef(file, *entry, sf.name(name));
      const Json& ids = ef.at("ids");
      if (!ids.is_array() || ids.empty()) ef.fail("ids", ids, "expected a non-empty array of ids");
      for (const Json& id : ids) {
        if (!id.is_number_integer() || id.get<std::int64_t>() < 0 ||
            id.get<std::int64_t>() >= static_cast<std::int64_t>(t.tokens.size()))
          ef.fail("ids", ids, fmt::format("every id must be a token id below {}", t.tokens.size()));
        (seen_a ? t.suffix_ids : t.prefix_ids).push_back(id.get<std::int32_t>());
      }
    } else if (const Json* seq = item.find("Sequence")) {
      const Fields sq(file, *seq, item.name("Sequence"));
      const std::string id = sq.string("id");
      if (id != "A")
        sq.fail("id", sq.at("id"), "the single-sequence template can only hold sequence A");
      if (seen_a) sq.fail("id", sq.at("id"), "sequence A appears twice");
      seen_a = true;
    } else {
      MT_FAIL("{}: {} = {}: expected {{\"SpecialToken\": ...}} or {{\"Sequence\": ...}}", file, at,
              short_dump(single[i]));
    }
  }
  if (!seen_a) f.fail("single", single, "the template never places the text (Sequence A)");
}

void read_model(TokenizerImpl& t, const Fields& top) {
  const std::string& file = top.file();
  const Fields m(file, top.at("model"), "model");
  const std::string type = m.string("type");
  if (type != "BPE") m.fail("type", m.at("type"), "only BPE is supported");
  if (const Json* d = m.find("dropout"); d != nullptr && !d->is_null()) {
    if (!d->is_number() || d->get<double>() != 0.0)
      m.fail("dropout", *d, "only null or 0 is supported (dropout makes encoding random)");
  }
  if (m.boolean("byte_fallback", false))
    m.fail("byte_fallback", m.at("byte_fallback"),
           "only false is supported (byte-level BPE needs no fallback)");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const auto v = m.opt_string(key);
    if (v && !v->empty())
      m.fail(key, m.at(key), "only null or \"\" is supported for byte-level BPE");
  }
  t.ignore_merges = m.boolean("ignore_merges", false);
  t.fuse_unk = m.boolean("fuse_unk", false);

  const Json& vocab = m.at("vocab");
  if (!vocab.is_object() || vocab.empty())
    m.fail("vocab", vocab, "expected a non-empty object of token: id");
  const std::size_t n = vocab.size();
  if (n > (std::size_t{1} << 24))
    m.fail("vocab", vocab, fmt::format("{} tokens: at most 2^24 are supported", n));
  t.model_size = static_cast<std::int32_t>(n);
  t.tokens.assign(n, std::string());
  std::vector<bool> seen(n, false);
  t.model_vocab.reserve(n);
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const Json& id = it.value();
    if (!id.is_number_integer() || id.get<std::int64_t>() < 0 ||
        id.get<std::int64_t>() >= static_cast<std::int64_t>(n))
      MT_FAIL("{}: model.vocab[{}] = {}: ids must be 0..{} (each token once)", file,
              short_dump(Json(it.key())), short_dump(id), n - 1);
    const auto i = static_cast<std::size_t>(id.get<std::int64_t>());
    if (seen[i])
      MT_FAIL("{}: model.vocab[{}] = {}: the id is given to two tokens ('{}' too)", file,
              short_dump(Json(it.key())), i, t.tokens[i]);
    seen[i] = true;
    t.tokens[i] = it.key();
    t.model_vocab.emplace(it.key(), static_cast<std::int32_t>(i));
  }
  const ByteLevelMap& bl = byte_level();
  for (int b = 0; b < 256; ++b) {
    std::string ch;
    append_utf8(ch, bl.byte_to_cp[b]);
    const auto it = t.model_vocab.find(ch);
    t.byte_id[b] = it == t.model_vocab.end() ? -1 : it->second;
  }
  if (t.ignore_merges) {
    t.model_vocab_bytes.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      bool mapped = false;
      std::string bytes = byte_level_decode(t.tokens[i], &mapped);
      if (mapped) t.model_vocab_bytes.emplace(std::move(bytes), static_cast<std::int32_t>(i));
    }
  }
  if (const auto unk = m.opt_string("unk_token")) {
    const auto it = t.model_vocab.find(*unk);
    if (it == t.model_vocab.end()) m.fail("unk_token", m.at("unk_token"), "not in model.vocab");
    t.unk_id = it->second;
  }

  const Json& merges = m.at("merges");
  if (!merges.is_array()) m.fail("merges", merges, "expected an array");
  t.merges.reserve(merges.size());
  std::string joined;
  for (std::size_t r = 0; r < merges.size(); ++r) {
    const Json& e = merges[r];
    std::string a, b;
    if (e.is_string()) {
      const std::string& s = e.get_ref<const std::string&>();
      const std::size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        MT_FAIL("{}: model.merges[{}] = {}: expected \"LEFT RIGHT\" (one space)", file, r,
                short_dump(e));
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      MT_FAIL("{}: model.merges[{}] = {}: expected \"LEFT RIGHT\" or [\"LEFT\", \"RIGHT\"]", file,
              r, short_dump(e));
    }
    joined = a + b;
    const auto ia = t.model_vocab.find(a), ib = t.model_vocab.find(b),
               ij = t.model_vocab.find(joined);
    if (ia == t.model_vocab.end() || ib == t.model_vocab.end() || ij == t.model_vocab.end()) {
      const std::string& missing = ia == t.model_vocab.end()   ? a
                                   : ib == t.model_vocab.end() ? b
                                                               : joined;
      MT_FAIL("{}: model.merges[{}] = {}: '{}' is not in model.vocab", file, r, short_dump(e),
              missing);
    }
    if (r > 0x7fffffff) MT_FAIL("{}: model.merges: more than 2^31 merges", file);
    t.merges.put(ia->second, ib->second, static_cast<std::int32_t>(r), ij->second);
  }
}

void read_added_tokens(TokenizerImpl& t, const Fields& top) {
  const std::string& file = top.file();
  const Json* list = top.find("added_tokens");
  if (list == nullptr || list->is_null()) return;
  if (!list->is_array()) top.fail("added_tokens", *list, "expected an array");
  // `tokenizers` ignores the ids written here and gives each token the id it has in the model
  // vocabulary, or else the next id after the vocabulary, in file order; a file whose ids differ
  // would encode differently there, so it is refused.
  std::int32_t next_id = t.model_size;
  for (std::size_t i = 0; i < list->size(); ++i) {
    const std::string at = "added_tokens[" + std::to_string(i) + "]";
    const Fields f(file, (*list)[i], at);
    AddedToken a;
    a.content = f.string("content");
    if (a.content.empty()) f.fail("content", f.at("content"), "an added token cannot be empty");
    a.special = f.boolean("special", false);
    a.lstrip = f.boolean("lstrip", false);
    a.rstrip = f.boolean("rstrip", false);
    a.single_word = f.boolean("single_word", false);
    a.normalized = f.boolean("normalized", !a.special);
    const std::int64_t written = f.integer("id");
    if (t.added_ids.count(a.content) != 0)
      f.fail("content", f.at("content"), "this added token appears twice");
    const auto in_model = t.model_vocab.find(a.content);
    const std::int32_t id = in_model != t.model_vocab.end() ? in_model->second : next_id++;
    if (written != id)
      f.fail("id", f.at("id"),
             fmt::format("`tokenizers` gives this token id {} ({}); the file disagrees", id,
                         in_model != t.model_vocab.end()
                             ? "its id in model.vocab"
                             : "the next id after model.vocab and the added tokens before it"));
    a.id = id;
    t.added_ids.emplace(a.content, id);
    t.added_index.emplace(id, t.added.size());
    t.added.push_back(std::move(a));
  }
  t.tokens.resize(static_cast<std::size_t>(next_id));
  for (const AddedToken& a : t.added) t.tokens[static_cast<std::size_t>(a.id)] = a.content;
}

// Llama 3's tokenizer.json is 9 MB; a directory, FIFO or device is refused naming the path.
std::string read_text_file(const std::string& path) {
  return read_file(path, std::uint64_t{1} << 30, "tokenizer file");
}

}  // namespace

Tokenizer Tokenizer::from_file(const std::string& path) {
  return from_json(read_text_file(path), path);
}

Tokenizer Tokenizer::from_json(std::string_view text, const std::string& where) {
  const Json root = parse_json_file_text<Json>(text, where, 64);
  const Fields top(where, root, "");
  auto t = std::make_shared<TokenizerImpl>();
  t->source = where;
  for (const char* key : {"truncation", "padding"}) {
    const Json* j = top.find(key);
    if (j != nullptr && !j->is_null())
      top.fail(key, *j, "must be null: meshtrain's tokenizer neither truncates nor pads");
  }
  read_model(*t, top);
  read_added_tokens(*t, top);
  // Absent components are null, as for `tokenizers`.
  static const Json kNull;
  auto component = [&](const char* key) -> const Json& {
    const Json* j = top.find(key);
    return j == nullptr ? kNull : *j;
  };
  read_normalizer(*t, component("normalizer"), where, "normalizer");
  bool byte_level_seen = false;
  const Json& pre = component("pre_tokenizer");
  if (pre.is_null())
    MT_FAIL("{}: pre_tokenizer = null: byte-level BPE needs a ByteLevel pre-tokenizer", where);
  read_pre_tokenizer(*t, pre, where, "pre_tokenizer", byte_level_seen);
  if (!byte_level_seen)
    MT_FAIL("{}: pre_tokenizer = {}: byte-level BPE needs a ByteLevel pre-tokenizer (last)", where,
            short_dump(pre));
  read_decoder(component("decoder"), where, "decoder");
  bool template_seen = false;
  read_post_processor(*t, component("post_processor"), where, "post_processor", template_seen);

  // Tries of the added tokens: those matched in the text as written, and the normalized ones,
  // matched (in their normalized form) in the normalized text.
  for (std::size_t i = 0; i < t->added.size(); ++i) {
    const AddedToken& a = t->added[i];
    if (!a.normalized) {
      t->raw_trie.add(a.content, static_cast<std::int32_t>(i));
    } else {
      const std::string c = t->nfc ? nfc_normalize(a.content) : a.content;
      if (!c.empty()) t->normalized_trie.add(c, static_cast<std::int32_t>(i));
    }
  }

  const std::size_t total = t->tokens.size();
  t->token_bytes.resize(total);
  t->special.assign(total, false);
  for (std::size_t i = 0; i < total; ++i) t->token_bytes[i] = byte_level_decode(t->tokens[i]);
  for (const AddedToken& a : t->added)
    if (a.special) t->special[static_cast<std::size_t>(a.id)] = true;

  if (!t->prefix_ids.empty()) t->bos = t->prefix_ids.front();
  if (!t->suffix_ids.empty()) {
    t->eos = t->suffix_ids.back();
  } else {
    for (const char* name : {"<|end_of_text|>", "<|endoftext|>", "</s>"}) {
      const auto it = t->added_ids.find(std::string_view(name));
      if (it != t->added_ids.end() && t->special[static_cast<std::size_t>(it->second)]) {
        t->eos = it->second;
        break;
      }
    }
  }
  return Tokenizer(std::move(t));
}

}  // namespace meshtrain
