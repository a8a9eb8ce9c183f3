// What a job checks before it allocates or writes anything: that its data fits the model's
// vocabulary, and that its memory plan fits the machine.
//
// The memory check a job makes before it allocates its model: what `meshtrain plan` says a rank
// needs (models::estimate_memory: parameters, gradients, master weights, AdamW state, ZeRO-1
// buffers, activations) against what the machine gives the rank (the host's MemAvailable and the
// cgroup's limit, shared by the node's ranks; the GPU's free memory). A job that cannot fit is
// refused with the numbers and the layouts that would fit, before anything is allocated or
// written, instead of dying in std::bad_alloc (or the kernel's OOM killer) halfway through.
#pragma once

#include <cstdint>
#include <string>

#include "launch/config.hpp"
#include "models/decoder.hpp"
#include "runtime/data.hpp"
#include "runtime/precision.hpp"

namespace meshtrain::launch {

// Every token of `data` must be below model.vocab_size. Throws InvalidArgument naming the file,
// the token's index and byte offset and the file's largest id (data::TokenFile::check_vocab),
// with advice that fits: a byte-vocabulary model given GPT-2 token shards needs model.vocab =
// "gpt2"; where the vocabulary in use (`vocab`, model.vocab) is already the one such shards
// need, the data was made with another tokenizer.
void check_data_vocab(const data::Dataset& data, const models::ModelConfig& model,
                      const std::string& vocab);

// What the host offers, in bytes; -1 where unknown or unlimited.
struct HostMemory {
  std::int64_t mem_available = -1;  // /proc/meminfo MemAvailable
  // The tightest memory cgroup around this process (cgroup v2 memory.max and memory.current,
  // or v1 memory.limit_in_bytes and memory.usage_in_bytes, this cgroup and its ancestors):
  // its limit minus its usage.
  std::int64_t cgroup_room = -1;
  std::string cgroup;  // the cgroup file that set cgroup_room ("" when none)
  // What this process may still allocate: the smaller of the two; -1 when neither is known.
  std::int64_t available() const;
};

// Reads /proc/meminfo, /proc/self/cgroup and the cgroup files under `root` ("" = the real
// ones; tests pass a directory holding proc/ and sys/fs/cgroup/). Never throws: what cannot be
// read is unknown.
HostMemory read_host_memory(const std::string& root = "");

// What one rank may use and where the figure comes from, e.g. "MemAvailable 22.4 GiB shared by
// 4 ranks on this node".
struct MemoryBudget {
  std::int64_t bytes = -1;  // -1: unknown (nothing is checked)
  std::string source;
};
// The budget of one of `local_ranks` ranks of a node: the host's available memory divided
// evenly, or on a GPU (gpu_free >= 0) the GPU's free memory, which the rank has alone.
MemoryBudget rank_budget(const HostMemory& host, int local_ranks, std::int64_t gpu_free = -1);

// "" when the plan of `cfg` (DP = world_ranks / cfg.tp) fits the budget; otherwise the refusal:
// the plan's figures, the budget, and the layouts that would fit (ZeRO-1, a smaller micro-batch
// with gradient accumulation, more TP ranks, ZeRO-1 over more ranks). Pure: tested on its own.
std::string memory_refusal(const TrainConfig& cfg, const models::ModelConfig& model,
                           const PrecisionPolicy& policy, int world_ranks,
                           const MemoryBudget& budget);

// Throws InvalidArgument with memory_refusal's text when the plan does not fit this rank.
// MESHTRAIN_MEMORY_CHECK=0 skips the check (memory the kernel would overcommit, swap).
void check_memory(const TrainConfig& cfg, const models::ModelConfig& model,
                  const PrecisionPolicy& policy, int world_ranks, int local_ranks,
                  std::int64_t gpu_free);

// "1.50 GiB"
std::string human_bytes(double bytes);

}  // namespace meshtrain::launch
