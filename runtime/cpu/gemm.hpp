// The CPU GEMM every CPU op uses: oneDNN matmul primitives, created once per problem
// (shape, strides, dtypes, flags) and cached, so that a training step creates none.
// Row-major operands with explicit leading dimensions, so that callers can address a head
// inside GPT's fused [B, T, 3C] projection without copying it.
#pragma once

#include <cstdint>

#include "runtime/dtype.hpp"

namespace meshtrain::cpu {

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
  float alpha = 1.0f;  // C = alpha * op(A) op(B) + beta * C (+ bias)
  float beta = 0.0f;   // 0 or 1
  const void* bias = nullptr;  // [N], added to every row of C
  DType bias_type = DType::kF32;
};

// Runs on the calling thread's OpenMP pool. A and B share a dtype. Accumulation is fp32.
// Thread-safe: the primitive cache is locked, execution is not serialised.
void gemm(const GemmArgs& args);

}  // namespace meshtrain::cpu
