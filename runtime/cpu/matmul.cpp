// ops::matmul on the CPU: one cpu::gemm call. ops.cpp has validated the arguments, and
// tensors are contiguous, so every leading dimension is the stored row length.
#include <algorithm>

#include "runtime/cpu/cpu_backend.hpp"
#include "runtime/cpu/gemm.hpp"

namespace meshtrain::cpu {

void CpuBackend::matmul(Tensor& out, const Tensor& a, const Tensor& b, std::int64_t m,
                        std::int64_t n, std::int64_t k, const ops::MatmulOptions& opt) {
  GemmArgs g;
  g.trans_a = opt.trans_a;
  g.trans_b = opt.trans_b;
  g.m = m;
  g.n = n;
  g.k = k;
  // a is [.., K] flattened to [M, K], or [K, M] when transposed; b is [K, N] or [N, K].
  // BLAS asks for a leading dimension of at least 1 even when a row is empty (K = 0).
  g.a = a.data();
  g.a_type = a.dtype();
  g.lda = std::max<std::int64_t>(1, opt.trans_a ? m : k);
  g.b = b.data();
  g.b_type = b.dtype();
  g.ldb = std::max<std::int64_t>(1, opt.trans_b ? k : n);
  g.c = out.data();
  g.c_type = out.dtype();
  g.ldc = n;
  g.beta = opt.accumulate ? 1.0f : 0.0f;
  if (opt.bias != nullptr) {
    g.bias = opt.bias->data();
    g.bias_type = opt.bias->dtype();
  }
  gemm(g);
}

// Not fused on the CPU: the same calls (and so the same bits) as linear_forward then
// gelu_forward.
void CpuBackend::linear_gelu_forward(Tensor& pre, Tensor& y, const Tensor& x, const Tensor& w,
                                     const Tensor* bias, std::int64_t m, std::int64_t n,
                                     std::int64_t k) {
  ops::MatmulOptions opt;
  opt.trans_b = true;
  opt.bias = bias;
  matmul(pre, x, w, m, n, k, opt);
  gelu_forward(y, pre);
}

}  // namespace meshtrain::cpu
