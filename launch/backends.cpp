#include "launch/backends.hpp"

#include <algorithm>
#include <cstring>

#include "runtime/config.hpp"
#if MESHTRAIN_HAS_CUDA
#include "runtime/cuda/cuda_device.hpp"
#endif
#if MESHTRAIN_HAS_NCCL
#include "comm/nccl/nccl.hpp"
#endif
#include "runtime/error.hpp"

namespace meshtrain::launch {

std::unique_ptr<Device> open_device(const TrainConfig& cfg, int local_rank) {
  MT_CHECK(cfg.comm_backend != "nccl" || cfg.device == "cuda",
           "comm.backend = \"nccl\" needs train.device = \"cuda\" (NCCL moves GPU memory); on the "
           "CPU device the ranks communicate through MPI (comm.backend = \"auto\" or \"mpi\")");
  if (cfg.device != "cuda") return nullptr;
#if MESHTRAIN_HAS_CUDA
  return cuda::open_local_device(local_rank);
#else
  (void)local_rank;
  MT_FAIL(
      "train.device = \"cuda\": this meshtrain was built without CUDA (build the cuda "
      "preset: scripts/setup.sh cuda)");
#endif
}

std::int64_t gpu_free_bytes(Device* gpu) {
  if (gpu == nullptr) return -1;
#if MESHTRAIN_HAS_CUDA
  return cuda::device_memory(*gpu).free_bytes;
#else
  MT_FAIL("gpu_free_bytes: {} is not a device this build has", gpu->name());
#endif
}

CommChoice choose_comm_backend(const std::string& want, const std::vector<std::string>& gpus,
                               int tp) {
  MT_CHECK(want == "auto" || want == "nccl" || want == "mpi",
           "comm.backend = \"{}\": expected auto, nccl or mpi", want);
  const int n = static_cast<int>(gpus.size());
  MT_CHECK(tp >= 1 && n >= 1 && n % tp == 0, "comm.backend: {} ranks do not split into TP = {}", n,
           tp);
  const int dp = n / tp;
  CommChoice c;
  // The first two world ranks of one group that drive the same GPU: "" when there are none.
  // Group g of the DP kind holds world ranks {d * tp + g}, of the TP kind {g * tp + t}.
  auto shared = [&](bool dp_kind) -> std::string {
    const int groups = dp_kind ? tp : dp, members = dp_kind ? dp : tp;
    for (int g = 0; g < groups; ++g)
      for (int i = 0; i < members; ++i)
        for (int j = i + 1; j < members; ++j) {
          const int a = dp_kind ? i * tp + g : g * tp + i, b = dp_kind ? j * tp + g : g * tp + j;
          if (gpus[static_cast<std::size_t>(a)] == gpus[static_cast<std::size_t>(b)])
            return fmt::format("world ranks {} and {} both drive {}", a, b,
                               gpus[static_cast<std::size_t>(a)]);
        }
    return "";
  };
  c.dp_shared = shared(true);
  c.tp_shared = shared(false);
  if (want == "nccl") {
    const std::string& why = !c.dp_shared.empty() ? c.dp_shared : c.tp_shared;
    MT_CHECK(why.empty(),
             "comm.backend = \"nccl\": {} ({} group); NCCL allows one rank per GPU in a "
             "communicator. Start one rank per GPU, or use comm.backend = \"auto\" (MPI where "
             "ranks share a GPU) or \"mpi\"",
             why, !c.dp_shared.empty() ? "a DP" : "a TP");
  }
  c.dp_nccl = want == "nccl" || (want == "auto" && dp > 1 && c.dp_shared.empty());
  c.tp_nccl = tp > 1 && (want == "nccl" || (want == "auto" && c.tp_shared.empty()));
  auto words = [](const char* kind, bool nccl, int size, const std::string& why) {
    if (size == 1 && !nccl) return std::string();
    return fmt::format("{} over {}{}", kind, nccl ? "NCCL" : "MPI",
                       !nccl && !why.empty() ? fmt::format(" ({})", why) : std::string());
  };
  const std::string a = words("DP", c.dp_nccl, dp, c.dp_shared),
                    b = words("TP", c.tp_nccl, tp, c.tp_shared);
  c.summary = a.empty() ? b : b.empty() ? a : a + ", " + b;
  return c;
}

// NCCL refuses two ranks of one communicator on the same GPU (and a job that oversubscribes
// GPUs is common on a workstation), so the ranks first exchange their GPUs' UUIDs over MPI:
// device indices cannot tell, since each rank may see its own CUDA_VISIBLE_DEVICES. The choice
// is made per group kind (every DP group, every TP group) from the whole job's list, so that
// every rank takes the same decision and opens the same communicators, or every rank throws the
// same error.
DeviceComms open_device_comms(const TrainConfig& cfg, comm::Communicator* world,
                              parallel::Mesh& mesh, Device* gpu) {
  DeviceComms out;
  const std::string& want = cfg.comm_backend;
  if (cfg.device != "cuda" || want == "mpi" || world == nullptr) {
    if (want == "nccl" && world == nullptr)
      out.summary = "comm.backend = nccl: one process without mpirun, nothing to communicate";
    return out;
  }
#if !MESHTRAIN_HAS_NCCL
  (void)mesh;
  (void)gpu;
  MT_CHECK(
      want != "nccl",
      "comm.backend = \"nccl\": this meshtrain was built without NCCL (build the cuda preset)");
  out.summary = "MPI (built without NCCL)";
#else
  MT_ASSERT(gpu != nullptr, "open_device_comms: train.device = \"cuda\" without a GPU");
  const int n = world->size(), tp = cfg.tp;
  // Every rank's UUID, 40 characters ("GPU-" and 36), as 10 int32 words per rank.
  constexpr int kWords = 10;
  const std::string uuid = cuda::device_uuid(*gpu);
  MT_ASSERT(uuid.size() == kWords * 4, "GPU UUID '{}' is not 40 characters", uuid);
  std::vector<std::int32_t> mine(kWords);
  std::memcpy(mine.data(), uuid.data(), uuid.size());
  Tensor all = Tensor::empty(Shape{static_cast<std::int64_t>(n) * kWords}, DType::kI32);
  world->all_gather(Tensor::wrap(mine.data(), Shape{kWords}, DType::kI32), all).wait();
  std::vector<std::string> uuids(static_cast<std::size_t>(n));
  for (int r = 0; r < n; ++r)
    uuids[static_cast<std::size_t>(r)].assign(
        reinterpret_cast<const char*>(all.data_as<std::int32_t>() + r * kWords), kWords * 4);
  const CommChoice choice = choose_comm_backend(want, uuids, tp);
  comm::NcclOptions o;
  o.compute_stream = cuda::compute_stream(*gpu);
  o.device = gpu->index();
  // Both on every rank, in the same order: each is collective over its MPI group.
  if (choice.dp_nccl) out.dp = comm::nccl_communicator(mesh.distributed() ? mesh.dp() : *world, o);
  if (choice.tp_nccl) out.tp = comm::nccl_communicator(mesh.tp(), o);
  out.summary = choice.summary;
  // Pipeline stages: NCCL send/recv between stages when no two ranks of the job share a GPU
  // (then no PP group does); else the mesh's MPI group, device tensors staged through the host.
  if (mesh.pp_size() > 1 && want != "mpi") {
    std::vector<std::string> sorted = uuids;
    std::sort(sorted.begin(), sorted.end());
    const bool distinct = std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end();
    MT_CHECK(distinct || want != "nccl",
             "comm.backend = \"nccl\": ranks share a GPU, and NCCL allows one rank per GPU in the "
             "pipeline group; start one rank per GPU or use comm.backend = \"auto\"");
    if (distinct) {
      out.pp = comm::nccl_communicator(mesh.pp(), o);
      out.summary += out.summary.empty() ? "PP over NCCL" : ", PP over NCCL";
    }
  }
#endif
  return out;
}

}  // namespace meshtrain::launch
