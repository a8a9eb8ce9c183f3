// Causal attention forward + backward on the CPU against the dense matmuls it contains.
//
// The reference is what attention costs with nothing but its GEMMs: per (batch, head), the
// seven T x T x D products of a dense (unmasked) attention -- forward Q K^T and P V; backward
// the recomputed Q K^T, dO V^T, P^T dO, dS K and dS^T Q -- run as the same cpu::gemm calls
// on the same layout (heads addressed inside [B, T, 3C] with leading dimension 3C), in bf16
// with fp32 output, parallel over (batch, head) like the op. The causal op needs only the
// (T + 1) / 2T of each product on or below the diagonal, so it is also compared with that
// "causal-half" share of the dense time.
//
// Usage: bench_attention [--reps N] [--threads N] (default: 30 reps, all cores).
// Each rep times the op and the reference back to back; medians are reported, after warm-up.
// On a machine shared with other work, run it with OMP_WAIT_POLICY=passive as well: with
// libgomp's default spinning, a thread that waits at a barrier holds a core that its
// descheduled sibling needs, and both timings swing by several times (the op, with two parallel
// regions to the reference's one, swings more).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "bench/bench_util.hpp"
#include "runtime/cpu/gemm.hpp"
#include "runtime/ops.hpp"
#include "runtime/rng.hpp"
#include "runtime/tensor.hpp"
#include "runtime/threads.hpp"

namespace {

using meshtrain::bench::median;
using meshtrain::bench::now_ms;

using meshtrain::bf16;
using meshtrain::DType;
using meshtrain::Shape;
using meshtrain::Tensor;

constexpr int kBatch = 8, kSeq = 256, kHeadSize = 64, kHeads = 6;
constexpr int kChannels = kHeads * kHeadSize;

void gemm_bf16(bool trans_a, bool trans_b, int m, int n, int k, const void* a, std::int64_t lda,
               const void* b, std::int64_t ldb, float* c, std::int64_t ldc, float alpha) {
  meshtrain::cpu::gemm_f32(trans_a, trans_b, m, n, k, a, lda, b, ldb, DType::kBF16, c, ldc, alpha,
                           0.0f);
}

// The seven dense T x T x D GEMMs of attention forward + backward, for every (batch, head).
// P and dS are bf16 T x T operands per thread (their values do not matter for the timing).
void dense_matmuls(const Tensor& qkv, const Tensor& dout) {
  const auto* x = static_cast<const bf16*>(qkv.data());
  const auto* g = static_cast<const bf16*>(dout.data());
  const std::int64_t ld = 3 * kChannels, t = kSeq, d = kHeadSize;
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHeadSize));
#pragma omp parallel
  {
    std::vector<float> scores(t * t), small(t * d);
    std::vector<bf16> p(t * t, meshtrain::float_to_bf16(1.0f / kSeq));
    std::vector<bf16> ds(t * t, meshtrain::float_to_bf16(1e-3f));
#pragma omp for schedule(dynamic, 1)
    for (int bh = 0; bh < kBatch * kHeads; ++bh) {
      const int b = bh / kHeads, h = bh % kHeads;
      const bf16* q = x + b * t * ld + h * d;
      const bf16* k = q + kChannels;
      const bf16* v = q + 2 * kChannels;
      const bf16* go = g + b * t * kChannels + h * d;
      gemm_bf16(false, true, t, t, d, q, ld, k, ld, scores.data(), t, scale);         // S = Q K^T
      gemm_bf16(false, false, t, d, t, p.data(), t, v, ld, small.data(), d, 1.0f);    // O = P V
      gemm_bf16(false, true, t, t, d, q, ld, k, ld, scores.data(), t, scale);         // S again
      gemm_bf16(false, true, t, t, d, go, kChannels, v, ld, scores.data(), t, 1.0f);  // dP
      gemm_bf16(true, false, t, d, t, p.data(), t, go, kChannels, small.data(), d, 1.0f);  // dV
      gemm_bf16(false, false, t, d, t, ds.data(), t, k, ld, small.data(), d, scale);       // dQ
      gemm_bf16(true, false, t, d, t, ds.data(), t, q, ld, small.data(), d, scale);        // dK
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 30, threads = omp_get_num_procs();
  if (!meshtrain::bench::parse_reps_threads(argc, argv, reps, threads)) return 2;
  meshtrain::set_cpu_threads(threads);

  Tensor qkv = Tensor::empty(Shape{kBatch, kSeq, 3 * kChannels}, DType::kBF16);
  Tensor dout = Tensor::empty(Shape{kBatch, kSeq, kChannels}, DType::kBF16);
  meshtrain::fill_normal(qkv, meshtrain::Philox(1, 0), 0.0f, 1.0f);
  meshtrain::fill_normal(dout, meshtrain::Philox(1, 1), 0.0f, 1.0f);
  Tensor out = Tensor::empty(Shape{kBatch, kSeq, kChannels}, DType::kBF16);
  Tensor lse = Tensor::empty(Shape{kBatch, kHeads, kSeq}, DType::kF32);
  Tensor dqkv = Tensor::empty(qkv.shape(), DType::kBF16);

  for (int i = 0; i < 5; ++i) {
    meshtrain::ops::attention_forward(out, lse, qkv, kHeads);
    meshtrain::ops::attention_backward(dqkv, dout, qkv, out, lse, kHeads);
    dense_matmuls(qkv, dout);
  }
  std::vector<double> fwd, bwd, total, dense;
  for (int i = 0; i < reps; ++i) {
    const double t0 = now_ms();
    meshtrain::ops::attention_forward(out, lse, qkv, kHeads);
    const double t1 = now_ms();
    meshtrain::ops::attention_backward(dqkv, dout, qkv, out, lse, kHeads);
    const double t2 = now_ms();
    dense_matmuls(qkv, dout);
    const double t3 = now_ms();
    fwd.push_back(t1 - t0);
    bwd.push_back(t2 - t1);
    total.push_back(t2 - t0);
    dense.push_back(t3 - t2);
  }

  const double dense_ms = median(dense);
  const double causal_ms = dense_ms * (kSeq + 1) / (2.0 * kSeq);
  const double flops = 7.0 * 2.0 * kSeq * kSeq * kHeadSize * kBatch * kHeads;
  const double attn_ms = median(total);
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  std::printf(
      "attention bf16 B=%d T=%d n_head=%d D=%d (C=%d), %d threads, OMP_WAIT_POLICY=%s, "
      "median of %d reps\n",
      kBatch, kSeq, kHeads, kHeadSize, kChannels, threads, policy != nullptr ? policy : "(unset)",
      reps);
  std::printf("  attention forward             %8.3f ms\n", median(fwd));
  std::printf("  attention backward            %8.3f ms\n", median(bwd));
  std::printf("  attention forward + backward  %8.3f ms\n", attn_ms);
  std::printf("  dense matmuls (7 x T*T*D)     %8.3f ms  (%.1f GFLOP/s)\n", dense_ms,
              flops / dense_ms * 1e-6);
  std::printf("  causal-half of dense          %8.3f ms  (x (T+1)/2T)\n", causal_ms);
  std::printf("  ratio to dense                %8.2f  (target <= 1.5)\n", attn_ms / dense_ms);
  std::printf("  ratio to causal-half          %8.2f\n", attn_ms / causal_ms);
  return 0;
}
