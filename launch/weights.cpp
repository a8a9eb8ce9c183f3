#include "launch/weights.hpp"

#include "parallel/checkpoint.hpp"
#include "runtime/error.hpp"
#include "runtime/safetensors.hpp"

namespace meshtrain::launch {

Tensor load_weights(const models::Decoder& model, const std::string& path) {
  const SafetensorsFile f = load_safetensors(path);
  const parallel::TPGroup& tp = model.tp();
  Tensor weights = Tensor::zeros(Shape{model.num_parameters()}, DType::kF32, model.device());
  for (const models::ParamInfo& p : model.params()) {
    Tensor t = f.at(p.name);
    MT_CHECK(is_floating(t.dtype()), "'{}': tensor '{}' is {}, expected a float dtype", path,
             p.name, dtype_name(t.dtype()));
    // The vocabulary padding depends on the layout (128 x TP rows): the real rows are what count.
    const bool wte = p.real_rows >= 0;  // the vocabulary rows of an embedding or LM head
    const bool same =
        t.shape() == p.full_shape ||
        (wte && t.ndim() == 2 && t.dim(0) >= p.real_rows && t.dim(1) == p.full_shape[1]);
    MT_CHECK(same,
             "'{}': tensor '{}' has shape {}, the model expects {} (another model's weights?)",
             path, p.name, t.shape().str(), p.full_shape.str());
    if (wte && t.shape() != p.full_shape) {
      Tensor full = Tensor::zeros(p.full_shape, t.dtype());
      full.slice(0, p.real_rows).copy_from(t.slice(0, p.real_rows));
      t = full;
    }
    Tensor mine = parallel::slot_view(weights, p);
    parallel::copy_slot_shard(mine, t, p, tp.rank(), tp.size());
  }
  // A pipeline stage reads its own tensors out of the whole model's file.
  MT_CHECK(!model.is_whole() || f.tensors.size() == model.params().size(),
           "'{}' holds {} tensors, the model has {} parameters", path, f.tensors.size(),
           model.params().size());
  return weights;
}

Tensor load_checkpoint_weights(const models::Decoder& model, const std::string& dir) {
  Tensor weights = Tensor::empty(Shape{model.num_parameters()}, DType::kF32);
  parallel::load_checkpoint(dir, model.params(), {{"master", weights, {}}}, model.tp().rank(),
                            model.tp().size(), !model.is_whole());
  return weights;
}

std::vector<std::pair<std::string, Tensor>> gather_weights(const models::Decoder& model,
                                                           const Tensor& weights,
                                                           const parallel::TPGroup& tp) {
  std::vector<std::pair<std::string, Tensor>> out;
  for (const models::ParamInfo& p : model.params()) {
    const Tensor mine = parallel::slot_view(weights, p);
    Tensor full = p.replicated() || tp.size() == 1 ? mine : parallel::gather_slot(mine, p, tp);
    if (p.real_rows >= 0) full = full.slice(0, models::GPTConfig::pad_vocab(p.real_rows));
    out.emplace_back(p.name, full);
  }
  return out;
}

void save_weights(const std::string& path,
                  const std::vector<std::pair<std::string, Tensor>>& weights,
                  const std::string& config_toml) {
  save_safetensors(path, weights, {{"format", "meshtrain"}, {"config", config_toml}});
}

}  // namespace meshtrain::launch
