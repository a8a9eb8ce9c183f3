// The meshtrain command line: train, generate, plan, export, import, env.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "comm/mpi.hpp"
#include "launch/checkpointing.hpp"
#include "launch/config.hpp"
#include "launch/generate.hpp"
#include "launch/hf.hpp"
#include "launch/hf_llama.hpp"
#include "launch/preemption.hpp"
#include "launch/run_dir.hpp"
#include "launch/tokenize.hpp"
#include "launch/trainer.hpp"
#include "launch/weights.hpp"
#include "parallel/checkpoint.hpp"
#include "runtime/config.hpp"
#include "runtime/file_io.hpp"
#include "runtime/log.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/settings.hpp"
#include "runtime/threads.hpp"

namespace {

using namespace meshtrain;
namespace fs = std::filesystem;

constexpr const char* kUsage = R"(usage: meshtrain <command> [options]

commands:
  train      train a GPT-2 or Llama-family model (meshtrain train --help)
  generate   continue a prompt with a trained model (meshtrain generate --help)
  plan       parameters, FLOPs and memory per rank; compute-optimal sizes (meshtrain plan --help)
  tokenize   text files to llm.c token shards with a tokenizer.json (meshtrain tokenize --help)
  export     write a trained model in the Hugging Face layout (meshtrain export --help)
  import     read a Hugging Face GPT-2, Llama or Qwen2 model (meshtrain import --help)
  env        the MESHTRAIN_* environment settings and their values
  --version  print the version
)";

constexpr const char* kTrainUsage =
    R"(usage: meshtrain train [--config FILE] [--set section.key=value ...] [--device cpu|cuda] [--tp K] [--pp P]
                       [--resume DIR|latest|auto] [--quiet]

Trains a GPT model. With no arguments: a small GPT (6 layers, width 384) on the built-in corpus
(Debian's fortune cookies) for 300 steps, ending with a generated sample. Under mpirun -np N:
DP = N / K x TP = K (consecutive ranks form a tensor-parallel group).

  --config FILE        a TOML file with sections [model] [data] [train] [eval] [sample] [run]
  --set KEY=VALUE      override one key, e.g. --set train.lr=3e-4 --set data.train=corpus.txt
  --device cpu|cuda    the same as --set train.device=...: cuda trains on one GPU per rank
  --tp K               tensor parallelism over K ranks (= --set train.tp=K)
  --pp P               pipeline parallelism over P stages (= --set train.pp=P; pp.schedule picks
                       1f1b or gpipe, train.grad_accum the micro-batches per step)
  --resume CKPT        continue from a checkpoint (checkpoint.every writes them): a directory
                       RUN_DIR/checkpoints/step_N, "latest" (the newest complete one; an error if
                       none) or "auto" (the newest, else a fresh start). Without --config the
                       checkpoint's own config is the base; --set still overrides it. The DP/TP
                       layout and ZeRO may differ from the saved run's.
  --quiet              no per-step lines (metrics still go to RUN_DIR/metrics.jsonl)

On SIGTERM, SIGINT or SIGUSR1 (to any rank) every rank finishes the step in flight, the job saves
a checkpoint of it (checkpoint.on_signal) and exits with status 75 ("retry": resume with
--resume auto); Ctrl-C twice stops at once.

config keys (default):
)";

constexpr const char* kGenerateUsage =
    R"(usage: meshtrain generate --run DIR [--prompt TEXT | --prompt-ids 1,2,3] [--ids] [--tokens N]
                          [--temperature T] [--top-k K] [--seed S]

Continues a prompt with the model a training run saved (DIR/config.toml, DIR/model.safetensors),
printing each token as it comes. Text goes through the run's tokenizer (DIR/tokenizer.json, which
data.tokenizer and import --hf put there; the prompt is encoded with its special tokens, e.g.
Llama 3's <|begin_of_text|>, and generation stops at its end-of-text token), or is bytes for a
byte-vocabulary model. Under mpirun -np K the model is split across the K ranks (tensor
parallelism; its heads must divide by K) and rank 0 prints the text.

  --run DIR          the run directory (default runs/latest)
  --prompt TEXT      the text to continue (default: the config's sample.prompt)
  --prompt-ids IDS   the prompt as comma-separated token ids instead (for scripts)
  --ids              print the generated token ids, one line, instead of text
  --tokens N         tokens to generate (default 200)
  --temperature T    0 = greedy (default 0.8)
  --top-k K          sample among the K most likely tokens, 0 = all (default 40)
  --seed S           random seed (default 1)
)";

constexpr const char* kPlanUsage =
    R"(usage: meshtrain plan [--model PRESET | --config FILE] [--set KEY=VALUE ...]
                      [--batch B] [--seq T] [--precision P] [--dp N] [--tp K]
                      [--pp P [--micro M] [--schedule 1f1b|gpipe|interleaved [--virtual V]]]
                      [--budget-flops F | --budget-gpu-hours H [--gpu-tflops X] [--mfu M]]

