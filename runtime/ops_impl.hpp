// Internal to runtime/ops*.cpp, not installed: the argument checks every op family shares
// (defined in ops.cpp). Each op validates its arguments with these once, then calls its device's
// backend; the families live in
//   ops.cpp            these checks; elementwise ops and activations (add, GELU, convert, scale,
//                      SwiGLU); AdamW and gradient norms
//   ops_linear.cpp     matmul, linear (+ fused GELU), bias and linear backward
//   ops_norm.cpp       LayerNorm and RMSNorm (and their residual-add fusions)
//   ops_attention.cpp  rotary embeddings and attention (training and KV-cache decode)
//   ops_embedding_loss.cpp  embedding and cross-entropy (and its vocab-parallel pieces)
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "runtime/backend.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain::ops {
// External linkage (the op families share them), so kept out of the ops' own names.
namespace detail {

// Checks shared by every op: defined, same device, optional dtype.
void check_defined(const Tensor& t, const char* op, const char* arg);
void check_same_device(const Tensor& ref, const Tensor& t, const char* op, const char* arg);
void check_dtype(const Tensor& t, DType want, const char* op, const char* arg);
void check_float(const Tensor& t, const char* op, const char* arg);
void check_shape(const Tensor& t, const Shape& want, const char* op, const char* arg);
void check_numel(const Tensor& t, std::int64_t want, const char* op, const char* arg);
// t holds `rows` rows of `cols` columns, however its leading dimensions are split.
void check_rows(const Tensor& t, std::int64_t rows, std::int64_t cols, const char* op,
                const char* arg);

// A tensor argument and its name in messages.
struct Arg {
  const Tensor& t;
  const char* name;
};

// Each of `args` is on ref's device, with ref's shape and dtype: the operands and results of an
// elementwise op, or a gradient beside its tensor.
void check_like(const Tensor& ref, std::initializer_list<Arg> args, const char* op);
// "fp32", or "bf16 or fp32": the dtypes a bias may have next to an output of dtype t.
std::string bias_dtypes(DType t);
Backend& backend_of(const Tensor& t);

}  // namespace detail

// The op families' files name the checks unqualified, as when they were one file.
using namespace detail;

}  // namespace meshtrain::ops
