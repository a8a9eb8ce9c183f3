// Fuzz target: the training config (launch/config.hpp): a TOML file and --set overrides, then the
// model it describes. Input: the TOML text, then optionally a NUL byte and overrides separated
// by NUL bytes. What loads must print (to_toml) to a file that loads back to the same config.
#include <cstring>

#include "launch/config.hpp"
#include "tests/fuzz/fuzz.hpp"

namespace meshtrain::fuzz {

void write_seeds(const std::string& dir) {
  auto seed = [&](const std::string& name, const std::string& toml,
                  const std::vector<std::string>& sets) {
    std::string bytes = toml;
    for (const std::string& s : sets) bytes += std::string(1, '\0') + s;
    write_file(dir + "/" + name, bytes.data(), bytes.size());
  };
  seed("seed-defaults.toml", launch::to_toml(launch::TrainConfig{}), {});
  seed("seed-job.toml",
       "# a job file\n[model]\npreset = \"gpt2\"\nn_layer = 4\n\n[data]\ntrain = "
       "[\"fineweb_train_*.bin\", 'b.bin']\nval = \"fineweb_val_000000.bin\"\n\n[train]\n"
       "lr = 3e-4\nsteps = 2000\nbatch_size = 4\nseq_len = 1024\nprecision = \"fp16\"\n"
       "schedule = \"wsd\"\nseed = 9007199254740992\n\n[dp]\nbucket_mb = 12.5\n\n"
       "[checkpoint]\nevery = 100\nrollback_after = 2\n",
       {"train.lr=1e-3", "data.train=corpus.txt", "sample.prompt=\"Once\\tupon\"", "train.tp=2"});
  seed("seed-sets.toml", "",
       {"model.preset=gpt-tiny", "train.seq_len=64", "run.dir=2024",
        "data.val=[\"v1.bin\", \"v2.bin\"]", "sample.temperature=0"});
}

}  // namespace meshtrain::fuzz

using namespace meshtrain;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const char* text = reinterpret_cast<const char*>(data);
  const void* nul = std::memchr(data, 0, size);
  const std::size_t toml_len =
      nul ? static_cast<std::size_t>(static_cast<const std::uint8_t*>(nul) - data) : size;
  std::vector<std::string> sets;
  for (std::size_t i = toml_len; i < size;) {
    const std::size_t begin = i + 1;
    std::size_t end = begin;
    while (end < size && data[end] != 0) ++end;
    if (begin <= size) sets.emplace_back(text + std::min(begin, size), text + end);
    i = end;
  }
  const std::string path = fuzz::scratch_dir() + "/config.toml";
  fuzz::write_file(path, data, toml_len);
  launch::TrainConfig cfg;
  // Errors name the file (file:line) or the override ("--set KEY"); combinations of keys name
  // the keys, which the check of `where` cannot know: "" accepts any meshtrain::Error there.
  const bool loaded = fuzz::accepts("", [&] { cfg = launch::load_config(path, sets); });
  fuzz::g_accepted = loaded;
  if (!loaded) return 0;

  // The effective config as the run directory stores it loads back to the same config.
  const std::string printed = launch::to_toml(cfg);
  const std::string again_path = fuzz::scratch_dir() + "/again.toml";
  fuzz::write_file(again_path, printed.data(), printed.size());
  launch::TrainConfig again;
  try {
    again = launch::load_config(again_path, {});
  } catch (const std::exception& e) {
    fuzz::finding(
        fmt::format("to_toml wrote a config that does not load back: {}\n{}", e.what(), printed));
  }
  FUZZ_EXPECT(launch::to_toml(again) == printed,
              "the config changed when loaded back:\n{}\n---\n{}", printed, launch::to_toml(again));
  // The model it describes (preset, overrides, vocabulary, sequence length).
  fuzz::accepts("", [&] { launch::model_config(cfg); });
  return 0;
}