Parameters, training FLOPs per token and memory per rank for a model, and with a compute budget,
the compute-optimal model size and token count (Chinchilla: about 20 tokens per parameter,
training compute C = 6 N D).

  --model PRESET         gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt-small, gpt-tiny, llama3-8b,
                         llama3-70b, llama3.2-1b, qwen2.5-0.5b, llama-small, llama-tiny
  --batch B, --seq T     micro-batch for the activation estimate (default: the config's)
  --precision P          fp32, bf16 (default) or fp16
  --dp N                 data-parallel ranks: also shows what ZeRO-1 (train.zero = 1) saves
  --tp K                 tensor-parallel ranks: memory per rank of a model split K ways
  --pp P                 pipeline stages: memory per stage (parameters, optimizer, peak
                         in-flight activations) and the schedule's bubble fraction
  --micro M              micro-batches per step (= train.grad_accum; default: the config's)
  --schedule S           1f1b (default), gpipe or interleaved (= pp.schedule)
  --virtual V            model chunks per stage for interleaved (= pp.virtual_stages, >= 2)
  --budget-flops F       a compute budget in FLOPs, e.g. 1e21
  --budget-gpu-hours H   a budget in GPU-hours, at --gpu-tflops (default 989, H100 dense bf16)
                         and --mfu (default 0.4)
)";

constexpr const char* kExportUsage =
    R"(usage: meshtrain export --hf OUT [--run DIR] [--checkpoint CKPT] [--force]

Writes OUT/model.safetensors and OUT/config.json in the Hugging Face layout of the run's model
(fp32, the vocabulary trimmed to its real size): GPT2LMHeadModel (Conv1D weights [in, out]),
LlamaForCausalLM or Qwen2ForCausalLM, loadable with transformers' from_pretrained(OUT); a Llama
or Qwen2 run's tokenizer.json and tokenizer_config.json are copied along.

  --run DIR          the run directory (default runs/latest): its config.toml and, without
                     --checkpoint, its final model.safetensors
  --checkpoint CKPT  export a checkpoint instead: a directory, or latest (the newest of the run)
  --force            write into OUT even when it is not empty (replacing its model.safetensors
                     and config.json); without it a non-empty OUT is refused
)";

constexpr const char* kImportUsage = R"(usage: meshtrain import --hf DIR --out RUN_DIR [--force]

Reads a Hugging Face model as save_pretrained writes it: GPT2LMHeadModel (DIR/config.json and
DIR/model.safetensors; vocabulary 50257 or 256), or LlamaForCausalLM / Qwen2ForCausalLM
(model.safetensors or model-0000K-of-0000N.safetensors shards with their index; fp32, bf16 or
fp16). Writes RUN_DIR/model.safetensors in meshtrain's layout (fp32) and RUN_DIR/config.toml
whose model.init points at it; a Llama-family model also keeps its config.json as
RUN_DIR/hf_config.json (model.hf_config) and its tokenizer.json and tokenizer_config.json. Every
tensor is checked before anything is written. RUN_DIR must be new or empty: an existing
run's files are replaced only with --force (which says what it replaces and what it leaves, such
as checkpoints and metrics that no longer match the new model). Then:

  meshtrain generate --run RUN_DIR --prompt ...
  meshtrain train --config RUN_DIR/config.toml --set run.dir=finetune --set data.train=...
)";

constexpr const char* kTokenizeUsage =
    R"(usage: meshtrain tokenize --tokenizer T.json FILES... --out DIR [--val-fraction F]
                          [--shard-tokens N] [--split blank-lines|file] [--threads N] [--quiet]

Encodes text files with a Hugging Face tokenizer.json (byte-level BPE: GPT-2, Llama 3, Qwen2)
into llm.c token shards: DIR/train_000000.bin ... and DIR/val_000000.bin, in GPT-2's uint16
format for vocabularies up to 65,536 ids, else Llama 3's uint32 one. Documents (each file's
sections between blank lines, as llm.c's scripts cut them, or whole files) are each preceded by
the tokenizer's bos token (Llama 3), else its eos (GPT-2, Qwen2). Then:

  meshtrain train --set data.train='DIR/train_*.bin' --set data.val=DIR/val_000000.bin ...

  --tokenizer T.json   the tokenizer
  --out DIR            where the shards go (created)
  --val-fraction F     the last documents, about this share of the tokens, form the
                       validation shard (default 0.05; 0: none)
  --shard-tokens N     tokens per train shard (default 100000000, llm.c's)
  --split S            blank-lines (default) or file: each file is one document
  --threads N          encoding threads (default: every core)
  --quiet              no progress line
)";

struct Args {
  std::vector<std::string> v;
  std::size_t i = 0;
  bool more() const { return i < v.size(); }
};

double parse_number(const std::string& flag, const std::string& text, double lo, double hi) {
  char* end = nullptr;
  const double d = std::strtod(text.c_str(), &end);
  MT_CHECK(
      !text.empty() && end == text.c_str() + text.size() && std::isfinite(d) && d >= lo && d <= hi,
      "{} '{}': expected a number from {} to {}", flag, text, lo, hi);
  return d;
}

// One command's flags, declared as a table: each flag names what its value sets. parse() takes
// `--flag VALUE` and `--flag=VALUE` alike, prints the usage for --help / -h, and refuses an
// unknown argument or a missing value naming the command and the flag.
class Flags {
 public:
  using Setter = std::function<void(const std::string& flag, const std::string& value)>;
  Flags(const char* command, const char* usage) : command_(command), usage_(usage) {}

