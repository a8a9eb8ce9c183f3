// optimizer_runner: a few DistributedAdamW steps (one process) on fixed weights and gradients,
// written out for tests/parallel/test_optimizer_torch.py to redo with torch.optim.AdamW.
//
//   optimizer_runner --params fp32|bf16 --out FILE
//     Six tensors (2-D weights with weight decay, 1-D ones without), five steps with their own
//     gradients and learning rates, clipping to 1.0 (the gradients' norms are about 2). Writes
//     "init.<name>", "grad.<step>.<name>" and "final.<name>" (the master weights), "param.<name>"
//     (the parameters after the last step, as fp32), per step "lr" and "norm", and the
//     hyper-parameters as metadata.
#include <cstdio>
#include <string>
#include <vector>

#include "parallel/optimizer.hpp"
#include "runtime/rng.hpp"
#include "runtime/safetensors.hpp"

namespace meshtrain {
namespace {

struct Spec {
  const char* name;
  std::vector<std::int64_t> shape;
};
const Spec kSpecs[] = {{"wte", {40, 8}},   {"qkv.w", {24, 8}}, {"qkv.b", {24}},
                       {"proj.w", {8, 8}}, {"proj.b", {8}},    {"ln.w", {8}}};
constexpr int kSteps = 5;

int run(const std::string& params_dtype, const std::string& out_path) {
  std::vector<parallel::ParamSlot> slots;
  std::int64_t n = 0;
  for (const Spec& s : kSpecs) {
    parallel::ParamSlot p;
    p.name = s.name;
    p.shape = p.full_shape = Shape(s.shape);
    p.decay = s.shape.size() == 2;
    p.offset = n;
    n += p.numel();
    slots.push_back(p);
  }
  std::vector<std::pair<std::string, Tensor>> out;
  Tensor weights = Tensor::empty(Shape{n}, DType::kF32);
  fill_normal(weights, Philox(3, 0), 0.0f, 0.5f);
  for (const parallel::ParamSlot& s : slots)
    out.emplace_back("init." + s.name, parallel::slot_view(weights, s).clone());
  Tensor params = Tensor::zeros(Shape{n}, params_dtype == "bf16" ? DType::kBF16 : DType::kF32);
  Tensor grads = Tensor::zeros(Shape{n}, DType::kF32);
  parallel::AdamWOptions o;
  o.beta1 = 0.9;
  o.beta2 = 0.95;
  o.eps = 1e-8;
  o.weight_decay = 0.1;
  o.grad_clip = 1.0;
  parallel::Mesh single;
  parallel::DistributedAdamW opt(slots, params, grads, weights, o, single);
  std::vector<float> lrs, norms;
  for (int step = 1; step <= kSteps; ++step) {
    fill_normal(grads, Philox(11, static_cast<std::uint64_t>(step)), 0.0f, 0.1f);
    for (const parallel::ParamSlot& s : slots)
      out.emplace_back(fmt::format("grad.{}.{}", step, s.name),
                       parallel::slot_view(grads, s).clone());
    const double lr = 1e-2 / step;
    const double norm = opt.grad_norm(1.0f).norm;
    opt.step(lr, step, norm, 1.0f);
    lrs.push_back(static_cast<float>(lr));
    norms.push_back(static_cast<float>(norm));
  }
  for (const parallel::ParamSlot& s : slots) {
    out.emplace_back("final." + s.name, parallel::slot_view(opt.master(), s));
    out.emplace_back("param." + s.name, parallel::slot_view(params, s).to(DType::kF32));
  }
  out.emplace_back("lr", Tensor::from_floats(lrs, Shape{kSteps}, DType::kF32));
  out.emplace_back("norm", Tensor::from_floats(norms, Shape{kSteps}, DType::kF32));
  save_safetensors(out_path, out,
                   {{"steps", std::to_string(kSteps)},
                    {"beta1", fmt::format("{}", o.beta1)},
                    {"beta2", fmt::format("{}", o.beta2)},
                    {"eps", fmt::format("{}", o.eps)},
                    {"weight_decay", fmt::format("{}", o.weight_decay)},
                    {"grad_clip", fmt::format("{}", o.grad_clip)},
                    {"params", params_dtype}});
  return 0;
}

}  // namespace
}  // namespace meshtrain

int main(int argc, char** argv) {
  std::string params = "fp32", out;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--params") params = argv[i + 1];
    if (flag == "--out") out = argv[i + 1];
  }
  if (out.empty() || (params != "fp32" && params != "bf16")) {
    std::fprintf(stderr, "usage: optimizer_runner --params fp32|bf16 --out FILE\n");
    return 2;
  }
  try {
    return meshtrain::run(params, out);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "optimizer_runner: %s\n", e.what());
    return 1;
  }
}
