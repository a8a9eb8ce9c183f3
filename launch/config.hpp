// The training configuration: one TOML file (sections model, data, train, eval, sample, run)
// plus command-line overrides "--set section.key=value". Every key is in one table (name,
// type, default, range, help); an unknown key, a wrong type or an out-of-range value is an
// InvalidArgument that names the key and, for files, the line.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "models/decoder.hpp"

namespace meshtrain::launch {

struct TrainConfig {
  // [model]
  std::string model_preset = "gpt-small";   // see models::ModelConfig::preset_names()
  std::string model_arch = "auto";          // auto (the preset's family), gpt2, llama, qwen2
  int n_layer = 0, n_head = 0, n_embd = 0;  // 0 = the preset's value
  int block_size = 0;
  // Llama family only (0 / "auto" = the preset's value).
  int n_kv_head = 0, intermediate_size = 0;
  double rope_theta = 0, rms_norm_eps = 0;
  std::string tie_embeddings = "auto";  // auto, true, false
  // A Hugging Face config.json (LlamaForCausalLM / Qwen2ForCausalLM) that defines the model,
  // as `import --hf` writes it into the run directory; the other shape keys must then be 0.
  std::string hf_config;
  // "bytes" (256 symbols), "gpt2" (50257, padded to 50304), or "auto": gpt2 for the gpt2*
  // presets, bytes for the small ones.
  std::string vocab = "auto";

  // [data]
  std::vector<std::string> train_files;  // empty = the embedded default corpus (fortunes)
  std::vector<std::string> val_files;
  std::string data_format = "auto";
  // A Hugging Face tokenizer.json: text files are tokenized with it (launch/tokenize.hpp), the
  // model's vocabulary is its size (model.vocab = auto), and the run directory keeps a copy.
  std::string data_tokenizer;
  double val_fraction = 0.05;

  // [train]
  int steps = 300;
  int batch_size = 8;  // sequences per rank per micro-step
  int seq_len = 128;
  int grad_accum = 1;  // micro-steps per optimizer step
  std::string precision = "bf16";
  std::string device = "cpu";  // cpu, or cuda: one GPU per rank (builds with MESHTRAIN_CUDA)
  std::uint64_t seed = 1337;
  double lr = 1e-3;
  double min_lr_ratio = 0.1;  // final lr as a fraction of lr (cosine, wsd)
  int warmup_steps = 20;
  std::string schedule = "cosine";  // cosine, constant, wsd
  double decay_fraction = 0.2;      // wsd: the last fraction of steps decays linearly
  double weight_decay = 0.1;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double grad_clip = 1.0;  // 0 = no clipping
  int max_bad_steps = 5;   // stop after this many non-finite steps in a row
  int threads = 0;         // CPU threads per rank; 0 = MESHTRAIN_THREADS or automatic

  // [dp] data parallelism (mpirun -np N: DP = N)
  // Gradient bucket size in MiB (the first bucket is 1 MiB); 0: parallel::auto_bucket_bytes.
  double dp_bucket_mb = 0;
  std::string dp_overlap = "on";         // on: reduce buckets during backward; off: after it
  std::string dp_reduce_dtype = "fp32";  // fp32, or bf16: half the bytes, bf16-rounded gradients
  // Collectives on the model's tensors (DP gradients, TP activations): auto, nccl or mpi.
  // auto: NCCL for each group whose ranks all drive different GPUs (train.device = "cuda"),
  // else MPI (device tensors staged through host memory).
  std::string comm_backend = "auto";
  int zero = 0;  // 1: ZeRO-1, AdamW on a 1/DP shard of the flat buffers
  // Tensor parallelism: mpirun -np N runs DP = N / tp x TP = tp, consecutive ranks forming a TP
  // group (TP innermost). The model's heads and padded vocabulary must divide by tp.
  int tp = 1;
  // Pipeline parallelism: mpirun -np N runs DP = N / (tp x pp) x PP = pp x TP = tp, PP outermost;
  // each stage holds a contiguous block of layers (parallel/pipeline.hpp), and an optimizer
  // step's grad_accum micro-batches flow through the stages in pp_schedule's order.
  int pp = 1;
  std::string pp_schedule = "1f1b";  // "1f1b" (at most pp micro-batches alive), "gpipe" or
                                     // "interleaved" (pp_virtual_stages chunks per stage)
  int pp_virtual_stages = 1;  // model chunks per stage (interleaved: >= 2, n_layer % (V pp) == 0)
  // [tp] sequence_parallel: Megatron's sequence parallelism inside each TP group
  // (parallel/tensor_parallel.hpp): the LayerNorm and residual activations hold 1/tp of the
  // tokens. Needs tp > 1 and seq_len a multiple of tp; under PP the stage boundary is the shard.
  bool tp_sequence_parallel = false;