  // A flag that takes a value.
  Flags& value(const char* name, Setter set) {
    flags_.push_back({name, true, std::move(set)});
    return *this;
  }
  Flags& text(const char* name, std::string* out) {
    return value(name, [out](const std::string&, const std::string& v) { *out = v; });
  }
  // A repeatable flag: every occurrence adds its value.
  Flags& texts(const char* name, std::vector<std::string>* out) {
    return value(name, [out](const std::string&, const std::string& v) { out->push_back(v); });
  }
  template <typename T>
  Flags& number(const char* name, double lo, double hi, T* out) {
    return value(name, [=](const std::string& f, const std::string& v) {
      *out = static_cast<T>(parse_number(f, v, lo, hi));
    });
  }
  // A flag without a value.
  Flags& on(const char* name, bool* out) {
    flags_.push_back({name, false, [out](const std::string&, const std::string&) { *out = true; }});
    return *this;
  }
  // Arguments that are not flags (FILES...): collected here instead of refused.
  Flags& positional(std::vector<std::string>* out) {
    positional_ = out;
    return *this;
  }
  // Printed after the usage by --help.
  Flags& more_help(std::function<void()> print) {
    more_help_ = std::move(print);
    return *this;
  }

  // Applies every argument left in `a`; false when --help printed the usage (the command then
  // returns 0 without doing anything).
  bool parse(Args& a) const {
    while (a.more()) {
      const std::string arg = a.v[a.i++];
      if (arg == "--help" || arg == "-h") {
        std::printf("%s", usage_);
        if (more_help_) more_help_();
        return false;
      }
      if (positional_ != nullptr && arg.rfind("-", 0) != 0) {
        positional_->push_back(arg);
        continue;
      }
      const auto eq = arg.find('=');
      const std::string name = arg.rfind("--", 0) == 0 ? arg.substr(0, eq) : arg;
      const Flag* flag = nullptr;
      for (const Flag& f : flags_) flag = flag != nullptr || name != f.name ? flag : &f;
      MT_CHECK(flag != nullptr, "{}: unknown argument '{}' (see meshtrain {} --help)", command_,
               arg, command_);
      std::string v;
      if (!flag->takes_value) {
        MT_CHECK(eq == std::string::npos, "{}: {} takes no value (got '{}')", command_, name, arg);
      } else if (eq != std::string::npos) {
        v = arg.substr(eq + 1);
      } else {
        MT_CHECK(a.more(), "{}: {} needs a value (see meshtrain {} --help)", command_, name,
                 command_);
        v = a.v[a.i++];
      }
      flag->set(name, v);
    }
    return true;
  }

 private:
  struct Flag {
    std::string name;
    bool takes_value;
    Setter set;
  };
  const char* command_;
  const char* usage_;
  std::vector<Flag> flags_;
  std::function<void()> more_help_;
  std::vector<std::string>* positional_ = nullptr;
};

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  return fmt::format("{:.2f} {}", b, units[u]);
}

// Whether this process was started by mpirun (Open MPI, or a PMI launcher: MPICH, Slurm).
bool launched_by_mpirun() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(v) != nullptr) return true;
  return false;
}

// One rank's error ends the whole job (MPI_Abort) instead of leaving the others waiting in a
// collective, and exits non-zero however the launcher treats a failed rank. Every failure of a
// multi-rank job must end here: under Open MPI 4.1 with orte_abort_on_non_zero_status=0 (Slurm
// without --kill-on-bad-exit and Kubernetes are alike), a rank killed by a signal is never counted
// as terminated, so if the others then exit by themselves, even non-zero, mpirun waits forever;
// MPI_Abort is the one thing that ends such a job.
[[noreturn]] void abort_job(comm::MpiSession& session, const std::exception& e) {
  std::fprintf(stderr, "meshtrain: error on rank %d of %d: %s\n", session.rank(), session.size(),
               e.what());
  std::fflush(stderr);
  session.abort(1);
}

// The end of a multi-rank job, after the last write (rank 0's final model): two barriers, each
// bounded by MESHTRAIN_COMM_TIMEOUT and naming a lost rank as any collective does, then
// MPI_Finalize. Without them, a rank lost after its last collective (while rank 0 wrote the final
// model, or inside MPI_Finalize) let the others exit 0 and, as above, mpirun never ended. One
// barrier is not enough: a rank killed while it waited in the barrier for rank 0 had already sent
// its part, so rank 0 would pass. Every rank leaves the first barrier only once all arrived, so a
// rank lost after the first fails the second on the others. What is left is a rank lost inside
// the second barrier or MPI_Finalize, a window of milliseconds with every rank at the same point.
void end_job(comm::MpiSession& session, comm::Communicator& world) {
  world.barrier().wait();
  world.barrier().wait();
  world.finalize();
  session.finalize();
}

// This process among the processes of its node, from the MPI session (none: a process alone):
// what picks its GPU and divides the node's cores among its ranks.
comm::NodeLocal node_local(const std::optional<comm::MpiSession>& session) {
  return session ? session->node_local() : comm::NodeLocal{};
}

