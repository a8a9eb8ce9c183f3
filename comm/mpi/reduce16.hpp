// Host loops for 16-bit reductions: the bodies of the MPI user-defined ops on bf16/fp16 data and
// the conversions of the convert-reduce-convert path. Every element is computed in fp32 and
// rounded to nearest even; NaN stays NaN. Internal to comm/.
#pragma once

#include <cstddef>

#include "comm/communicator.hpp"
#include "runtime/dtype.hpp"

namespace meshtrain::comm::detail {

// inout[i] = op(in[i], inout[i]) for `n` elements of `dtype` (bf16 or fp16). kAvg reduces as
// kSum: the division happens once, after the reduction.
void reduce16(DType dtype, ReduceOp op, const void* in, void* inout, std::size_t n);

// dst[i] = float(src[i]) for bf16 or fp16 src.
void widen16(DType dtype, const void* src, float* dst, std::size_t n);

// dst[i] = round(src[i] * scale) to bf16 or fp16.
void narrow16(DType dtype, const float* src, void* dst, std::size_t n, float scale);

// out[i] = round(op(a[i], b[i]) * scale) for fp32, bf16 or fp16: one step of a ring reduction
// (scale is 1 except at the step that completes an element's reduction under kAvg). `out` may
// be `a`.
void reduce_into(DType dtype, ReduceOp op, const void* a, const void* b, void* out, std::size_t n,
                 float scale);

// x[i] = round(x[i] * scale) in place, for fp32, bf16 or fp16 (the division of kAvg).
void scale_inplace(DType dtype, void* x, std::size_t n, float scale);

}  // namespace meshtrain::comm::detail
