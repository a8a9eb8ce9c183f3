// The backend registry: which device a rank trains on and which communicators carry its model
// tensors. The only file of the library that tests MESHTRAIN_HAS_* (runtime/config.hpp): a
// backend this build lacks is refused here, by name, with the preset that has it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "launch/config.hpp"
#include "parallel/mesh.hpp"
#include "runtime/device.hpp"

namespace meshtrain::launch {

// The GPU of this rank for train.device = "cuda" (null for "cpu"; the CPU device is
// cpu_device()): the one its rank on the node picks (local_rank, from
// comm::MpiSession::node_local(); cuda::open_local_device). Throws InvalidArgument when this
// build has no CUDA, or comm.backend = "nccl" names no GPU.
std::unique_ptr<Device> open_device(const TrainConfig& cfg, int local_rank);

// The free memory of this rank's GPU in bytes (cudaMemGetInfo), or -1 when `gpu` is null (the
// CPU device). What the memory check (launch/preflight.hpp) holds the plan against.
std::int64_t gpu_free_bytes(Device* gpu);

// comm.backend's decision for a job on GPUs, from every rank's GPU identity (its UUID, by
// world rank) and the layout (world rank = dp_rank * tp + tp_rank). NCCL refuses two ranks of
// one communicator on the same GPU, so a kind of group (every DP group, every TP group) goes
// over NCCL only when none of its groups has two ranks on one GPU; the decision covers the
// whole job so that every rank opens the same communicators. want = "auto": NCCL for a kind
// with more than one rank per group and no sharing, else MPI; "nccl": NCCL for both (DP even
// at DP = 1, so that one GPU runs the NCCL gradient path; TP when TP > 1), and InvalidArgument
// naming two ranks that share a GPU if any do; "mpi": neither.
struct CommChoice {
  bool dp_nccl = false, tp_nccl = false;
  std::string dp_shared, tp_shared;  // "world ranks 0 and 1 both drive GPU-..." or ""
  std::string summary;               // "DP over NCCL, TP over MPI (world ranks ...)"
};
CommChoice choose_comm_backend(const std::string& want, const std::vector<std::string>& gpus,
                               int tp);

// The communicators that carry the model's tensors where they are not the mesh's (MPI) groups:
// NCCL over this rank's DP and TP groups, on the GPU's compute stream, each not valid() where
// the group stays on the mesh's communicator. The mesh's groups still carry host scalars (loss,
// gradient norm) and checkpoints.
struct DeviceComms {
  comm::Communicator dp, tp;
  // Pipeline point-to-point (train.pp > 1) over NCCL, when every rank has its own GPU.
  comm::Communicator pp;
  std::string summary;  // "DP over NCCL, TP over MPI (...)" for the banner; "" when nothing to say
};
// Collective over `world` (null: one process): the ranks exchange their GPUs' identities and
// all open the same communicators (choose_comm_backend), or all throw the same error.
DeviceComms open_device_comms(const TrainConfig& cfg, comm::Communicator* world,
                              parallel::Mesh& mesh, Device* gpu);

}  // namespace meshtrain::launch