int cmd_train(Args a) {
  std::string config;
  std::vector<std::string> sets;
  std::string resume;
  bool quiet = false;
  const bool go =
      Flags("train", kTrainUsage)
          .text("--config", &config)
          .texts("--set", &sets)
          .on("--quiet", &quiet)
          .value("--device", [&](const std::string&,
                                 const std::string& v) { sets.push_back("train.device=" + v); })
          .value("--tp",
                 [&](const std::string&, const std::string& v) { sets.push_back("train.tp=" + v); })
          .value("--pp",
                 [&](const std::string&, const std::string& v) { sets.push_back("train.pp=" + v); })
          .value("--resume",
                 [&](const std::string&, const std::string& v) {
                   MT_CHECK(!v.empty(), "--resume needs a checkpoint directory, latest or auto");
                   resume = v;
                 })
          .more_help([] {
            for (const auto& k : launch::config_keys())
              std::printf("  %-22s %-28s %s (%s)\n", k.key.c_str(), k.type.c_str(), k.help.c_str(),
                          k.default_value.c_str());
          })
          .parse(a);
  if (!go) return 0;
  launch::TrainConfig cfg = launch::load_config(config, sets);
  if (!resume.empty()) {
    // The checkpoint's config is the base unless --config names one; --set applies on top.
    cfg.resume = resume;
    const std::string dir = launch::resolve_resume(cfg);
    if (!dir.empty()) {
      if (config.empty()) cfg = launch::load_config((fs::path(dir) / "config.toml").string(), sets);
      cfg.resume = dir;
    } else {
      cfg.resume.clear();  // auto, and nothing to resume from
    }
  }
  // Under mpirun every process is one rank: DP = the number of processes. A plain run starts no
  // MPI at all.
  std::optional<comm::MpiSession> session;
  comm::Communicator world;
  if (launched_by_mpirun()) session.emplace();
  // After MPI's initialisation, so that these handlers are the ones in place.
  launch::install_stop_handlers();
  launch::TrainResult r;
  try {
    if (session) world = session->world();
    {
      launch::Trainer trainer(cfg, world.valid() ? &world : nullptr, node_local(session));
      trainer.set_verbose(!quiet);
      r = trainer.run();
    }
    if (session) end_job(*session, world);
  } catch (const std::exception& e) {
    if (!session || session->size() == 1) throw;
    abort_job(*session, e);
  }
  const bool root = !session || session->rank() == 0;
  const int status = r.stop_signal != 0 ? launch::kExitPreempted : 0;
  if (!root) return status;
  if (r.stop_signal != 0) {
    std::printf(
        "stopped by %s after step %d of %d; %s; exit status %d (continue with --resume "
        "auto or latest)\n",
        launch::signal_name(r.stop_signal).c_str(), r.steps, cfg.steps,
        r.stop_checkpoint.empty() ? "no checkpoint written"
                                  : ("checkpoint " + r.stop_checkpoint).c_str(),
        status);
    return status;
  }
  std::string rss;
  for (double mib : r.peak_rss_mib) rss += fmt::format("{}{:.0f}", rss.empty() ? "" : ", ", mib);
  std::printf(
      "done: %d steps, loss %.4f -> %.4f%s (unigram entropy %.4f), %.0f tokens/s, %d "
      "skipped; peak RSS %s MiB%s; run directory %s\n",
      r.steps, r.first_loss, r.final_loss,
      std::isfinite(r.final_val_loss)
          ? fmt::format(" (validation {:.4f}{})", r.final_val_loss,
                        std::isfinite(r.final_val_bits_per_byte)
                            ? fmt::format(", {:.3f} bits per byte", r.final_val_bits_per_byte)
                            : std::string())
                .c_str()
          : "",
      r.unigram_entropy, r.tokens_per_s, r.skipped_steps, rss.c_str(),
      r.peak_rss_mib.size() > 1 ? " (by rank)" : "", cfg.run_dir.c_str());
  return 0;
}

// "1,2,3" -> ids; refuses anything else naming the flag.
std::vector<std::int32_t> parse_ids(const std::string& flag, const std::string& text) {
  std::vector<std::int32_t> ids;
  std::stringstream ss(text);
  for (std::string t; std::getline(ss, t, ',');)
    ids.push_back(static_cast<std::int32_t>(parse_number(flag, t, 0, 2147483647)));
  MT_CHECK(!ids.empty(), "{}: expected comma-separated token ids, got '{}'", flag, text);
  return ids;
}

