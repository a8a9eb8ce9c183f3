// The training loop that the tensor- and sequence-parallel equivalence tests run for either
// decoder family (test_gpt_tp.cpp, test_llama_tp.cpp): the same rows of random bytes per step,
// split over the DP ranks and micro-batches, gradient accumulation with the DP reducer, the
// global norm and an AdamW step. Runs on every rank of a loopback world.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel/grad_reducer.hpp"
#include "parallel/mesh.hpp"
#include "parallel/optimizer.hpp"
#include "runtime/rng.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain::parallel::tptest {

constexpr int kSeq = 16;

// Row g of step `step`: kSeq + 1 random bytes from (seed, step), the same on every layout.
inline std::vector<std::int32_t> row(std::uint64_t seed, int step, int g) {
  Philox rng(seed, static_cast<std::uint64_t>(step));
  std::vector<std::int32_t> t(kSeq + 1);
  for (int i = 0; i < kSeq + 1; ++i)
    t[i] = static_cast<std::int32_t>(rng.u32(static_cast<std::uint64_t>(g * (kSeq + 1) + i)) % 256);
  return t;
}

// `steps` optimizer steps of `b` rows per DP rank in `micro` micro-batches (rows of data seed
// `seed`); with a reducer, the gradients and the loss are averaged over DP. When `record`, each
// step's mean loss and global gradient norm (replicated parameters counted once: the
// optimizer's own sum over TP) are appended to losses and norms.
template <class Model>
void train_steps(Model& model, DistributedAdamW& opt, GradReducer* reducer, Mesh& mesh,
                 std::uint64_t seed, int steps, int b, int micro, bool record,
                 std::vector<float>& losses, std::vector<float>& norms) {
  const int mb = b / micro;
  std::vector<std::int32_t> in(static_cast<std::size_t>(mb) * kSeq), tg(in.size());
  for (int s = 0; s < steps; ++s) {
    model.zero_grads();
    float loss_sum = 0;
    for (int m = 0; m < micro; ++m) {
      for (int i = 0; i < mb; ++i) {
        const std::vector<std::int32_t> t = row(seed, s, mesh.dp_rank() * b + m * mb + i);
        std::copy(t.begin(), t.end() - 1, in.begin() + i * kSeq);
        std::copy(t.begin() + 1, t.end(), tg.begin() + i * kSeq);
      }
      if (reducer) reducer->begin_step(m + 1 == micro);
      loss_sum += model.forward(Tensor::from_ints(in, Shape{mb, kSeq}),
                                Tensor::from_ints(tg, Shape{mb, kSeq}));
      model.backward(1.0f / static_cast<float>(micro));
    }
    Tensor loss =
        Tensor::from_floats({loss_sum / static_cast<float>(micro)}, Shape{1}, DType::kF32);
    if (reducer) {
      reducer->finish();
      mesh.dp().allreduce(loss, comm::ReduceOp::kAvg).wait();
    }
    const double norm = opt.grad_norm(1.0f).norm;
    if (record) {
      losses.push_back(loss.data_as<float>()[0]);
      norms.push_back(static_cast<float>(norm));
    }
    opt.step(1e-3, s + 1, norm, 1.0f);
  }
}

}  // namespace meshtrain::parallel::tptest
