// Fuzz target: llm.c token shards, GPT-2's (uint16) and Llama 3's (uint32) (runtime/data.hpp):
// TokenFile, its vocabulary check, then a Dataset with a validation split and a few batches
// drawn from it; the same bytes as a text file.
#include <algorithm>

#include "runtime/data.hpp"
#include "tests/fuzz/fuzz.hpp"

namespace meshtrain::fuzz {

void write_seeds(const std::string& dir) {
  std::vector<std::uint16_t> tokens;
  for (int i = 0; i < 300; ++i) tokens.push_back(static_cast<std::uint16_t>((i * 7919) % 50257));
  tokens.push_back(50256);
  data::write_token_shard(dir + "/seed-gpt2.bin", tokens);
  data::write_token_shard(dir + "/seed-one.bin", {42});
  data::write_token_shard(dir + "/seed-max.bin", {65535, 0, 65535, 1, 2, 3, 4, 5, 6, 7, 8, 9});
  std::vector<std::int32_t> llama;
  for (int i = 0; i < 300; ++i) llama.push_back((i * 104729) % 128000);
  llama.push_back(128255);
  data::write_token_shard(dir + "/seed-llama3.bin", llama, 128256);
  data::write_token_shard(dir + "/seed-llama3-one.bin", std::vector<std::int32_t>{151643}, 151665);
}

}  // namespace meshtrain::fuzz

using namespace meshtrain;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string path = fuzz::scratch_dir() + "/input.bin";
  fuzz::write_file(path, data, size);
  fuzz::g_accepted = fuzz::accepts(path, [&] {
    const data::TokenFile f(path, data::Format::kTokens);
    const int width = f.token_width();
    FUZZ_EXPECT((width == 2 || width == 4) && f.size() >= 1 &&
                    data::kShardHeaderBytes + static_cast<std::uint64_t>(width) *
                                                  static_cast<std::uint64_t>(f.size()) ==
                        size,
                "{} tokens of {} bytes in {} bytes", f.size(), width, size);
    std::int32_t most = 0;
    for (std::int64_t i = 0; i < f.size(); ++i) {
      FUZZ_EXPECT(f.token(i) >= 0 && (width == 4 || f.token(i) <= 65535), "token {} = {}", i,
                  f.token(i));
      most = std::max(most, f.token(i));
    }
    // The trainer refuses data whose max_token() is outside the model's vocabulary, so it must
    // be the true maximum.
    FUZZ_EXPECT(most == f.max_token(), "max_token {} but the largest is {}", f.max_token(), most);
    if (most < 0x7fffffff) f.check_vocab(most + 1);  // must accept
  });
  // The vocabulary check refuses the largest token, naming the file.
  fuzz::accepts(path, [&] {
    const data::TokenFile f(path, data::Format::kTokens);
    if (f.max_token() > 0) {
      const bool refused = !fuzz::accepts(path, [&] { f.check_vocab(f.max_token()); });
      FUZZ_EXPECT(refused, "check_vocab({}) accepted a token {}", f.max_token(), f.max_token());
    }
  });
  // A dataset over it: its windows, a validation split, batches of two data-parallel ranks.
  fuzz::accepts(path, [&] {
    for (int seq : {1, 5}) {
      const data::Dataset d({path}, {}, data::Format::kTokens, 0.25, seq, 1234);
      Tensor in = Tensor::empty(Shape{3, seq}, DType::kI32);
      Tensor tg = Tensor::empty(Shape{3, seq}, DType::kI32);
      for (std::int64_t step : {0, 1, 1000003}) {
        for (int rank = 0; rank < 2; ++rank) {
          d.train().batch(step, rank, 2, in, tg);
          for (std::int32_t t : in.to_ints())
            FUZZ_EXPECT(t >= 0 && t <= d.max_token(), "batch token {} > max {}", t, d.max_token());
        }
      }
      if (d.val() != nullptr) d.val()->batch(0, 0, 1, in, tg);
      FUZZ_EXPECT(std::isfinite(d.unigram_entropy()), "entropy");
    }
  });
  // The same bytes as text (one token per byte).
  fuzz::accepts(path, [&] {
    const data::TokenFile f(path, data::Format::kText);
    FUZZ_EXPECT(static_cast<std::size_t>(f.size()) == size && f.max_token() <= 255, "text");
  });
  return 0;
}