int cmd_generate(Args a) {
  std::string run = "runs/latest", prompt, prompt_id_text;
  bool have_prompt = false, print_ids = false;
  int tokens = 200, top_k = 40;
  double temperature = 0.8;
  std::uint64_t seed = 1;
  const bool go = Flags("generate", kGenerateUsage)
                      .text("--run", &run)
                      .value("--prompt",
                             [&](const std::string&, const std::string& v) {
                               prompt = v;
                               have_prompt = true;
                             })
                      .text("--prompt-ids", &prompt_id_text)
                      .on("--ids", &print_ids)
                      .number("--tokens", 0, 1 << 30, &tokens)
                      .number("--temperature", 0, 100, &temperature)
                      .number("--top-k", 0, 1 << 20, &top_k)
                      .number("--seed", 0, 9e15, &seed)
                      .parse(a);
  if (!go) return 0;
  MT_CHECK(!(have_prompt && !prompt_id_text.empty()),
           "generate: give --prompt or --prompt-ids, not both");
  const std::string config = (fs::path(run) / "config.toml").string();
  const std::string weights = (fs::path(run) / "model.safetensors").string();
  MT_CHECK(fs::exists(config) && fs::exists(weights),
           "generate: '{}' is not a finished run directory (needs config.toml and "
           "model.safetensors, written at the end of meshtrain train)",
           run);
  launch::TrainConfig cfg = launch::load_config(config, {});
  std::optional<Tokenizer> tok;
  const std::string tok_path = (fs::path(run) / "tokenizer.json").string();
  if (fs::exists(tok_path)) tok.emplace(Tokenizer::from_file(tok_path));
  // Under mpirun every rank holds a 1/N shard of the model (TP = N), whatever layout trained it:
  // the saved weights are full tensors.
  std::optional<comm::MpiSession> session;
  comm::Communicator world;
  if (launched_by_mpirun()) {
    session.emplace();
    try {
      world = session->world();
    } catch (const std::exception& e) {
      if (session->size() == 1) throw;
      abort_job(*session, e);
    }
  }
  cfg.tp = 1;
  const models::ModelConfig unsplit = launch::model_config(cfg);
  const int ranks = world.valid() ? world.size() : 1;
  MT_CHECK(!unsplit.is_gpt() || unsplit.gpt.n_head % ranks == 0,
           "generate: mpirun -np {} splits the model across {} ranks, but its {} attention heads "
           "do not divide by {}; use a process count that divides {}",
           ranks, ranks, unsplit.gpt.n_head, ranks, unsplit.gpt.n_head);
  cfg.tp = ranks;
  const bool root = !session || session->rank() == 0;
  // The prompt's ids are checked before the model is built.
  const std::vector<std::int32_t> start =
      prompt_id_text.empty()
          ? launch::prompt_ids(unsplit, tok ? &*tok : nullptr, have_prompt ? prompt : cfg.prompt)
          : parse_ids("--prompt-ids", prompt_id_text);
  try {
    // The model in its own scope: it may hold communicators split off `world` (a Llama's KV-head
    // groups), which must go before the session ends.
    {
      set_cpu_threads(cfg.threads > 0 ? cfg.threads
                                      : default_cpu_threads(node_local(session).size));
      models::Decoder model(launch::model_config(cfg), PrecisionPolicy::parse(cfg.precision),
                            cpu_device(),
                            world.valid() ? parallel::TPGroup(world) : parallel::TPGroup());
      model.set_weights(launch::load_weights(model, weights));
      // Streamed: each token is printed (decoded, when there is text to print) as it comes.
      std::optional<Tokenizer::StreamDecoder> stream;
      if (tok && !print_ids) stream.emplace(*tok, true);
      const bool bytes = !tok && unsplit.vocab_size() == 256;
      std::optional<std::int32_t> eos;
      if (tok) eos = tok->eos_id();
      // The prompt first, as the model reads it: the text given, or the bytes it starts from
      // (an empty prompt on the byte vocabulary starts from a newline).
      if (root && !print_ids && prompt_id_text.empty()) {
        if (stream) std::fputs((have_prompt ? prompt : cfg.prompt).c_str(), stdout);
        if (bytes)
          for (std::int32_t id : start) std::fputc(static_cast<char>(id), stdout);
        std::fflush(stdout);
      }
      bool first = true;
      launch::generate_ids(
          model, cfg.seq_len, start, tokens, temperature, top_k, seed,
          [&](std::int32_t id) {
            if (!root) return !eos || id != *eos;
            if (stream && !(eos && id == *eos)) {
              std::fputs(stream->push(id).c_str(), stdout);
            } else if (bytes && !print_ids) {
              std::fputc(static_cast<char>(id), stdout);
            } else if (!stream) {
              std::printf("%s%d", first ? "" : " ", id);
            }
            first = false;
            std::fflush(stdout);
            return !eos || id != *eos;
          },
          tok ? tok->vocab_size() : 0);
      if (root) {
        if (stream) std::fputs(stream->finish().c_str(), stdout);
        std::printf("\n");
      }
    }
    if (session) end_job(*session, world);
  } catch (const std::exception& e) {
    if (!session || session->size() == 1) throw;
    abort_job(*session, e);
  }
  return 0;
}

int cmd_tokenize(Args a) {
  launch::TokenizeOptions o;
  std::string split = "blank-lines";
  bool quiet = false;
  const bool go = Flags("tokenize", kTokenizeUsage)
                      .text("--tokenizer", &o.tokenizer)
                      .text("--out", &o.out)
                      .number("--val-fraction", 0, 0.5, &o.val_fraction)
                      .number("--shard-tokens", 1, 2147483647, &o.shard_tokens)
                      .text("--split", &split)
                      .number("--threads", 0, 1024, &o.threads)
                      .on("--quiet", &quiet)
                      .positional(&o.files)
                      .parse(a);
  if (!go) return 0;
  MT_CHECK(split == "blank-lines" || split == "file",
           "tokenize: --split '{}': expected blank-lines or file", split);
  o.split_blank_lines = split == "blank-lines";
  o.progress = !quiet;
  const launch::TokenizeResult r = launch::tokenize_files(o);
  std::printf(
      "tokenized %.1f MB in %.1f s (%.1f MB/s): %lld train + %lld validation tokens, vocabulary "
      "%d (%s shards)\n",
      static_cast<double>(r.bytes) / 1e6, r.seconds,
      static_cast<double>(r.bytes) / 1e6 / std::max(r.seconds, 1e-9),
      static_cast<long long>(r.train_tokens), static_cast<long long>(r.val_tokens), r.vocab_size,
      r.vocab_size <= 65536 ? "uint16" : "uint32");
  for (const std::string& f : r.shards) std::printf("  %s\n", f.c_str());
  return 0;
}

