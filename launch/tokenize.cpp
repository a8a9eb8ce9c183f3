#include "launch/tokenize.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "runtime/data.hpp"
#include "runtime/error.hpp"
#include "runtime/file_io.hpp"

namespace meshtrain::launch {
namespace {

namespace fs = std::filesystem;

// Documents of text as [begin, end) byte ranges: sections ending after each "\n\n" run (the
// blank lines stay with the section before), or the whole text.
std::vector<std::pair<std::size_t, std::size_t>> documents(std::string_view text, bool split) {
  std::vector<std::pair<std::size_t, std::size_t>> out;
  if (text.empty()) return out;
  if (!split) {
    out.emplace_back(0, text.size());
    return out;
  }
  std::size_t begin = 0;
  while (begin < text.size()) {
    std::size_t cut = text.find("\n\n", begin);
    if (cut == std::string_view::npos) {
      out.emplace_back(begin, text.size());
      break;
    }
    cut += 2;
    while (cut < text.size() && text[cut] == '\n') ++cut;  // a run of blank lines
    out.emplace_back(begin, cut);
    begin = cut;
  }
  return out;
}

int thread_count(int threads) {
  if (threads > 0) return threads;
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

}  // namespace

std::int32_t document_separator(const Tokenizer& tok) {
  if (auto b = tok.bos_id()) return *b;
  if (auto e = tok.eos_id()) return *e;
  return -1;
}

std::vector<std::int32_t> tokenize_text(const Tokenizer& tok, std::string_view text,
                                        bool split_blank_lines, int threads,
                                        std::atomic<std::int64_t>* done_bytes) {
  const auto docs = documents(text, split_blank_lines);
  const std::int32_t sep = document_separator(tok);
  const int n = std::min<int>(thread_count(threads), std::max<int>(1, docs.size()));
  // Contiguous runs of documents per thread, joined in order: the result does not depend on
  // the thread count.
  std::vector<std::vector<std::int32_t>> parts(static_cast<std::size_t>(n));
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n));
  auto work = [&](int k) {
    try {
      const std::size_t lo = docs.size() * k / n, hi = docs.size() * (k + 1) / n;
      for (std::size_t d = lo; d < hi; ++d) {
        if (sep >= 0) parts[k].push_back(sep);
        const auto [b, e] = docs[d];
        const std::vector<std::int32_t> ids = tok.encode(text.substr(b, e - b), false);
        parts[k].insert(parts[k].end(), ids.begin(), ids.end());
        if (done_bytes != nullptr) done_bytes->fetch_add(static_cast<std::int64_t>(e - b));
      }
    } catch (...) {
      errors[k] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  for (int k = 1; k < n; ++k) pool.emplace_back(work, k);
  work(0);
  for (std::thread& t : pool) t.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  std::vector<std::int32_t> out;
  std::size_t total = 0;
  for (const auto& p : parts) total += p.size();
  out.reserve(total);
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

TokenizeResult tokenize_files(const TokenizeOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  MT_CHECK(!opt.tokenizer.empty(), "tokenize: --tokenizer tokenizer.json is required");
  MT_CHECK(!opt.out.empty(), "tokenize: --out DIR is required");
  MT_CHECK(!opt.files.empty(), "tokenize: no input files (meshtrain tokenize --help)");
  MT_CHECK(opt.val_fraction >= 0 && opt.val_fraction <= 0.5,
           "tokenize: --val-fraction {} must be in [0, 0.5]", opt.val_fraction);
  MT_CHECK(opt.shard_tokens >= 1, "tokenize: --shard-tokens must be at least 1");
  const Tokenizer tok = Tokenizer::from_file(opt.tokenizer);
  const std::vector<std::string> paths = data::expand_paths(opt.files);
  std::vector<std::string> texts;
  TokenizeResult r;
  r.vocab_size = tok.vocab_size();
  for (const std::string& p : paths) {
    std::error_code ec;
    MT_CHECK(fs::is_regular_file(p, ec), "tokenize: '{}' is not a readable file", p);
    texts.push_back(read_file(p, 1ull << 40));
    r.bytes += static_cast<std::int64_t>(texts.back().size());
  }
  MT_CHECK(r.bytes > 0, "tokenize: the input files are empty");
  std::atomic<std::int64_t> done{0};
  std::vector<std::int32_t> ids;
  {
    std::atomic<bool> finished{false};
    std::thread bar;
    if (opt.progress) {
      bar = std::thread([&] {
        while (!finished.load()) {
          const double s =
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          const double mb = static_cast<double>(done.load()) / 1e6;
          std::fprintf(stderr, "\rtokenize: %.1f / %.1f MB (%3.0f%%), %.1f MB/s", mb,
                       static_cast<double>(r.bytes) / 1e6, 100.0 * mb * 1e6 / r.bytes,
                       s > 0 ? mb / s : 0.0);
          std::fflush(stderr);
          for (int i = 0; i < 5 && !finished.load(); ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(40));
        }
      });
    }
    try {
      for (const std::string& text : texts) {
        std::vector<std::int32_t> part =
            tokenize_text(tok, text, opt.split_blank_lines, opt.threads, &done);
        ids.insert(ids.end(), part.begin(), part.end());
      }
    } catch (...) {
      finished = true;
      if (bar.joinable()) bar.join();
      throw;
    }
    finished = true;
    if (bar.joinable()) bar.join();
    if (opt.progress) std::fprintf(stderr, "\n");
  }
  // Validation: the last documents, about val_fraction of the tokens (cut where a separator
  // starts a document, when there are separators).
  const std::int64_t total = static_cast<std::int64_t>(ids.size());
  std::int64_t cut =
      total - static_cast<std::int64_t>(opt.val_fraction * static_cast<double>(total));
  const std::int32_t sep = document_separator(tok);
  if (cut < total && sep >= 0) {
    std::int64_t c = cut;
    while (c > 0 && ids[c] != sep) --c;
    if (c > 0) cut = c;
  }
  MT_CHECK(cut >= 2, "tokenize: {} tokens leave too few for training after --val-fraction {}",
           total, opt.val_fraction);
  r.train_tokens = cut;
  r.val_tokens = total - cut;
  std::error_code ec;
  fs::create_directories(opt.out, ec);
  MT_CHECK(!ec, "tokenize: cannot create '{}': {}", opt.out, ec.message());
  const std::span<const std::int32_t> all(ids);
  for (std::int64_t s = 0, k = 0; s < cut; s += opt.shard_tokens, ++k) {
    const std::int64_t n = std::min(opt.shard_tokens, cut - s);
    const std::string path = (fs::path(opt.out) / fmt::format("train_{:06d}.bin", k)).string();
    data::write_token_shard(
        path, all.subspan(static_cast<std::size_t>(s), static_cast<std::size_t>(n)), r.vocab_size);
    r.shards.push_back(path);
  }
  if (r.val_tokens > 0) {
    const std::string path = (fs::path(opt.out) / "val_000000.bin").string();
    data::write_token_shard(path, all.subspan(static_cast<std::size_t>(cut)), r.vocab_size);
    r.shards.push_back(path);
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

std::int64_t tokenize_file_to_shard(const Tokenizer& tok, const std::string& text_path,
                                    const std::string& shard_path, int threads) {
  const std::string text = read_file(text_path, 1ull << 40);
  MT_CHECK(!text.empty(), "data file '{}' is empty", text_path);
  const std::vector<std::int32_t> ids = tokenize_text(tok, text, true, threads);
  MT_CHECK(ids.size() >= 2, "data file '{}' holds fewer than 2 tokens", text_path);
  data::write_token_shard(shard_path, ids, tok.vocab_size());
  return static_cast<std::int64_t>(ids.size());
}

std::vector<std::string> text_files_to_shards(const std::vector<std::string>& files,
                                              const std::string& format, const Tokenizer* tok,
                                              int vocab_size, const std::string& dir, int threads,
                                              TextStats* stats) {
  std::vector<std::string> out;
  int k = 0;
  for (const std::string& f : data::expand_paths(files)) {
    const bool text = format == "text" ||
                      (format == "auto" && !(f.size() >= 4 && f.substr(f.size() - 4) == ".bin"));
    if (!text) {
      out.push_back(f);
      continue;
    }
    if (tok == nullptr) {
      MT_CHECK(vocab_size == 256,
               "data file '{}' is text, but the model's vocabulary has {} tokens and the run has "
               "no tokenizer: its bytes would be trained on as token ids. Set data.tokenizer = "
               "PATH/tokenizer.json to tokenize it, tokenize it first (meshtrain tokenize), or "
               "train on bytes (model.vocab = \"bytes\")",
               f, vocab_size);
      out.push_back(f);
      if (stats != nullptr) {
        std::error_code ec;
        const auto n = static_cast<std::int64_t>(fs::file_size(f, ec));
        stats->files += 1;
        stats->bytes += ec ? 0 : n;
        stats->tokens += ec ? 0 : n;
      }
      continue;
    }
    MT_CHECK(tok->vocab_size() <= vocab_size,
             "data.tokenizer '{}' has {} tokens, more than the model's vocabulary of {}",
             tok->source(), tok->vocab_size(), vocab_size);
    std::error_code ec;
    fs::create_directories(dir, ec);
    MT_CHECK(!ec, "cannot create '{}': {}", dir, ec.message());
    const std::string shard =
        (fs::path(dir) / fmt::format("{:03d}-{}.bin", k++, fs::path(f).stem().string())).string();
    const std::int64_t n = tokenize_file_to_shard(*tok, f, shard, threads);
    out.push_back(shard);
    if (stats != nullptr) {
      std::error_code ec;
      stats->files += 1;
      stats->bytes += static_cast<std::int64_t>(fs::file_size(f, ec));
      stats->tokens += n;
    }
  }
  return out;
}

}  // namespace meshtrain::launch
