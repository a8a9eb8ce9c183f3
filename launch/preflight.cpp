#include "launch/preflight.hpp"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <vector>

#include "parallel/pipeline.hpp"
#include "runtime/error.hpp"
#include "runtime/settings.hpp"

namespace meshtrain::launch {
namespace {

namespace fs = std::filesystem;

// The first line of a small pseudo-file ("" when it cannot be read).
std::string first_line(const std::string& path) {
  std::ifstream f(path);
  std::string line;
  if (f) std::getline(f, line);
  return line;
}

// A cgroup file holding a byte count ("max", or v1's near-2^63 "no limit", is -1).
std::int64_t cgroup_bytes(const std::string& path) {
  const std::string s = first_line(path);
  if (s.empty() || s == "max") return -1;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(s.c_str(), &end, 10);
  if (end == s.c_str()) return -1;
  // cgroup v1 reports "unlimited" as the largest page-aligned int64.
  if (v >= (1ULL << 62)) return -1;
  return static_cast<std::int64_t>(v);
}

// The tightest limit - usage over a cgroup directory and its ancestors up to `top`.
void tightest(const fs::path& top, fs::path dir, const char* limit_file, const char* usage_file,
              HostMemory& out) {
  for (;;) {
    const std::int64_t limit = cgroup_bytes((dir / limit_file).string());
    if (limit >= 0) {
      const std::int64_t usage =
          std::max<std::int64_t>(0, cgroup_bytes((dir / usage_file).string()));
      const std::int64_t room = std::max<std::int64_t>(0, limit - usage);
      if (out.cgroup_room < 0 || room < out.cgroup_room) {
        out.cgroup_room = room;
        out.cgroup = (dir / limit_file).string();
      }
    }
    if (dir == top || !dir.has_parent_path() || dir.parent_path() == dir) return;
    dir = dir.parent_path();
    if (dir.string().size() < top.string().size()) return;
  }
}

// The plan of one rank. Under pipeline parallelism the largest stage's: its
// parameters and optimizer state, and the activations of the micro-batches its schedule keeps
// in flight.
models::MemoryEstimate estimate(const TrainConfig& c, const models::ModelConfig& m,
                                const PrecisionPolicy& p, int dp) {
  const bool zero = c.zero == 1 && dp > 1;
  if (c.pp <= 1)
    return models::estimate_memory(m, p, c.batch_size, c.seq_len, c.tp, dp, zero,
                                   c.tp_sequence_parallel);
  const parallel::PipeSchedule schedule = parallel::parse_pipe_schedule(c.pp_schedule);
  models::MemoryEstimate peak;
  for (int s = 0; s < c.pp; ++s) {
    const int live = parallel::max_in_flight(
        parallel::build_schedule(schedule, c.pp, s, c.grad_accum, c.pp_virtual_stages));
    const models::MemoryEstimate e = models::estimate_stage_memory(
        m, p, c.batch_size, c.seq_len, c.tp, dp, zero,
        parallel::stage_range(m.n_layer(), c.pp, s, c.pp_virtual_stages), live,
        c.tp_sequence_parallel);
    if (e.total() > peak.total()) peak = e;
  }
  return peak;
}

// The model's attention heads (what TP must divide).
int head_count(const models::ModelConfig& m) {
  return m.is_gpt() ? m.gpt.n_head : m.llama.n_head;
}

// The model with its vocabulary padded for `tp` ranks; nullopt where TP cannot split it.
std::optional<models::ModelConfig> with_tp(models::ModelConfig m, int tp) {
  if (m.is_gpt()) {
    m.gpt.padded_vocab = models::GPTConfig::pad_vocab(m.gpt.vocab_size, 128 * tp);
  } else {
    m.llama.padded_vocab = models::GPTConfig::pad_vocab(m.llama.vocab_size, 128 * tp);
  }
  try {
    m.validate_tp(tp);
  } catch (const InvalidArgument&) {
    return std::nullopt;
  }
  return m;
}

}  // namespace

void check_data_vocab(const data::Dataset& data, const models::ModelConfig& model,
                      const std::string& vocab) {
  try {
    data.check_vocab(model.vocab_size());
  } catch (const InvalidArgument& e) {
    const std::int32_t top = data.max_token();
    constexpr std::int32_t kGpt2Vocab = 50257;
    std::string advice;
    if (model.vocab_size() < kGpt2Vocab && top < kGpt2Vocab)
      advice = fmt::format(
          "; GPT-2 token shards need model.vocab = \"gpt2\" (this run has model.vocab = \"{}\": "
          "{} ids)",
          vocab, model.vocab_size());
    else
      advice = fmt::format(
          "; model.vocab = \"{}\" ({} ids) is the vocabulary this run already uses: the data was "
          "made with another tokenizer or vocabulary (its largest id is {}); tokenize it with the "
          "model's",
          vocab, model.vocab_size(), top);
    MT_FAIL("{}{}", e.what(), advice);
  }
}

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int u = 0;
  while (b >= 1024 && u < 5) {
    b /= 1024;
    ++u;
  }
  return fmt::format("{:.2f} {}", b, units[u]);
}