// `meshtrain plan`'s memory table for one rank.
void print_memory(const launch::TrainConfig& cfg, const models::ModelConfig& m,
                  const PrecisionPolicy& policy, int dp, const models::MemoryEstimate& mem) {
  std::printf("model: %s\n", m.str().c_str());
  std::printf("parameters: %lld", static_cast<long long>(m.num_parameters()));
  if (cfg.tp > 1)
    std::printf(" (%lld per rank under TP = %d)",
                static_cast<long long>(m.num_parameters_per_rank(cfg.tp)), cfg.tp);
  std::printf("\n");
  std::printf("training FLOPs per token (seq %d): %.3e\n", cfg.seq_len,
              m.training_flops_per_token(cfg.seq_len));
  std::printf("memory per rank (DP %d x TP %d = %d ranks%s, %s, micro-batch %d x %d):\n", dp,
              cfg.tp, dp * cfg.tp, cfg.tp_sequence_parallel ? ", sequence parallel" : "",
              std::string(policy.name()).c_str(), cfg.batch_size, cfg.seq_len);
  std::printf("  parameters       %s\n", human_bytes(static_cast<double>(mem.parameters)).c_str());
  std::printf("  gradients (fp32) %s\n", human_bytes(static_cast<double>(mem.gradients)).c_str());
  std::printf("  master weights   %s\n",
              human_bytes(static_cast<double>(mem.master_weights)).c_str());
  std::printf("  AdamW state      %s\n",
              human_bytes(static_cast<double>(mem.optimizer_state)).c_str());
  std::printf("  activations      %s\n", human_bytes(static_cast<double>(mem.activations)).c_str());
  std::printf("  total            %s\n", human_bytes(static_cast<double>(mem.total())).c_str());
}

// What ZeRO-1 saves over `mem` (the same layout without it), and the gradient buckets.
void print_zero(const launch::TrainConfig& cfg, const models::ModelConfig& m,
                const PrecisionPolicy& policy, int dp, const models::MemoryEstimate& mem) {
  const models::MemoryEstimate z = models::estimate_memory(
      m, policy, cfg.batch_size, cfg.seq_len, cfg.tp, dp, true, cfg.tp_sequence_parallel);
  std::printf("with ZeRO-1 over %d data-parallel ranks (train.zero = 1):\n", dp);
  std::printf("  master weights   %s (shard of %lld parameters)\n",
              human_bytes(static_cast<double>(z.master_weights)).c_str(),
              static_cast<long long>(z.optimizer_elements));
  std::printf("  AdamW state      %s (shard)\n",
              human_bytes(static_cast<double>(z.optimizer_state)).c_str());
  std::printf("  gradient shard   %s (the averaged gradients this rank updates with)\n",
              human_bytes(static_cast<double>(z.gradient_shard)).c_str());
  std::printf(
      "  total            %s (saves %s per rank, %.0f%%)\n",
      human_bytes(static_cast<double>(z.total())).c_str(),
      human_bytes(static_cast<double>(mem.total() - z.total())).c_str(),
      100.0 * static_cast<double>(mem.total() - z.total()) / static_cast<double>(mem.total()));
  const std::int64_t n = m.num_parameters_per_rank(cfg.tp);
  std::printf("  (dp.reduce_dtype = \"bf16\" adds a bf16 staging copy of the gradients: %s)\n",
              human_bytes(static_cast<double>(2 * n)).c_str());
  // The reducer's buckets (parallel/grad_reducer.hpp): cut at parameter boundaries, so the
  // count is about the gradients over the size.
  const bool auto_bucket = cfg.dp_bucket_mb <= 0;
  const auto bucket = static_cast<double>(launch::dp_bucket_bytes(cfg, 4 * n));
  std::printf(
      "gradient buckets: 1 MiB first, then about %s each (%s), about %.0f buckets\n",
      human_bytes(bucket).c_str(),
      auto_bucket ? "dp.bucket_mb = 0: an eighth of the gradients, 1 to 25 MiB" : "dp.bucket_mb",
      std::ceil(static_cast<double>(4 * n) / bucket));
}

// Chinchilla (Hoffmann et al. 2022): D = 20 N and C = 6 N D, so N = sqrt(C / 120).
void print_budget(double budget_flops, double gpu_hours, double gpu_tflops, double mfu) {
  const double n = std::sqrt(budget_flops / 120.0);
  const double d = 20.0 * n;
  std::printf("compute budget %.3e FLOPs%s:\n", budget_flops,
              gpu_hours > 0 ? fmt::format(" ({} GPU-hours at {} TFLOP/s x MFU {})", gpu_hours,
                                          gpu_tflops, mfu)
                                  .c_str()
                            : "");
  std::printf("  compute-optimal model: %.3e parameters, trained on %.3e tokens\n", n, d);
  std::string best;
  double best_gap = 1e300;
  for (const std::string& name : models::ModelConfig::preset_names()) {
    const double p = static_cast<double>(models::ModelConfig::preset(name).num_parameters());
    const double gap = std::fabs(std::log(p / n));
    if (gap < best_gap) {
      best_gap = gap;
      best = name;
    }
  }
  const double p = static_cast<double>(models::ModelConfig::preset(best).num_parameters());
  std::printf("  nearest preset: %s (%.3e parameters; optimal tokens for it %.3e)\n", best.c_str(),
              p, 20.0 * p);
}

