// meshtrain's tokenizer on one thread: encodes a batch of texts (one call per text, as
// `tokenizers`' encode_batch does per item) and prints one JSON line with the throughput.
// bench_tokenizer.py runs it beside the `tokenizers` library on the same texts.
//
//   bench_tokenizer TOKENIZER.json TEXTS.bin [--reps N]
//
// TEXTS.bin: u32 count, then each text as u32 length + UTF-8 bytes (little-endian).
// Output: {"bytes": B, "texts": N, "ids": I, "load_s": L, "first_s": F, "rep_s": [...],
//          "rep_cpu_s": [...], "median_mb_s": M, "median_cpu_mb_s": C}; `first_s` is the first
// pass (empty word cache), then each rep's wall and CPU (this process's) time.
#include <cstdio>
#include <ctime>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "bench/bench_util.hpp"
#include "runtime/tokenizer.hpp"

int main(int argc, char** argv) {
  int reps = 5;
  if (argc == 5 && std::strcmp(argv[3], "--reps") == 0) {
    reps = std::atoi(argv[4]);
  } else if (argc != 3) {
    std::fprintf(stderr, "usage: %s TOKENIZER.json TEXTS.bin [--reps N]\n", argv[0]);
    return 2;
  }
  if (reps < 1) {
    std::fprintf(stderr, "--reps must be at least 1\n");
    return 2;
  }
  std::ifstream in(argv[2], std::ios::binary);
  const std::string raw(std::istreambuf_iterator<char>(in), {});
  std::vector<std::string> texts;
  std::size_t pos = 0, bytes = 0;
  auto u32 = [&] {
    std::uint32_t v = 0;
    if (pos + 4 > raw.size()) {
      std::fprintf(stderr, "%s is truncated\n", argv[2]);
      std::exit(1);
    }
    std::memcpy(&v, raw.data() + pos, 4);
    pos += 4;
    return v;
  };
  for (std::uint32_t n = u32(), i = 0; i < n; ++i) {
    const std::uint32_t len = u32();
    if (pos + len > raw.size()) {
      std::fprintf(stderr, "%s is truncated\n", argv[2]);
      return 1;
    }
    texts.emplace_back(raw.data() + pos, len);
    pos += len;
    bytes += len;
  }

  using meshtrain::bench::now_ms;
  double t0 = now_ms();
  const meshtrain::Tokenizer tok = meshtrain::Tokenizer::from_file(argv[1]);
  const double load_s = (now_ms() - t0) / 1e3;
  std::vector<std::int32_t> ids;
  std::size_t total_ids = 0;
  auto cpu_s = [] {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  };
  double cpu = 0;
  auto pass = [&] {
    total_ids = 0;
    const double start = now_ms(), cpu_start = cpu_s();
    for (const std::string& t : texts) {
      ids.clear();
      tok.encode_append(t, ids, true);
      total_ids += ids.size();
    }
    cpu = cpu_s() - cpu_start;
    return (now_ms() - start) / 1e3;
  };
  const double first_s = pass();
  std::vector<double> rep_s, rep_cpu_s;
  for (int r = 0; r < reps; ++r) {
    rep_s.push_back(pass());
    rep_cpu_s.push_back(cpu);
  }
  const double med = meshtrain::bench::median(rep_s);
  const double med_cpu = meshtrain::bench::median(rep_cpu_s);
  std::printf(
      "{\"bytes\": %zu, \"texts\": %zu, \"ids\": %zu, \"load_s\": %.3f, \"first_s\": %.4f, "
      "\"rep_s\": [",
      bytes, texts.size(), total_ids, load_s, first_s);
  for (std::size_t i = 0; i < rep_s.size(); ++i) std::printf("%s%.4f", i ? ", " : "", rep_s[i]);
  std::printf("], \"rep_cpu_s\": [");
  for (std::size_t i = 0; i < rep_cpu_s.size(); ++i)
    std::printf("%s%.4f", i ? ", " : "", rep_cpu_s[i]);
  std::printf("], \"median_mb_s\": %.2f, \"median_cpu_mb_s\": %.2f}\n",
              static_cast<double>(bytes) / 1e6 / med, static_cast<double>(bytes) / 1e6 / med_cpu);
  return 0;
}