std::int64_t HostMemory::available() const {
  if (mem_available < 0) return cgroup_room;
  if (cgroup_room < 0) return mem_available;
  return std::min(mem_available, cgroup_room);
}

HostMemory read_host_memory(const std::string& root) {
  HostMemory out;
  const fs::path r = root.empty() ? fs::path("/") : fs::path(root);
  {
    std::ifstream f(r / "proc/meminfo");
    std::string key;
    long long kib = 0;
    std::string unit;
    while (f >> key >> kib) {
      std::getline(f, unit);
      if (key == "MemAvailable:") {
        out.mem_available = static_cast<std::int64_t>(kib) * 1024;
        break;
      }
    }
  }
  // /proc/self/cgroup: "0::/path" (v2) or "N:memory:/path" (v1, possibly "N:cpu,memory:...").
  std::ifstream f(r / "proc/self/cgroup");
  std::string line;
  const fs::path sys = r / "sys/fs/cgroup";
  while (std::getline(f, line)) {
    const auto a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1);
    const std::string rel = line.substr(b + 1);
    const fs::path sub = fs::path(rel).relative_path();
    if (controllers.empty()) {
      tightest(sys, sys / sub, "memory.max", "memory.current", out);
    } else {
      std::stringstream cs(controllers);
      std::string c;
      bool memory = false;
      while (std::getline(cs, c, ',')) memory = memory || c == "memory";
      if (!memory) continue;
      const fs::path top = sys / "memory";
      tightest(top, top / sub, "memory.limit_in_bytes", "memory.usage_in_bytes", out);
    }
  }
  return out;
}

MemoryBudget rank_budget(const HostMemory& host, int local_ranks, std::int64_t gpu_free) {
  MemoryBudget b;
  if (gpu_free >= 0) {
    b.bytes = gpu_free;
    b.source = fmt::format("the GPU's free memory, {}", human_bytes(static_cast<double>(gpu_free)));
    return b;
  }
  const std::int64_t avail = host.available();
  if (avail < 0) return b;
  const int n = std::max(1, local_ranks);
  b.bytes = avail / n;
  const bool by_cgroup = host.cgroup_room >= 0 && host.cgroup_room == avail;
  std::string what = by_cgroup ? fmt::format("the cgroup's room ({} below its limit, {})",
                                             human_bytes(static_cast<double>(avail)), host.cgroup)
                               : fmt::format("MemAvailable {} (/proc/meminfo)",
                                             human_bytes(static_cast<double>(avail)));
  b.source = n > 1 ? fmt::format("{} shared by the {} ranks on this node: {} each", what, n,
                                 human_bytes(static_cast<double>(b.bytes)))
                   : what;
  return b;
}