int cmd_plan(Args a) {
  std::string config, model;
  std::vector<std::string> sets;
  int batch = 0, seq = 0, dp = 1, tp = 0, pp = 0, micro = 0, chunks = 0;
  std::string precision, schedule;
  double budget_flops = 0, gpu_hours = 0, gpu_tflops = 989, mfu = 0.4;
  const bool go = Flags("plan", kPlanUsage)
                      .text("--config", &config)
                      .text("--model", &model)
                      .texts("--set", &sets)
                      .number("--batch", 1, 1 << 20, &batch)
                      .number("--seq", 1, 1 << 20, &seq)
                      .text("--precision", &precision)
                      .number("--dp", 1, 1 << 20, &dp)
                      .number("--tp", 1, 1 << 16, &tp)
                      .number("--pp", 1, 1 << 16, &pp)
                      .number("--micro", 1, 1 << 20, &micro)
                      .text("--schedule", &schedule)
                      .number("--virtual", 1, 1 << 10, &chunks)
                      .number("--budget-flops", 1, 1e40, &budget_flops)
                      .number("--budget-gpu-hours", 1e-6, 1e12, &gpu_hours)
                      .number("--gpu-tflops", 1e-3, 1e6, &gpu_tflops)
                      .number("--mfu", 1e-3, 1, &mfu)
                      .parse(a);
  if (!go) return 0;
  if (!model.empty()) sets.push_back("model.preset=" + model);
  if (!precision.empty()) sets.push_back("train.precision=" + precision);
  if (seq > 0) sets.push_back("train.seq_len=" + std::to_string(seq));
  if (batch > 0) sets.push_back("train.batch_size=" + std::to_string(batch));
  if (tp > 0) sets.push_back("train.tp=" + std::to_string(tp));
  if (pp > 0) sets.push_back("train.pp=" + std::to_string(pp));
  if (micro > 0) sets.push_back("train.grad_accum=" + std::to_string(micro));
  if (!schedule.empty()) sets.push_back("pp.schedule=" + schedule);
  if (chunks > 0) sets.push_back("pp.virtual_stages=" + std::to_string(chunks));
  // A sequence longer than the preset's default window is a plan question, not an error.
  launch::TrainConfig cfg = launch::load_config(config, sets);
  // (Llama 3 trains at 8192 positions; the long-context presets' 131072 is for inference.)
  if (seq == 0 && !model.empty())
    cfg.seq_len = std::min(models::ModelConfig::preset(cfg.model_preset).block_size(), 8192);
  const models::ModelConfig m = launch::model_config(cfg);
  const PrecisionPolicy policy = PrecisionPolicy::parse(cfg.precision);
  const models::MemoryEstimate mem = models::estimate_memory(
      m, policy, cfg.batch_size, cfg.seq_len, cfg.tp, 1, false, cfg.tp_sequence_parallel);
  print_memory(cfg, m, policy, dp, mem);
  if (dp > 1) print_zero(cfg, m, policy, dp, mem);
  if (cfg.pp > 1) launch::print_pipeline_plan(cfg, m, policy, dp);
  if (gpu_hours > 0) budget_flops = gpu_hours * 3600.0 * gpu_tflops * 1e12 * mfu;
  if (budget_flops > 0) print_budget(budget_flops, gpu_hours, gpu_tflops, mfu);
  return 0;
}

int cmd_export(Args a) {
  std::string out, run = "runs/latest", checkpoint;
  bool force = false;
  const bool go = Flags("export", kExportUsage)
                      .text("--hf", &out)
                      .text("--run", &run)
                      .text("--checkpoint", &checkpoint)
                      .on("--force", &force)
                      .parse(a);
  if (!go) return 0;
  MT_CHECK(!out.empty(), "export: --hf OUT is required (see meshtrain export --help)");
  std::string config = (fs::path(run) / "config.toml").string();
  if (checkpoint == "latest") {
    MT_CHECK(fs::exists(config), "export: '{}' has no config.toml", run);
    checkpoint =
        parallel::latest_checkpoint(launch::checkpoint_root(launch::load_config(config, {})));
    MT_CHECK(!checkpoint.empty(), "export: no complete checkpoint for the run '{}'", run);
  }
  if (!checkpoint.empty()) config = (fs::path(checkpoint) / "config.toml").string();
  MT_CHECK(fs::exists(config), "export: '{}' does not exist", config);
  const launch::TrainConfig cfg = launch::load_config(config, {});
  const models::Decoder model(launch::model_config(cfg), PrecisionPolicy::parse("fp32"));
  Tensor weights;
  if (checkpoint.empty()) {
    const std::string path = (fs::path(run) / "model.safetensors").string();
    MT_CHECK(fs::exists(path),
             "export: '{}' has no model.safetensors (a finished run; or "
             "export a checkpoint with --checkpoint)",
             run);
    weights = launch::load_weights(model, path);
  } else {
    weights = launch::load_checkpoint_weights(model, checkpoint);
  }
  // Everything is read and checked: now the output directory.
  const std::vector<std::string> outputs =
      model.config().is_gpt() ? std::vector<std::string>{"model.safetensors", "config.json"}
                              : std::vector<std::string>{"model.safetensors", "config.json",
                                                         "tokenizer.json", "tokenizer_config.json"};
  for (const std::string& line : launch::prepare_output_dir(out, force, "export", outputs))
    std::printf("%s\n", line.c_str());
  if (!model.config().is_gpt()) {
    launch::export_hf_llama(model.config().llama, weights, out);
    const int copied = launch::copy_tokenizer_files(run, out);
    std::printf("wrote %s/model.safetensors and %s/config.json%s (%s)\n", out.c_str(), out.c_str(),
                copied > 0 ? " and the run's tokenizer" : "", model.config().str().c_str());
    return 0;
  }
  launch::export_hf(*model.gpt(), weights, out);
  std::printf("wrote %s/model.safetensors and %s/config.json (%s)\n", out.c_str(), out.c_str(),
              model.config().str().c_str());
  return 0;
}

