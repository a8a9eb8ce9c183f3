// The public Tokenizer (runtime/tokenizer.hpp): encode and the token tables' accessors, and
// decoding (decode, utf8_lossy, the StreamDecoder). Reading a tokenizer.json is in
// tokenizer_json.cpp, encoding's work in tokenizer_bpe.cpp.
#include "runtime/tokenizer.hpp"

#include "runtime/error.hpp"
#include "runtime/tokenizer_impl.hpp"

namespace meshtrain {

// ---- Tokenizer -----------------------------------------------------------------------------

Tokenizer::Tokenizer(std::shared_ptr<const TokenizerImpl> impl) : impl_(std::move(impl)) {}

std::vector<std::int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::vector<std::int32_t> out;
  out.reserve(text.size() / 3 + 4);
  impl_->encode(text, out, add_special_tokens);
  return out;
}

void Tokenizer::encode_append(std::string_view text, std::vector<std::int32_t>& out,
                              bool add_special_tokens) const {
  impl_->encode(text, out, add_special_tokens);
}

std::string Tokenizer::decode_bytes(std::span<const std::int32_t> ids,
                                    bool skip_special_tokens) const {
  const TokenizerImpl& t = *impl_;
  std::string out;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const std::int32_t id = ids[i];
    MT_CHECK(id >= 0 && static_cast<std::size_t>(id) < t.tokens.size(),
             "tokenizer '{}': cannot decode id {} (position {}): ids are 0..{}", t.source, id, i,
             t.tokens.size() - 1);
    if (skip_special_tokens && t.special[static_cast<std::size_t>(id)]) continue;
    out += t.token_bytes[static_cast<std::size_t>(id)];
  }
  return out;
}

std::string Tokenizer::decode(std::span<const std::int32_t> ids, bool skip_special_tokens) const {
  return utf8_lossy(decode_bytes(ids, skip_special_tokens));
}

std::optional<std::int32_t> Tokenizer::token_to_id(std::string_view token) const {
  if (const auto it = impl_->added_ids.find(token); it != impl_->added_ids.end()) return it->second;
  if (const auto it = impl_->model_vocab.find(token); it != impl_->model_vocab.end())
    return it->second;
  return std::nullopt;
}

const std::string& Tokenizer::id_to_token(std::int32_t id) const {
  MT_CHECK(id >= 0 && static_cast<std::size_t>(id) < impl_->tokens.size(),
           "tokenizer '{}': no token has id {} (ids are 0..{})", impl_->source, id,
           impl_->tokens.size() - 1);
  return impl_->tokens[static_cast<std::size_t>(id)];
}

std::int32_t Tokenizer::vocab_size() const {
  return static_cast<std::int32_t>(impl_->tokens.size());
}

bool Tokenizer::is_special(std::int32_t id) const {
  return id >= 0 && static_cast<std::size_t>(id) < impl_->special.size() &&
         impl_->special[static_cast<std::size_t>(id)];
}

const std::vector<AddedToken>& Tokenizer::added_tokens() const {
  return impl_->added;
}
std::optional<std::int32_t> Tokenizer::bos_id() const {
  return impl_->bos;
}
std::optional<std::int32_t> Tokenizer::eos_id() const {
  return impl_->eos;
}
const std::string& Tokenizer::source() const {
  return impl_->source;
}

// ---- decoding ------------------------------------------------------------------------------

std::string utf8_lossy(std::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  const std::size_t n = bytes.size();
  std::string out;
  out.reserve(n);
  std::size_t i = 0;
  while (i < n) {
    const Utf8Step st = utf8_step(p + i, n - i);
    if (st.valid)
      out.append(bytes.data() + i, st.len);
    else
      out += kReplacement;
    i += st.len;
  }
  return out;
}

Tokenizer::StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : impl_(tokenizer.impl_), skip_special_(skip_special_tokens) {}

std::string Tokenizer::StreamDecoder::push(std::int32_t id) {
  const TokenizerImpl& t = *impl_;
  MT_CHECK(id >= 0 && static_cast<std::size_t>(id) < t.tokens.size(),
           "tokenizer '{}': cannot decode id {}: ids are 0..{}", t.source, id, t.tokens.size() - 1);
  if (!(skip_special_ && t.special[static_cast<std::size_t>(id)]))
    pending_ += t.token_bytes[static_cast<std::size_t>(id)];
  const auto* p = reinterpret_cast<const unsigned char*>(pending_.data());
  const std::size_t n = pending_.size();
  std::string out;
  std::size_t i = 0;
  while (i < n) {
    const Utf8Step st = utf8_step(p + i, n - i);
    if (st.incomplete) break;  // wait for the bytes that decide it
    if (st.valid)
      out.append(pending_, i, st.len);
    else
      out += kReplacement;
    i += st.len;
  }
  pending_.erase(0, i);
  return out;
}

std::string Tokenizer::StreamDecoder::finish() {
  std::string out = utf8_lossy(pending_);
  pending_.clear();
  return out;
}

}  // namespace meshtrain
