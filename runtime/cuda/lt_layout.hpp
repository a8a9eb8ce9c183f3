// The cuBLASLt view of one of our row-major matmuls, as plain numbers: what matmul.cpp passes to
// cublasLtMatmulDescSetAttribute and cublasLtMatrixLayoutCreate. Plain C++ (no CUDA headers),
// so that the CPU tests check it against a column-major reference product
// (tests/runtime/test_lt_layout.cpp) without a GPU.
//
// Ours: out[M, N] = op(a) op(b) (+ bias[N] to every row), row-major, a stored [M, K] or, with
// trans_a, [K, M]; b stored [K, N] or, with trans_b, [N, K]. A row-major [R, C] matrix is a
// column-major [C, R] one with leading dimension C, so out read column-major is the [N, M]
// matrix out^T = op(b)^T op(a)^T: cuBLASLt's A is our b, its B is our a, with m = N, n = M,
// and its bias (m elements, added to every column) is our bias (added to every row). The GELU
// epilogue's auxiliary output (the pre-activation) has out's layout.
#pragma once

#include <algorithm>
#include <cstdint>

namespace meshtrain::cuda {

struct LtMatrix {
  bool transposed = false;           // cuBLASLt's op for this operand (CUBLAS_OP_T when true)
  std::uint64_t rows = 0, cols = 0;  // the stored column-major matrix, before op
  std::int64_t ld = 0;               // its leading dimension (elements)
};

struct LtLayout {
  std::uint64_t m = 0, n = 0, k = 0;  // cuBLASLt's problem: D[m, n] = op(A)[m, k] op(B)[k, n]
  LtMatrix a, b, c;                   // cuBLASLt's A (our b), B (our a), C and D (our out)
  std::int64_t aux_ld = 0;            // CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD
  std::uint64_t bias_length = 0;      // elements of the bias vector cuBLASLt reads
};

// k = 0 is not a cuBLASLt problem; callers handle it before (k is clamped to 1 here).
inline LtLayout lt_layout(std::int64_t m, std::int64_t n, std::int64_t k, bool trans_a,
                          bool trans_b) {
  LtLayout l;
  l.m = static_cast<std::uint64_t>(n);
  l.n = static_cast<std::uint64_t>(m);
  l.k = static_cast<std::uint64_t>(std::max<std::int64_t>(k, 1));
  // cuBLASLt's A = our b: stored row-major [K, N] (column-major [N, K], ld N), or with trans_b
  // [N, K] (column-major [K, N], ld K, used transposed).
  l.a.transposed = trans_b;
  l.a.rows = trans_b ? l.k : l.m;
  l.a.cols = trans_b ? l.m : l.k;
  l.a.ld = static_cast<std::int64_t>(l.a.rows);
  // cuBLASLt's B = our a: stored row-major [M, K] (column-major [K, M], ld K), or with trans_a
  // [K, M] (column-major [M, K], ld M, used transposed).
  l.b.transposed = trans_a;
  l.b.rows = trans_a ? l.n : l.k;
  l.b.cols = trans_a ? l.k : l.n;
  l.b.ld = static_cast<std::int64_t>(l.b.rows);
  // C and D = our out: row-major [M, N] = column-major [N, M], ld N.
  l.c.rows = l.m;
  l.c.cols = l.n;
  l.c.ld = static_cast<std::int64_t>(l.m);
  l.aux_ld = l.c.ld;
  l.bias_length = l.m;
  return l;
}

}  // namespace meshtrain::cuda