int cmd_import(Args a) {
  std::string hf, out;
  bool force = false;
  if (!Flags("import", kImportUsage)
           .text("--hf", &hf)
           .text("--out", &out)
           .on("--force", &force)
           .parse(a))
    return 0;
  MT_CHECK(!hf.empty() && !out.empty(), "import: --hf DIR and --out RUN_DIR are required");
  if (launch::is_hf_llama_dir(hf)) return launch::import_hf_llama_run(hf, out, force);
  const launch::ImportedModel m = launch::import_hf(hf);
  const std::string weights = fs::absolute(fs::path(out) / "model.safetensors").string();
  const bool gpt2 = m.config.vocab_size == 50257;
  std::vector<std::string> sets = {
      std::string("model.preset=") + (gpt2 ? "gpt2" : "gpt-small"),
      std::string("model.vocab=") + (gpt2 ? "gpt2" : "bytes"),
      "model.n_layer=" + std::to_string(m.config.n_layer),
      "model.n_head=" + std::to_string(m.config.n_head),
      "model.n_embd=" + std::to_string(m.config.n_embd),
      "model.block_size=" + std::to_string(m.config.block_size),
      "model.init=" + weights,
      "train.seq_len=" +
          std::to_string(std::min(m.config.block_size, launch::TrainConfig{}.seq_len)),
      "run.dir=" + out};
  const launch::TrainConfig cfg = launch::load_config("", sets);
  launch::model_config(cfg);  // checks the combination
  // Everything is read and checked: now the output directory, then durable writes.
  for (const std::string& line :
       launch::prepare_output_dir(out, force, "import", {"model.safetensors", "config.toml"}))
    std::printf("%s\n", line.c_str());
  save_safetensors(weights, m.weights,
                   {{"format", "meshtrain"}, {"source", fs::absolute(hf).string()}});
  write_file_atomic((fs::path(out) / "config.toml").string(),
                    "# imported from " + fs::absolute(hf).string() + " (meshtrain import --hf)\n" +
                        launch::to_toml(cfg));
  std::printf("imported %s: %s\nwrote %s and %s/config.toml\n", hf.c_str(), m.config.str().c_str(),
              weights.c_str(), out.c_str());
  return 0;
}

constexpr const char* kEnvUsage = R"(usage: meshtrain env

Lists every MESHTRAIN_* environment setting (type, default, meaning) and this process's values.
)";

int cmd_env(Args a) {
  if (!Flags("env", kEnvUsage).parse(a)) return 0;
  const Settings& s = settings();
  std::printf("%-28s %-34s %-8s %s\n", "variable", "type", "default", "meaning");
  for (const auto& e : setting_table())
    std::printf("%-28s %-34s %-8s %s\n", e.name, e.type, e.default_value, e.help);
  const std::string threads =
      s.threads > 0 ? fmt::format("{} (MESHTRAIN_THREADS)", s.threads)
                    : fmt::format(
                          "automatic ({} for a process alone; under mpirun the cores are "
                          "divided among the ranks of each node, train.threads overrides)",
                          default_cpu_threads(1));
  std::printf("\nthis process: threads %s, log level %s, comm timeout %g s, comm debug %d\n",
              threads.c_str(), s.log_level.c_str(), s.comm_timeout_s, s.comm_debug ? 1 : 0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Settings& s = settings();
    log::set_level(s.log_level);
    for (const auto& u : s.unknown)
      log::warn("unknown environment variable {} (see meshtrain env for the known ones)", u);
    Args a{std::vector<std::string>(argv + 1, argv + argc)};
    if (!a.more() || a.v[0] == "--help" || a.v[0] == "-h" || a.v[0] == "help") {
      std::printf("%s", kUsage);
      return a.more() ? 0 : 2;
    }
    const std::string cmd = a.v[a.i++];
    if (cmd == "train") return cmd_train(a);
    if (cmd == "generate") return cmd_generate(a);
    if (cmd == "plan") return cmd_plan(a);
    if (cmd == "tokenize") return cmd_tokenize(a);
    if (cmd == "env") return cmd_env(a);
    if (cmd == "export") return cmd_export(a);
    if (cmd == "import") return cmd_import(a);
    if (cmd == "--version") {
      std::printf("meshtrain %s\n", MESHTRAIN_VERSION);
      return 0;
    }
    std::fprintf(stderr, "meshtrain: unknown command '%s'\n%s", cmd.c_str(), kUsage);
    return 2;
  } catch (const meshtrain::Error& e) {
    std::fprintf(stderr, "meshtrain: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "meshtrain: unexpected error: %s\n", e.what());
    return 1;
  }
}
