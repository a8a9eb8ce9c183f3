// Model weights as files: model.safetensors as Trainer::run writes it (every parameter's full
// tensor in fp32, the Hugging Face GPT-2 names, the TP = 1 layout with wte padded to a multiple
// of 128 rows, whatever layout trained it) and the master weights of a checkpoint. Weights in
// memory are one fp32 flat buffer laid out as the model's params() (this rank's TP shard of
// every tensor); the optimizer starts from it and GPT::set_weights() makes it the parameters.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "models/decoder.hpp"
#include "parallel/tensor_parallel.hpp"

namespace meshtrain::launch {

// Reads a weights file into this rank's flat fp32 weights (on the model's device): every name
// and full shape must match the model's, except wte's padding rows (which depend on the layout:
// the real vocabulary's rows are read, the rest are zero). Under TP each rank keeps its shard.
// Throws InvalidArgument naming the file and the tensor.
Tensor load_weights(const models::Decoder& model, const std::string& path);

// The master weights (only) of a checkpoint saved under any layout, as this rank's flat fp32
// weights (on the host).
Tensor load_checkpoint_weights(const models::Decoder& model, const std::string& dir);

// Collective over `tp` (the model's TP group, on host-reachable communicators): every
// parameter's full tensor, gathered from the shards in `weights` (this rank's flat fp32
// weights), in the TP = 1 layout with wte padded to a multiple of 128 rows, named as params().
std::vector<std::pair<std::string, Tensor>> gather_weights(const models::Decoder& model,
                                                           const Tensor& weights,
                                                           const parallel::TPGroup& tp);
// Writes gathered weights to `path` as Trainer::run does (metadata: format, the run's config).
void save_weights(const std::string& path,
                  const std::vector<std::pair<std::string, Tensor>>& weights,
                  const std::string& config_toml);

}  // namespace meshtrain::launch