  // [eval]
  int eval_every = 100;  // 0 = never (a final evaluation still runs when there is val data)
  int eval_batches = 8;

  // [sample]
  int sample_every = 0;  // 0 = only at the end
  int sample_tokens = 200;
  double temperature = 0.8;
  int top_k = 40;
  std::string prompt = "";

  // [run]
  std::string run_dir = "runs/latest";
  // Per-rank Chrome trace-event files (RUN_DIR/traces/rank-NNNNN.json, Perfetto) of these
  // steps: "" (off), "5", "3-6" or "2,5-7" (1-based, as the progress line counts).
  std::string trace_steps;
  int log_every = 1;

  // [checkpoint] distributed checkpoints (parallel/checkpoint.hpp)
  int ckpt_every = 0;  // save every N steps and at the end; 0 = never
  int ckpt_keep = 3;   // newest checkpoints kept; 0 = all
  // On SIGTERM, SIGINT or SIGUSR1 (launch/preemption.hpp): "auto" saves a checkpoint of the
  // last step when ckpt_every > 0, "always" saves one anyway, "never" stops without one.
  std::string ckpt_on_signal = "auto";
  std::string ckpt_dir = "";  // "" = RUN_DIR/checkpoints
  int rollback_after = 0;     // non-finite steps in a row before reloading the last
                              // checkpoint (and skipping the data since); 0 = never
  int max_rollbacks = 3;      // give up after this many rollbacks in one run

  // [model] init: a model.safetensors in meshtrain's names and layout (what train and
  // `meshtrain import --hf` write) to start from instead of the random initialisation.
  std::string model_init = "";

  // Not a config key (set by `meshtrain train --resume`): a checkpoint directory, "latest"
  // (the newest under the checkpoint directory; an error if there is none) or "auto" (the
  // newest if there is one, else a fresh start). Empty: a fresh start.
  std::string resume;
};

// The steps trace.steps names (1-based). Throws InvalidArgument naming the key and the value.
std::vector<int> trace_steps(const TrainConfig& cfg);

// The model a config describes (preset plus overrides, vocabulary padded for train.tp); checks it
// against train.seq_len and train.tp.
models::ModelConfig model_config(const TrainConfig& cfg);

// The DP gradient bucket size in bytes for `grad_bytes` of fp32 gradients on a rank:
// dp.bucket_mb, or parallel::auto_bucket_bytes when it is 0 (automatic).
std::int64_t dp_bucket_bytes(const TrainConfig& cfg, std::int64_t grad_bytes);

// Where checkpoints go: checkpoint.dir, or RUN_DIR/checkpoints.
std::string checkpoint_root(const TrainConfig& cfg);

// Parses a TOML file (empty path = defaults only), then applies overrides "section.key=value"
// where value is a TOML value (strings may be left unquoted). Validates ranges and
// combinations. Throws InvalidArgument naming the file:line or the override and the key.
TrainConfig load_config(const std::string& path, const std::vector<std::string>& overrides);
// The effective configuration as TOML, with every key (printed at start and saved in the run
// directory; loading it back gives the same config).
std::string to_toml(const TrainConfig& cfg);

struct ConfigKeyInfo {
  std::string key;  // "train.lr"
  std::string type;
  std::string default_value;
  std::string help;
};
// Every key, for --help and the docs.
std::vector<ConfigKeyInfo> config_keys();

}  // namespace meshtrain::launch
