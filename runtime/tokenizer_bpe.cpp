// Encoding, the tokenizer's hot path, in one translation unit: the added tokens split out of the
// text, NFC, the pre-tokenizer's Split stages and ByteLevel, then per word the byte-character
// shortcut, the word cache and BPE merges (Word::merge_all of `tokenizers`), with the per-thread
// PCRE2 match state. The tables it reads (merge map, word cache, trie) are defined inline in
// runtime/tokenizer_impl.hpp.
#include <algorithm>
#include <limits>

#include "runtime/error.hpp"
#include "runtime/tokenizer_impl.hpp"

namespace meshtrain {
namespace tokenizer_detail {

MatchScratch& match_scratch() {
  thread_local MatchScratch s;
  if (s.data == nullptr || s.context == nullptr) throw std::bad_alloc();
  return s;
}

}  // namespace tokenizer_detail

// ---- encoding ------------------------------------------------------------------------------

void TokenizerImpl::encode(std::string_view text, std::vector<std::int32_t>& out,
                           bool add_special) const {
  const std::size_t bad = first_invalid_utf8(text);
  MT_CHECK(bad == std::string_view::npos,
           "tokenizer '{}': the text is not valid UTF-8 (byte offset {} of {})", source, bad,
           text.size());
  if (add_special) out.insert(out.end(), prefix_ids.begin(), prefix_ids.end());
  split_added(text, raw_trie, out, false);
  if (add_special) out.insert(out.end(), suffix_ids.begin(), suffix_ids.end());
}

// AddedVocabulary::find_matches of `tokenizers`: the trie's matches with each token's
// single_word, lstrip and rstrip rules; the text between them goes on to normalization (first
// pass) or pre-tokenization (second pass, on normalized text).
void TokenizerImpl::split_added(std::string_view s, const TokenTrie& trie,
                                std::vector<std::int32_t>& out, bool normalized_pass) const {
  auto rest = [&](std::string_view piece) {
    if (piece.empty()) return;
    if (normalized_pass)
      pre_tokenize(piece, 0, out);
    else
      normalize_then_split(piece, out);
  };
  if (trie.empty()) {
    rest(s);
    return;
  }
  std::size_t start_offset = 0, from = 0, mb = 0, me = 0;
  std::int32_t index = 0;
  while (trie.find(s, from, mb, me, index)) {
    from = me;  // the matcher goes on after its own match, whatever the flags make of it
    const AddedToken& tok = added[static_cast<std::size_t>(index)];
    std::size_t start = mb, stop = me;
    if (tok.single_word) {
      bool start_space = true, stop_space = true;
      if (start > 0) {
        std::size_t b;
        start_space = !is_word_char(prev_cp(s, start, b));
      }
      if (stop < s.size()) {
        std::size_t i = stop;
        stop_space = !is_word_char(next_cp(s, i));
      }
      if (!start_space || !stop_space) continue;
    }
    if (tok.lstrip) {
      std::size_t new_start = start;
      while (new_start > 0) {
        std::size_t b;
        if (!is_white_space(prev_cp(s, new_start, b))) break;
        new_start = b;
      }
      start = std::max(new_start, start_offset);
    }
    if (tok.rstrip) {
      while (stop < s.size()) {
        std::size_t i = stop;
        if (!is_white_space(next_cp(s, i))) break;
        stop = i;
      }
    }
    if (start_offset < start) rest(s.substr(start_offset, start - start_offset));
    out.push_back(tok.id);
    start_offset = stop;
  }
  if (start_offset < s.size()) rest(s.substr(start_offset));
}

void TokenizerImpl::normalize_then_split(std::string_view piece,
                                         std::vector<std::int32_t>& out) const {
  if (nfc && may_change_under_nfc(piece)) {
    const std::string normalized = nfc_normalize(piece);
    split_added(normalized, normalized_trie, out, true);
  } else {
    split_added(piece, normalized_trie, out, true);
  }
}

void TokenizerImpl::pre_tokenize(std::string_view piece, std::size_t stage,
                                 std::vector<std::int32_t>& out) const {
  if (stage < splits.size()) {
    splits[stage]->split_isolated(piece,
                                  [&](std::string_view sub) { pre_tokenize(sub, stage + 1, out); });
    return;
  }
  if (add_prefix_space && piece[0] != ' ') {
    std::string spaced;
    spaced.reserve(piece.size() + 1);
    spaced += ' ';
    spaced += piece;
    byte_level_words(spaced, out);
  } else {
    byte_level_words(piece, out);
  }
}

void TokenizerImpl::byte_level_words(std::string_view piece, std::vector<std::int32_t>& out) const {
  if (byte_level_regex)
    byte_level_regex->split_isolated(piece, [&](std::string_view w) { bpe(w, out); });
  else
    bpe(piece, out);
}

void TokenizerImpl::bpe(std::string_view word, std::vector<std::int32_t>& out) const {
  if (ignore_merges) {
    const auto it = model_vocab_bytes.find(word);
    if (it != model_vocab_bytes.end()) {
      out.push_back(it->second);
      return;
    }
  }
  if (word.size() == 1 && byte_id[static_cast<unsigned char>(word[0])] >= 0) {
    out.push_back(byte_id[static_cast<unsigned char>(word[0])]);
    return;
  }
  const std::uint64_t h = hash_word(word);
  if (cache.get(word, h, out)) return;
  const std::size_t before = out.size();
  merge_word(word, out);
  cache.put(word, h, out.data() + before, out.size() - before);
}

namespace {
struct Symbol {
  std::int32_t id;
  std::int32_t prev, next;  // -1: none
  bool alive;
};
struct MergeCandidate {
  std::int32_t rank, pos, new_id;
  // The heap's top is the largest: make the lowest rank, then the lowest position, largest.
  bool operator<(const MergeCandidate& o) const {
    return rank != o.rank ? rank > o.rank : pos > o.pos;
  }
};
}  // namespace

// Word::merge_all of `tokenizers`: start from one symbol per byte (its byte character's id),
// and repeatedly apply the merge of lowest rank (leftmost among equals), found with a heap
// whose stale entries are skipped.
void TokenizerImpl::merge_word(std::string_view word, std::vector<std::int32_t>& out) const {
  thread_local std::vector<Symbol> symbols;
  thread_local std::vector<MergeCandidate> heap_storage;
  symbols.clear();
  // Unknown bytes: dropped without an unk token, else one unk each (or one per run: fuse_unk).
  bool last_was_unk = false;
  for (const char ch : word) {
    const std::int32_t id = byte_id[static_cast<unsigned char>(ch)];
    if (id >= 0) {
      symbols.push_back(Symbol{id, 0, 0, true});
      last_was_unk = false;
    } else if (unk_id >= 0) {
      if (!(fuse_unk && last_was_unk)) symbols.push_back(Symbol{unk_id, 0, 0, true});
      last_was_unk = true;
    }
  }
  const auto n = static_cast<std::int32_t>(symbols.size());
  if (n == 0) return;
  for (std::int32_t i = 0; i < n; ++i) {
    symbols[i].prev = i - 1;
    symbols[i].next = i + 1 < n ? i + 1 : -1;
  }
  if (n <= 32) {
    // Few symbols (most words): find the lowest-rank pair by a scan, leftmost among equals,
    // which merges in the heap's order without one.
    thread_local std::vector<std::int32_t> pair_rank, pair_id;
    pair_rank.resize(static_cast<std::size_t>(n));
    pair_id.resize(static_cast<std::size_t>(n));
    auto rate = [&](std::int32_t i) {  // the pair (i, next of i)
      const std::int32_t j = symbols[i].next;
      if (j < 0 || !merges.get(symbols[i].id, symbols[j].id, pair_rank[i], pair_id[i]))
        pair_rank[i] = std::numeric_limits<std::int32_t>::max();
    };
    for (std::int32_t i = 0; i < n; ++i) rate(i);
    for (;;) {
      std::int32_t best = std::numeric_limits<std::int32_t>::max(), pos = -1;
      for (std::int32_t i = 0; i >= 0; i = symbols[i].next) {
        if (pair_rank[i] < best) {
          best = pair_rank[i];
          pos = i;
        }
      }
      if (pos < 0) break;
      Symbol& cur = symbols[pos];
      const std::int32_t right = cur.next;
      cur.id = pair_id[pos];
      cur.next = symbols[right].next;
      symbols[right].alive = false;
      if (cur.next >= 0) symbols[cur.next].prev = pos;
      rate(pos);
      if (cur.prev >= 0) rate(cur.prev);
    }
    for (std::int32_t i = 0; i >= 0; i = symbols[i].next) out.push_back(symbols[i].id);
    return;
  }
  std::vector<MergeCandidate>& heap = heap_storage;
  heap.clear();
  auto push = [&](MergeCandidate c) {
    heap.push_back(c);
    std::push_heap(heap.begin(), heap.end());
  };
  std::int32_t rank = 0, new_id = 0;
  for (std::int32_t i = 0; i + 1 < n; ++i)
    if (merges.get(symbols[i].id, symbols[i + 1].id, rank, new_id))
      heap.push_back(MergeCandidate{rank, i, new_id});
  std::make_heap(heap.begin(), heap.end());
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end());
    const MergeCandidate top = heap.back();
    heap.pop_back();
    Symbol& cur = symbols[top.pos];
    if (!cur.alive || cur.next < 0) continue;
    const std::int32_t right_pos = cur.next;
    const Symbol right = symbols[right_pos];
    // A stale entry: the pair at this position is no longer the one this merge was for.
    if (!merges.get(cur.id, right.id, rank, new_id) || new_id != top.new_id) continue;
    cur.id = top.new_id;
    cur.next = right.next;
    symbols[right_pos].alive = false;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (cur.prev >= 0 && merges.get(symbols[cur.prev].id, cur.id, rank, new_id))
      push(MergeCandidate{rank, cur.prev, new_id});
    if (cur.next >= 0 && merges.get(cur.id, symbols[cur.next].id, rank, new_id))
      push(MergeCandidate{rank, top.pos, new_id});
  }
  for (const Symbol& s : symbols)
    if (s.alive) out.push_back(s.id);
}

}  // namespace meshtrain
