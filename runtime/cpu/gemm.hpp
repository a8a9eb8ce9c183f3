// The CPU GEMM every CPU op uses: oneDNN matmul primitives, created once per problem
// (shape, strides, dtypes, flags) and cached, so that a training step creates none.
// Row-major operands with explicit leading dimensions, so that callers can address a head
// inside GPT's fused [B, T, 3C] projection without copying it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "runtime/dtype.hpp"

namespace meshtrain::cpu {

// Element (i, j) of op(A) is a[i * lda + j], or a[j * lda + i] when trans_a; likewise B, and
// C[i, j] is c[i * ldc + j]. Leading dimensions follow BLAS: at least max(1, stored columns).
struct GemmArgs {
  bool trans_a = false;  // A is stored [K, M] with leading dimension lda
  bool trans_b = false;  // B is stored [N, K] with leading dimension ldb
  std::int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  DType a_type = DType::kF32;
  std::int64_t lda = 0;
  const void* b = nullptr;
  DType b_type = DType::kF32;
  std::int64_t ldb = 0;
  void* c = nullptr;
  DType c_type = DType::kF32;
  std::int64_t ldc = 0;
  // C = alpha * (op(A) op(B) + bias) + beta * C. alpha scales the bias too: that is oneDNN's
  // output-scale semantics, and every caller so far passes alpha = 1 with a bias.
  float alpha = 1.0f;
  float beta = 0.0f;              // 0 or 1; with 0, C is only written (it may hold NaN before)
  const void* bias = nullptr;     // [N], added to every row of C
  DType bias_type = DType::kF32;  // fp32 or c_type
};

// A and B share a float dtype; C may be any float dtype. Accumulation is fp32.
// fp32 x fp32 and bf16 x bf16 (to fp32 or bf16) run natively in oneDNN. Combinations oneDNN
// has no kernel for on this processor (with oneDNN 2.6 on a Zen 4: anything fp16, bf16 to
// fp16, fp32 to bf16) run the fp32 GEMM on fp32 copies held in reusable per-thread buffers and
// convert C back. Widening to fp32 is exact, so the result is rounded once, as natively.
// Runs on the calling thread's OpenMP pool; complete on return.
// Thread-safe: the primitive cache is locked, execution is not serialised.
// Throws InvalidArgument for bad arguments and InternalError when oneDNN fails on valid ones;
// both messages give the problem's shapes, leading dimensions and dtypes.
void gemm(const GemmArgs& args);

// C (fp32) = alpha op(A) op(B) + beta C, with A and B both of dtype `type`: the shape of
// attention's GEMMs (scores and their gradients), and of the benchmarks that mirror them.
void gemm_f32(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
              const void* a, std::int64_t lda, const void* b, std::int64_t ldb, DType type,
              float* c, std::int64_t ldc, float alpha, float beta);

// Number of cached problems (a problem run through fp32 copies counts itself and its fp32
// problem). For tests: repeating a problem must not grow it.
std::size_t gemm_cache_size();

}  // namespace meshtrain::cpu
