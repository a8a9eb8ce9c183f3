// The TOML config: defaults, every type error, unknown keys and sections with file:line,
// ranges, --set overrides, and the to_toml round trip.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <tuple>

#include <gtest/gtest.h>

#include "launch/config.hpp"
#include "launch/trainer.hpp"
#include "runtime/error.hpp"

namespace meshtrain::launch {
namespace {

namespace fs = std::filesystem;

// Every field of TrainConfig, for comparisons. The structured binding names each member, so a
// member added to TrainConfig stops this from compiling until it is added here too.
auto fields(const TrainConfig& c) {
  const auto& [model_preset, model_arch, n_layer, n_head, n_embd, block_size, n_kv_head,
               intermediate_size, rope_theta, rms_norm_eps, tie_embeddings, hf_config, vocab,
               train_files, val_files, data_format, data_tokenizer, val_fraction, steps, batch_size,
               seq_len, grad_accum, precision, device, seed, lr, min_lr_ratio, warmup_steps,
               schedule, decay_fraction, weight_decay, beta1, beta2, eps, grad_clip, max_bad_steps,
               threads, dp_bucket_mb, dp_overlap, dp_reduce_dtype, comm_backend, zero, tp, pp,
               pp_schedule, pp_virtual_stages, tp_sequence_parallel, eval_every, eval_batches,
               sample_every, sample_tokens, temperature, top_k, prompt, run_dir, trace_steps,
               log_every, ckpt_every, ckpt_keep, ckpt_on_signal, ckpt_dir, rollback_after,
               max_rollbacks, model_init, resume] = c;
  return std::tie(model_preset, model_arch, n_layer, n_head, n_embd, block_size, n_kv_head,
                  intermediate_size, rope_theta, rms_norm_eps, tie_embeddings, hf_config, vocab,
                  train_files, val_files, data_format, data_tokenizer, val_fraction, steps,
                  batch_size, seq_len, grad_accum, precision, device, seed, lr, min_lr_ratio,
                  warmup_steps, schedule, decay_fraction, weight_decay, beta1, beta2, eps,
                  grad_clip, max_bad_steps, threads, dp_bucket_mb, dp_overlap, dp_reduce_dtype,
                  comm_backend, zero, tp, pp, pp_schedule, pp_virtual_stages, tp_sequence_parallel,
                  eval_every, eval_batches, sample_every, sample_tokens, temperature, top_k, prompt,
                  run_dir, trace_steps, log_every, ckpt_every, ckpt_keep, ckpt_on_signal, ckpt_dir,
                  rollback_after, max_rollbacks, model_init, resume);
}

bool same(const TrainConfig& a, const TrainConfig& b) {
  return fields(a) == fields(b);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

class ConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("mt_config_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  // Writes a config file and returns its path.
  std::string file(const std::string& text, const std::string& name = "job.toml") const {
    const std::string p = (dir_ / name).string();
    std::ofstream(p) << text;
    return p;
  }
  // The error of loading `text` as a config file.
  std::string file_error(const std::string& text) const {
    const std::string p = file(text);
    return error_of([&] { load_config(p, {}); });
  }
  std::string set_error(const std::string& override_text) const {
    return error_of([&] { load_config("", {override_text}); });
  }
  fs::path dir_;
};

#define EXPECT_HAS(text, part) EXPECT_NE((text).find(part), std::string::npos) << (text)

TEST_F(ConfigTest, EmptyPathGivesTheDefaults) {
  EXPECT_TRUE(same(load_config("", {}), TrainConfig{}));
  // An empty file and a file with empty sections are the defaults too.
  EXPECT_TRUE(same(load_config(file(""), {}), TrainConfig{}));
  EXPECT_TRUE(same(load_config(file("[model]\n[train]\n"), {}), TrainConfig{}));
}

TEST_F(ConfigTest, FileValuesOfEveryType) {
  const TrainConfig c = load_config(file(R"([model]
preset = "gpt-tiny"
n_layer = 3
[data]
train = ["a.txt", "b/*.bin"]
val = "v.txt"
val_fraction = 0.25
[train]
lr = 3e-4
weight_decay = 0       # an integer is a fine number
seed = 9007199254740992
[sample]
prompt = "Once upon"
)"),
                                    {});
  EXPECT_EQ(c.model_preset, "gpt-tiny");
  EXPECT_EQ(c.n_layer, 3);
  EXPECT_EQ(c.train_files, (std::vector<std::string>{"a.txt", "b/*.bin"}));
  EXPECT_EQ(c.val_files, (std::vector<std::string>{"v.txt"}));  // a single string is a list of one
  EXPECT_EQ(c.val_fraction, 0.25);
  EXPECT_EQ(c.lr, 3e-4);
  EXPECT_EQ(c.weight_decay, 0.0);
  EXPECT_EQ(c.seed, 9007199254740992ull);
  EXPECT_EQ(c.prompt, "Once upon");
  EXPECT_EQ(c.steps, TrainConfig{}.steps);  // untouched keys keep their defaults
}

TEST_F(ConfigTest, EveryTypeErrorNamesKeyLineAndTypes) {
  // integer keys
  EXPECT_HAS(file_error("[train]\nsteps = \"ten\"\n"),
             "job.toml:2: 'train.steps' must be an integer, got a string");
  EXPECT_HAS(file_error("[train]\n\nsteps = 1.5\n"),
             "job.toml:3: 'train.steps' must be an integer, got a floating-point number");
  EXPECT_HAS(file_error("[train]\nsteps = true\n"),
             "'train.steps' must be an integer, got a boolean");
  EXPECT_HAS(file_error("[train]\nseed = [1]\n"), "'train.seed' must be an integer, got an array");
  // number keys
  EXPECT_HAS(file_error("[train]\nlr = \"fast\"\n"),
             "job.toml:2: 'train.lr' must be a number, got a string");
  EXPECT_HAS(file_error("[train]\nlr = false\n"), "'train.lr' must be a number, got a boolean");
  EXPECT_HAS(file_error("[train]\nlr = 1979-05-27\n"),
             "'train.lr' must be a number, got a date or time");
  // string keys
  EXPECT_HAS(file_error("[train]\nprecision = 16\n"),
             "job.toml:2: 'train.precision' must be a string, got an integer");
  EXPECT_HAS(file_error("[train]\nprecision = \"fp8\"\n"),
             "'train.precision' = \"fp8\" is not one of: fp32, bf16, fp16");
  // lists of strings
  EXPECT_HAS(file_error("[data]\ntrain = 3\n"),
             "job.toml:2: 'data.train' must be a list of strings, got an integer");
  EXPECT_HAS(file_error("[data]\ntrain = [\"a\", 2]\n"),
             "every entry of 'data.train' must be a string");
  EXPECT_HAS(file_error("[data]\ntrain = {a = 1}\n"),
             "'data.train' must be a list of strings, got a table");
}

TEST_F(ConfigTest, UnknownKeysAndSectionsNameTheFileAndLine) {
  EXPECT_HAS(file_error("[train]\nsteps = 3\n\nlrr = 0.1\n"),
             "job.toml:4: unknown key 'train.lrr'; keys of [train] are: steps, batch_size");
  EXPECT_HAS(file_error("[train]\nsteps = 3\n[optim]\nlr = 1\n"),
             "job.toml:3: unknown section [optim]: expected one of model, data, train, tp, pp, dp, "
             "comm, eval, sample, run, trace, checkpoint");
  EXPECT_HAS(file_error("steps = 3\n"),
             "job.toml:1: 'steps' must be a section ([steps]); top-level keys are not allowed");
  // TOML syntax errors carry line and column.
  EXPECT_HAS(file_error("[train]\nsteps = = 3\n"),
             "config file " + (dir_ / "job.toml").string() + ":2:");
  // A missing file is an I/O error naming it.
  const std::string missing = (dir_ / "nope.toml").string();
  try {
    load_config(missing, {});
    ADD_FAILURE() << "no error for a missing config file";
  } catch (const IoError& e) {
    EXPECT_HAS(std::string(e.what()), "cannot open config file '" + missing + "'");
  }
}

TEST_F(ConfigTest, OutOfRangeValuesGiveTheRange) {
  EXPECT_HAS(file_error("[train]\nsteps = 0\n"),
             "job.toml:2: 'train.steps' = 0 is out of range: expected 1 to 2147483647");
  EXPECT_HAS(file_error("[train]\nbatch_size = -4\n"), "'train.batch_size' = -4 is out of range");
  EXPECT_HAS(file_error("[data]\nval_fraction = 0.9\n"),
             "'data.val_fraction' = 0.9 is out of range: expected 0 to 0.5");
  EXPECT_HAS(file_error("[train]\nlr = -1e-3\n"), "'train.lr' = -0.001 is out of range");
  EXPECT_HAS(file_error("[train]\nlr = nan\n"), "'train.lr' = nan is out of range");
  EXPECT_HAS(file_error("[train]\ngrad_clip = inf\n"), "'train.grad_clip' = inf is out of range");
  EXPECT_HAS(file_error("[train]\nseed = -1\n"), "'train.seed' = -1 is out of range");
  // The ends of a range are allowed.
  EXPECT_EQ(load_config(file("[data]\nval_fraction = 0.5\n[train]\nsteps = 1\n"), {}).steps, 1);
}

TEST_F(ConfigTest, SetOverrides) {
  const TrainConfig c =
      load_config(file("[train]\nsteps = 10\nlr = 1e-3\n"),
                  {"train.steps=20", "train.lr=3e-4", "data.train=corpus.txt",
                   "sample.prompt=Hello world", "run.dir=\"runs/quoted\"",
                   "data.val=[\"v1.txt\", \"v2.txt\"]", "train.precision=fp32", "train.steps=30"});
  EXPECT_EQ(c.steps, 30);  // the later override wins, and overrides beat the file
  EXPECT_EQ(c.lr, 3e-4);
  EXPECT_EQ(c.train_files, (std::vector<std::string>{"corpus.txt"}));  // a bare word
  EXPECT_EQ(c.prompt, "Hello world");                                  // bare, with a space
  EXPECT_EQ(c.run_dir, "runs/quoted");                                 // TOML quotes removed
  EXPECT_EQ(c.val_files, (std::vector<std::string>{"v1.txt", "v2.txt"}));
  EXPECT_EQ(c.precision, "fp32");
  // For string keys, text that reads as another TOML type is still the string.
  const TrainConfig d =
      load_config("", {"sample.prompt=1984", "run.dir=2024", "data.train=42", "data.val=true"});
  EXPECT_EQ(d.prompt, "1984");
  EXPECT_EQ(d.run_dir, "2024");
  EXPECT_EQ(d.train_files, (std::vector<std::string>{"42"}));
  EXPECT_EQ(d.val_files, (std::vector<std::string>{"true"}));
}

// A table header that starts with a character no key can: toml++'s debug build asserts there
// (found by fuzzing); the release build, which meshtrain links, reports the line and column.
TEST_F(ConfigTest, BadTableHeaderIsAParseError) {
  const std::string p = (dir_ / "bang.toml").string();
  std::ofstream(p) << "[!";
  EXPECT_HAS(error_of([&] { load_config(p, {}); }),
             "config file " + p + ":1:2: Error while parsing key");
}

// toml++ 3.3.0 reaches __builtin_unreachable() on some non-ASCII characters where it looks for
// whitespace (upstream marzer/tomlplusplus#295; found by fuzzing, input "\xcf\x91"): those
// places are refused first, with file:line:column; non-ASCII text in string values and comments
// still loads.
TEST_F(ConfigTest, NonAsciiOutsideStringValuesIsRefusedBeforeParsing) {
  const std::string p = (dir_ / "u.toml").string();
  auto error = [&](const std::string& text) {
    std::ofstream(p, std::ios::trunc | std::ios::binary) << text;
    return error_of([&] { load_config(p, {}); });
  };
  EXPECT_HAS(error("\xcf\x91"),
             "config file " + p + ":1:1: a character that is not ASCII outside a string");
  EXPECT_HAS(error("[sample]\ntop_k = 4\xc2\xa7\n"),
             p + ":2:10: a character that is not ASCII outside");
  EXPECT_HAS(error("[model]\n\"pr\xc3\xa9set\" = 'gpt2'\n"),
             p + ":2:4: a quoted key holds a character");
  EXPECT_HAS(error("[\"m\xc3\xa9\"]\n"), p + ":1:4: a quoted key holds");
  EXPECT_HAS(error("t=0\"\xc3\xa0"),
             p + ":1:5: a character that is not ASCII outside");  // in a bare value
  EXPECT_HAS(error("t=0[\"\xc3\xa0''"),
             p + ":1:6: a character that is not ASCII outside");  // '[' in a bare value
  EXPECT_HAS(error("t=0=\"\xc3\xa0\""), p + ":1:6: a character that is not ASCII outside");
  EXPECT_HAS(error("t=[0=\"\xc3\xa0\"]"), p + ":1:7: a character that is not ASCII outside");
  EXPECT_HAS(error("t=0,'\xc3\xa0'"), p + ":1:6: a character that is not ASCII outside");
  EXPECT_HAS(error("t=2.'\xcd\x8c"),
             p + ":1:6: a character that is not ASCII outside");  // after a float's '.'
  EXPECT_HAS(error("[sample]\nprompt = \"\"\"a\\\n  \xc2\xa7\"\"\"\n"),
             p + ":3:3: a character that is not ASCII right after a backslash or a line-ending");
  std::ofstream(p, std::ios::trunc | std::ios::binary)
      << "# caf\xc3\xa9\n[sample]\nprompt = \"\xc2\xa7 caf\xc3\xa9\" # \xc3\xbc\n[data]\n"
         "train = [\n  'd\xc3\xa9j\xc3\xa0.txt', \"\"\"\xcf\x91\"\"\",\n]\n";
  const TrainConfig c = load_config(p, {});
  EXPECT_EQ(c.prompt, "\xc2\xa7 caf\xc3\xa9");
  EXPECT_EQ(c.train_files, (std::vector<std::string>{"d\xc3\xa9j\xc3\xa0.txt", "\xcf\x91"}));
  // An override that hits it is a bare word (string keys) or an invalid value.
  EXPECT_EQ(load_config("", {"sample.prompt=\xcf\x91"}).prompt, "\xcf\x91");
  EXPECT_HAS(set_error("train.steps=\xcf\x91"), "is not a valid integer");
}

TEST_F(ConfigTest, SetErrorsNameTheOverride) {
  EXPECT_HAS(set_error("train.steps"), "--set 'train.steps': expected section.key=value");
  EXPECT_HAS(set_error("=3"), "--set '=3': expected section.key=value");
  EXPECT_HAS(set_error("steps=3"), "--set 'steps=3': the key must be section.key");
  EXPECT_HAS(set_error("checkpoint.on_signal=sometimes"), "checkpoint.on_signal");
  EXPECT_EQ(load_config("", {"checkpoint.on_signal=always"}).ckpt_on_signal, "always");
  EXPECT_HAS(set_error("train.lrr=3"),
             "--set 'train.lrr=3': unknown key 'train.lrr'; keys of [train] are:");
  EXPECT_HAS(set_error("optim.lr=3"),
             "--set 'optim.lr=3': unknown key 'optim.lr': unknown section");
  EXPECT_HAS(set_error("train.steps=abc"), "--set train.steps: 'abc' is not a valid integer");
  EXPECT_HAS(set_error("train.steps=2.5"), "--set train.steps: 'train.steps' must be an integer");
  EXPECT_HAS(set_error("train.steps=0"), "--set train.steps: 'train.steps' = 0 is out of range");
  EXPECT_HAS(set_error("train.lr=1e"), "--set train.lr: '1e' is not a valid number");
  EXPECT_HAS(set_error("train.precision=16"),
             "'train.precision' = \"16\" is not one of: fp32, bf16, fp16");
  EXPECT_HAS(set_error("train.schedule=linear"),
             "'train.schedule' = \"linear\" is not one of: cosine, constant, wsd");
  // A bare word that is not UTF-8 could not be written to config.toml and read back (found by
  // fuzzing: the run directory's config.toml then loaded as another config).
  EXPECT_HAS(set_error("run.dir=runs/\xff"), "--set run.dir: the value is not valid UTF-8 (byte 5");
  EXPECT_HAS(set_error("data.val=[\"v1.bin\", \"v\xd3\xd1\x9d\x96n\"]"),
             "--set data.val: the value is not valid UTF-8 (byte 13");
  EXPECT_HAS(set_error("sample.prompt=\xed\xa0\x80"), "not valid UTF-8 (byte 0");  // a surrogate
  EXPECT_HAS(set_error("sample.prompt=\xc0\xaf"), "not valid UTF-8 (byte 0");      // overlong '/'
  EXPECT_HAS(set_error("sample.prompt=ab\xe2\x82"), "not valid UTF-8 (byte 2");    // truncated
  EXPECT_EQ(load_config("", {"sample.prompt=caf\xc3\xa9 \xf0\x9f\x98\x80"}).prompt,
            "caf\xc3\xa9 \xf0\x9f\x98\x80");
}

// A config with a value other than the default in every key, and strings that need escaping.
TrainConfig unusual_config() {
  TrainConfig c;
  c.model_preset = "gpt-tiny";
  c.n_layer = 3;
  c.n_head = 2;
  c.n_embd = 96;
  c.block_size = 48;
  c.vocab = "bytes";
  c.train_files = {"data/a \"quoted\".txt", "data/b\\c.bin", "données/ü.txt"};
  c.val_files = {"val.txt"};
  c.data_format = "text";
  c.val_fraction = 0.1 + 0.2;  // 0.30000000000000004: needs all 17 digits
  c.steps = 1234;
  c.batch_size = 3;
  c.seq_len = 40;
  c.grad_accum = 4;
  c.precision = "fp16";
  c.seed = 9007199254740991ull;
  c.lr = 6e-4;
  c.min_lr_ratio = 1.0 / 3.0;
  c.warmup_steps = 7;
  c.schedule = "wsd";
  c.decay_fraction = 0.125;
  c.weight_decay = 0.0;
  c.beta1 = 0.85;
  c.beta2 = 0.999;
  c.eps = 1e-30;
  c.grad_clip = 2.0;
  c.max_bad_steps = 9;
  c.threads = 2;
  c.eval_every = 11;
  c.eval_batches = 13;
  c.sample_every = 17;
  c.sample_tokens = 19;
  c.temperature = 0.0;
  c.top_k = 0;
  c.prompt = "line one\nline two\t\"tab\" \\ end";
  c.run_dir = "runs/x y";
  c.log_every = 23;
  return c;
}

TEST_F(ConfigTest, ToTomlRoundTrips) {
  for (const TrainConfig& c : {TrainConfig{}, unusual_config()}) {
    const TrainConfig back = load_config(file(to_toml(c), "round.toml"), {});
    EXPECT_TRUE(same(back, c)) << to_toml(c) << "\nread back as\n" << to_toml(back);
    EXPECT_EQ(to_toml(back), to_toml(c));
  }
  // Strings that toml++'s printer wrote as multi-line literals that did not read back (found by
  // fuzzing): quotes of both kinds, runs of them, newlines, control characters.
  for (const std::string& v : {std::string("it's"), std::string("'''"), std::string("a'''b\n'"),
                               std::string("x\ny'"), std::string("\"\"\""), std::string("''''"),
                               std::string("tab\tand\x01"
                                           "ctrl\x7f"),
                               std::string("caf\xc3\xa9'\n"), std::string("\\'\\\"")}) {
    TrainConfig c;
    c.run_dir = v;
    c.prompt = v + v;
    c.train_files = {v, "plain"};
    const TrainConfig back = load_config(file(to_toml(c), "strings.toml"), {});
    EXPECT_EQ(back.run_dir, v) << to_toml(c);
    EXPECT_EQ(back.prompt, v + v);
    EXPECT_EQ(back.train_files, c.train_files);
  }
  // Every key of the table appears in the output exactly once.
  const std::string text = to_toml(TrainConfig{});
  for (const ConfigKeyInfo& k : config_keys()) {
    const std::string name = k.key.substr(k.key.find('.') + 1);
    EXPECT_HAS(text, "\n" + name + " = ");
  }
}

TEST_F(ConfigTest, KeyTableDocumentsEveryKey) {
  const auto keys = config_keys();
  // Every field but `resume` (a command-line choice, not part of a job's config) is a key.
  EXPECT_EQ(keys.size() + 1, std::tuple_size_v<decltype(fields(TrainConfig{}))>);
  for (const ConfigKeyInfo& k : keys) {
    EXPECT_FALSE(k.help.empty()) << k.key;
    EXPECT_FALSE(k.type.empty()) << k.key;
  }
}

// tp.sequence_parallel: a boolean, off by default, read from a file and from --set, written back
// by to_toml; refused without TP and with a sequence that does not split; taken by both families.
TEST_F(ConfigTest, SequenceParallelKey) {
  EXPECT_FALSE(TrainConfig{}.tp_sequence_parallel);
  const TrainConfig c = load_config(file("[train]\ntp = 2\n[tp]\nsequence_parallel = true\n"), {});
  EXPECT_TRUE(c.tp_sequence_parallel);
  EXPECT_TRUE(load_config(file(to_toml(c)), {}).tp_sequence_parallel);
  EXPECT_FALSE(load_config("", {"train.tp=2", "tp.sequence_parallel=false"}).tp_sequence_parallel);
  EXPECT_HAS(set_error("tp.sequence_parallel=1"), "'tp.sequence_parallel' must be true or false");
  const std::string no_tp = set_error("tp.sequence_parallel=true");
  EXPECT_HAS(no_tp, "tp.sequence_parallel = true needs tensor parallelism, but train.tp = 1");
  const std::string odd = error_of([] {
    load_config("", {"train.tp=4", "train.seq_len=250", "tp.sequence_parallel=true"});
  });
  EXPECT_HAS(odd, "train.seq_len (250) must be a multiple of train.tp (4)");
  EXPECT_HAS(odd, "248 or 252 would do");
  const TrainConfig llama = load_config("", {"model.preset=llama-tiny", "train.tp=2",
                                             "train.seq_len=32", "tp.sequence_parallel=true"});
  EXPECT_EQ(model_config(llama).arch, "llama");
  const TrainConfig gpt = load_config(
      "", {"model.preset=gpt-tiny", "train.tp=2", "train.seq_len=32", "tp.sequence_parallel=true"});
  EXPECT_TRUE(model_config(gpt).is_gpt());
}

// Pipeline keys: train.pp, pp.schedule, trace.steps, and more stages than the model has layers.
TEST_F(ConfigTest, PipelineAndTraceKeys) {
  const TrainConfig c = load_config("", {"train.pp=4", "pp.schedule=gpipe", "trace.steps=2,5-7"});
  EXPECT_EQ(c.pp, 4);
  EXPECT_EQ(c.pp_schedule, "gpipe");
  EXPECT_EQ(trace_steps(c), (std::vector<int>{2, 5, 6, 7}));
  EXPECT_HAS(set_error("pp.schedule=zigzag"), "pp.schedule");
  EXPECT_HAS(set_error("train.pp=0"), "train.pp");
  EXPECT_HAS(set_error("trace.steps=0"), "trace.steps = \"0\"");
  EXPECT_HAS(set_error("trace.steps=7-3"), "trace.steps = \"7-3\"");
  EXPECT_HAS(set_error("trace.steps=1,x"), "'x' is not a step");
  TrainConfig t;
  t.model_preset = "gpt-tiny";  // 2 layers
  t.seq_len = 64;
  t.pp = 3;
  EXPECT_HAS(error_of([&] { model_config(t); }),
             "train.pp = 3: the model's 2 layers (model.n_layer) cannot be split into 3");
}

// The interleaved schedule: V >= 2 chunks, only under interleaved, P >= 2, M a multiple of P,
// and (with the model) layers a multiple of V x P.
TEST_F(ConfigTest, InterleavedPipelineKeys) {
  const TrainConfig c = load_config(
      "", {"train.pp=2", "pp.schedule=interleaved", "pp.virtual_stages=2", "train.grad_accum=4"});
  EXPECT_EQ(c.pp_schedule, "interleaved");
  EXPECT_EQ(c.pp_virtual_stages, 2);
  EXPECT_EQ(load_config("", {}).pp_virtual_stages, 1);
  auto refused = [&](const std::vector<std::string>& o) {
    return error_of([&] { load_config("", o); });
  };
  EXPECT_HAS(refused({"train.pp=2", "pp.schedule=interleaved", "train.grad_accum=2"}),
             "pp.schedule = \"interleaved\" needs pp.virtual_stages >= 2 model chunks per stage, "
             "got pp.virtual_stages = 1");
  EXPECT_HAS(refused({"train.pp=2", "pp.virtual_stages=2"}),
             "pp.virtual_stages = 2: model chunks per stage run only under pp.schedule = "
             "\"interleaved\", not \"1f1b\"");
  EXPECT_HAS(refused({"pp.schedule=interleaved", "pp.virtual_stages=2"}), "train.pp = 1");
  EXPECT_HAS(refused({"train.pp=2", "pp.schedule=interleaved", "pp.virtual_stages=2",
                      "train.grad_accum=3"}),
             "train.grad_accum = 3 must be a multiple of 2");
  EXPECT_HAS(set_error("pp.virtual_stages=0"), "pp.virtual_stages");
  // gpt-tiny has 2 layers: P = 2 x V = 2 needs 4.
  TrainConfig t = c;
  t.model_preset = "gpt-tiny";
  t.seq_len = 64;
  EXPECT_HAS(error_of([&] { model_config(t); }),
             "the model's 2 layers (model.n_layer) cannot be cut into 2 x 2 = 4 equal model "
             "chunks; model.n_layer must be a multiple of pp.virtual_stages x train.pp");
  t.n_layer = 4;
  EXPECT_NO_THROW(model_config(t));
}

TEST_F(ConfigTest, ModelConfigChecksTheCombination) {
  TrainConfig c;
  c.model_preset = "gpt-tiny";  // block size 64
  c.seq_len = 128;
  EXPECT_HAS(error_of([&] { model_config(c); }),
             "train.seq_len (128) exceeds the model's block size (64)");
  c.seq_len = 64;
  c.n_head = 5;
  EXPECT_HAS(error_of([&] { model_config(c); }),
             "model.n_embd (64) must be a multiple of model.n_head (5)");
  // A head count TP does not divide: the sizes that would are named.
  c.n_head = 0;
  c.tp = 3;
  EXPECT_HAS(error_of([&] { model_config(c); }),
             "train.tp must divide model.n_head: 1, 2, 4 would");
  c.tp = 1;
  EXPECT_EQ(model_config(c).gpt.vocab_size, 256);
  c.vocab = "gpt2";
  EXPECT_EQ(model_config(c).gpt.padded_vocab, 50304);
}

TEST_F(ConfigTest, ModelArchSelectsTheLlamaFamily) {
  TrainConfig c;
  c.model_preset = "llama-tiny";
  c.seq_len = 64;
  const models::ModelConfig m = model_config(c);
  EXPECT_EQ(m.arch, "llama");
  EXPECT_EQ(m.llama.n_kv_head, 2);
  EXPECT_EQ(m.vocab_size(), 256);
  c.model_arch = "qwen2";
  EXPECT_TRUE(model_config(c).llama.qkv_bias);
  c.model_arch = "gpt2";
  EXPECT_HAS(error_of([&] { model_config(c); }), "model.arch = gpt2 does not fit model.preset");
  c.model_arch = "auto";
  c.n_kv_head = 3;
  EXPECT_HAS(error_of([&] { model_config(c); }), "model.n_kv_head (3) must divide");
  c.n_kv_head = 0;
  c.tie_embeddings = "true";
  c.tp = 2;
  EXPECT_TRUE(model_config(c).llama.tie_word_embeddings);
  EXPECT_EQ(model_config(c).llama.padded_vocab, 256);
  c.tp = 4;  // 2 KV heads over 4 ranks: each held by two (replicated since the kvrep merge)
  EXPECT_EQ(model_config(c).llama.n_kv_head, 2);
  c.tp = 8;  // more ranks than query heads: refused, naming both head counts
  EXPECT_HAS(error_of([&] { model_config(c); }), "model.n_kv_head = 2");
  c.tp = 1;
  c.model_preset = "gpt-tiny";
  c.tie_embeddings = "auto";
  c.intermediate_size = 100;
  EXPECT_HAS(error_of([&] { model_config(c); }), "apply to model.arch = llama or qwen2");
  c.intermediate_size = 0;
  c.model_preset = "llama-tiny";
  c.hf_config = (dir_ / "config.json").string();
  c.n_layer = 3;
  EXPECT_HAS(error_of([&] { model_config(c); }), "model.hf_config");
}

}  // namespace
}  // namespace meshtrain::launch