std::string memory_refusal(const TrainConfig& cfg, const models::ModelConfig& model,
                           const PrecisionPolicy& policy, int world_ranks,
                           const MemoryBudget& budget) {
  if (budget.bytes < 0) return {};
  const int dp = std::max(1, world_ranks / std::max(1, cfg.tp * cfg.pp));
  const models::MemoryEstimate mem = estimate(cfg, model, policy, dp);
  if (mem.total() <= budget.bytes) return {};
  auto hb = [](std::int64_t b) { return human_bytes(static_cast<double>(b)); };
  std::string out = fmt::format(
      "not enough memory: the plan needs {} per rank ({}: parameters {}, gradients {}, master "
      "weights {}, AdamW state {}{}, activations {} for a micro-batch of {} x {}; DP {}{} x TP "
      "{}{}), but this rank has {} ({}). Nothing was allocated or written.",
      hb(mem.total()), model.str(), hb(mem.parameters), hb(mem.gradients), hb(mem.master_weights),
      hb(mem.optimizer_state),
      mem.gradient_shard > 0 ? ", ZeRO-1 gradient shard " + hb(mem.gradient_shard) : "",
      hb(mem.activations), cfg.batch_size, cfg.seq_len, dp,
      cfg.pp > 1 ? fmt::format(" x PP {} (its largest stage)", cfg.pp) : "", cfg.tp,
      cfg.zero == 1 && dp > 1 ? ", ZeRO-1" : "", hb(budget.bytes), budget.source);
  std::vector<std::string> fits;
  // Suggestions keep a tenth of the budget spare: advice that fits to the byte would fail on
  // the next allocation.
  const std::int64_t spare = budget.bytes - budget.bytes / 10;
  // ZeRO-1 over the ranks this job has.
  if (cfg.zero == 0 && dp > 1) {
    TrainConfig z = cfg;
    z.zero = 1;
    const auto e = estimate(z, model, policy, dp);
    if (e.total() <= spare)
      fits.push_back(fmt::format("train.zero = 1 (ZeRO-1 over the {} data-parallel ranks): {}", dp,
                                 hb(e.total())));
  }
  // A smaller micro-batch: the largest that divides the rows of a step (gradient accumulation
  // then keeps the global batch), else the largest that fits.
  const int rows = cfg.batch_size * cfg.grad_accum;
  int best_divisor = 0, best_any = 0;
  for (int b = cfg.batch_size - 1; b >= 1 && best_divisor == 0; --b) {
    TrainConfig s = cfg;
    s.batch_size = b;
    if (estimate(s, model, policy, dp).total() > spare) continue;
    if (best_any == 0) best_any = b;
    if (rows % b == 0) best_divisor = b;
  }
  if (best_divisor > 0 || best_any > 0) {
    const int b = best_divisor > 0 ? best_divisor : best_any;
    TrainConfig s = cfg;
    s.batch_size = b;
    const std::string total = hb(estimate(s, model, policy, dp).total());
    fits.push_back(best_divisor > 0
                       ? fmt::format("train.batch_size = {} with train.grad_accum = {} (the same "
                                     "global batch): {}",
                                     b, rows / b, total)
                       : fmt::format("train.batch_size = {}: {}", b, total));
  }
  // More tensor parallelism (a divisor of the head count), with ZeRO-1 where TP alone is not
  // enough: the model split over more ranks, each with this budget (more nodes or GPUs).
  for (int tp = cfg.tp + 1; tp <= head_count(model) && tp <= 256; ++tp) {
    const std::optional<models::ModelConfig> mt = with_tp(model, tp);
    if (!mt) continue;
    TrainConfig t = cfg;
    t.tp = tp;
    auto e = estimate(t, *mt, policy, dp);
    if (e.total() > spare && dp > 1) {
      t.zero = 1;
      e = estimate(t, *mt, policy, dp);
    }
    if (e.total() > spare) continue;
    fits.push_back(fmt::format("--tp {}{} on {} ranks (DP {} x TP {}), each with this memory: {}",
                               tp, t.zero == 1 && cfg.zero == 0 ? " with train.zero = 1" : "",
                               dp * tp * cfg.pp, dp, tp, hb(e.total())));
    break;
  }
  // ZeRO-1 over more data-parallel ranks.
  for (int d = std::max(2, dp * 2); d <= 4096; d *= 2) {
    TrainConfig z = cfg;
    z.zero = 1;
    const auto e = estimate(z, model, policy, d);
    if (e.total() > spare) continue;
    fits.push_back(fmt::format(
        "train.zero = 1 over {} data-parallel ranks ({} ranks at TP {}), each with this memory: {}",
        d, d * cfg.tp * cfg.pp, cfg.tp, hb(e.total())));
    break;
  }
  if (fits.empty()) {
    out +=
        " No layout within reach fits (ZeRO-1, a micro-batch of 1, TP up to the head count): "
        "a smaller model, or a machine with more memory.";
  } else {
    out += " What would fit: ";
    for (std::size_t i = 0; i < fits.size(); ++i) out += (i ? "; " : "") + fits[i];
    out += ".";
  }
  out += fmt::format(
      " (meshtrain plan --config FILE --dp {} prints the plan; MESHTRAIN_MEMORY_CHECK=0 skips this "
      "check)",
      dp);
  return out;
}

void check_memory(const TrainConfig& cfg, const models::ModelConfig& model,
                  const PrecisionPolicy& policy, int world_ranks, int local_ranks,
                  std::int64_t gpu_free) {
  if (!settings().memory_check) return;
  const std::string refusal = memory_refusal(
      cfg, model, policy, world_ranks, rank_budget(read_host_memory(), local_ranks, gpu_free));
  MT_CHECK(refusal.empty(), "{}", refusal);
}

}  // namespace meshtrain::launch
