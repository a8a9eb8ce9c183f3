// The normalisations: LayerNorm (GPT-2) and RMSNorm (Llama, Qwen2), forward, backward and the
// residual add + norm fusions, with the checks of their parameters and row statistics.
#include "runtime/ops.hpp"

#include <cmath>
#include <initializer_list>
#include <string>

#include "runtime/backend.hpp"
#include "runtime/ops_impl.hpp"

namespace meshtrain::ops {
namespace {

// A LayerNorm forward's affine parameters (`cols` each, of the input's dtype) and its fp32 row
// statistics (`rows` each).
void check_layernorm_params(const Tensor& weight, const Tensor& bias, const Tensor& mean,
                            const Tensor& rstd, DType dtype, std::int64_t rows, std::int64_t cols,
                            const char* op) {
  check_shape(weight, Shape{cols}, op, "weight");
  check_shape(bias, Shape{cols}, op, "bias");
  check_dtype(weight, dtype, op, "weight");
  check_dtype(bias, dtype, op, "bias");
  check_dtype(mean, DType::kF32, op, "mean");
  check_dtype(rstd, DType::kF32, op, "rstd");
  check_numel(mean, rows, op, "mean");
  check_numel(rstd, rows, op, "rstd");
}

// An RMSNorm's weight (`cols`, of the input's dtype) and its fp32 row statistics (`rows`).
void check_rmsnorm_params(const Tensor& weight, const Tensor& rstd, DType dtype, std::int64_t rows,
                          std::int64_t cols, const char* op) {
  check_shape(weight, Shape{cols}, op, "weight");
  check_dtype(weight, dtype, op, "weight");
  check_dtype(rstd, DType::kF32, op, "rstd");
  check_numel(rstd, rows, op, "rstd");
}

}  // namespace

void layernorm_forward(Tensor& y, Tensor& mean, Tensor& rstd, const Tensor& x, const Tensor& weight,
                       const Tensor& bias, float eps) {
  const char* op = "layernorm_forward";
  check_defined(x, op, "x");
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&y, "y"},
                         {&mean, "mean"},
                         {&rstd, "rstd"},
                         {&weight, "weight"},
                         {&bias, "bias"}})
    check_same_device(x, *t, op, name);
  check_float(x, op, "x");
  MT_CHECK(x.ndim() >= 1 && x.dim(-1) > 0,
           "layernorm_forward: x must have a last dimension, got {}", x.str());
  MT_CHECK(eps > 0 && std::isfinite(eps), "layernorm_forward: eps must be positive, got {}", eps);
  const std::int64_t cols = x.dim(-1);
  const std::int64_t rows = x.numel() / cols;
  check_like(x, {{y, "y"}}, op);
  check_layernorm_params(weight, bias, mean, rstd, x.dtype(), rows, cols, op);
  backend_of(x).layernorm_forward(y, mean, rstd, x, weight, bias, rows, cols, eps);
}

void residual_layernorm_forward(Tensor& sum, Tensor& y, Tensor& mean, Tensor& rstd, const Tensor& a,
                                const Tensor& b, const Tensor& weight, const Tensor& bias,
                                float eps) {
  const char* op = "residual_layernorm_forward";
  check_defined(a, op, "a");
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&b, "b"},
                         {&sum, "sum"},
                         {&y, "y"},
                         {&mean, "mean"},
                         {&rstd, "rstd"},
                         {&weight, "weight"},
                         {&bias, "bias"}})
    check_same_device(a, *t, op, name);
  check_float(a, op, "a");
  MT_CHECK(a.ndim() >= 1 && a.dim(-1) > 0,
           "residual_layernorm_forward: a must have a last dimension, got {}", a.str());
  MT_CHECK(eps > 0 && std::isfinite(eps),
           "residual_layernorm_forward: eps must be positive, got {}", eps);
  const std::int64_t cols = a.dim(-1);
  const std::int64_t rows = a.numel() / cols;
  check_like(a, {{b, "b"}, {sum, "sum"}, {y, "y"}}, op);
  MT_CHECK(y.data() != sum.data() && y.data() != a.data() && y.data() != b.data(),
           "residual_layernorm_forward: y must not alias sum, a or b");
  check_layernorm_params(weight, bias, mean, rstd, a.dtype(), rows, cols, op);
  backend_of(a).residual_layernorm_forward(sum, y, mean, rstd, a, b, weight, bias, rows, cols, eps);
}

void layernorm_backward(Tensor& dx, Tensor& dweight, Tensor& dbias, const Tensor& dy,
                        const Tensor& x, const Tensor& weight, const Tensor& mean,
                        const Tensor& rstd, bool accumulate_dx) {
  const char* op = "layernorm_backward";
  check_defined(x, op, "x");
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&dx, "dx"},
                         {&dweight, "dweight"},
                         {&dbias, "dbias"},
                         {&dy, "dy"},
                         {&weight, "weight"},
                         {&mean, "mean"},
                         {&rstd, "rstd"}})
    check_same_device(x, *t, op, name);
  check_float(x, op, "x");
  MT_CHECK(x.ndim() >= 1, "layernorm_backward: x must have a last dimension, got {}", x.str());
  const std::int64_t cols = x.dim(-1);
  const std::int64_t rows = x.numel() / std::max<std::int64_t>(cols, 1);
  check_like(x, {{dx, "dx"}, {dy, "dy"}}, op);
  check_shape(weight, Shape{cols}, op, "weight");
  check_dtype(weight, x.dtype(), op, "weight");
  check_shape(dweight, Shape{cols}, op, "dweight");
  check_shape(dbias, Shape{cols}, op, "dbias");
  check_dtype(dweight, DType::kF32, op, "dweight");
  check_dtype(dbias, DType::kF32, op, "dbias");
  check_dtype(mean, DType::kF32, op, "mean");
  check_dtype(rstd, DType::kF32, op, "rstd");
  check_numel(mean, rows, op, "mean");
  check_numel(rstd, rows, op, "rstd");
  backend_of(x).layernorm_backward(dx, dweight, dbias, dy, x, weight, mean, rstd, rows, cols,
                                   accumulate_dx);
}

void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& weight, float eps) {
  const char* op = "rmsnorm_forward";
  check_defined(x, op, "x");
  for (auto [t, name] :
       {std::pair<const Tensor*, const char*>{&y, "y"}, {&rstd, "rstd"}, {&weight, "weight"}})
    check_same_device(x, *t, op, name);
  check_float(x, op, "x");
  MT_CHECK(x.ndim() >= 1 && x.dim(-1) > 0, "rmsnorm_forward: x must have a last dimension, got {}",
           x.str());
  MT_CHECK(eps > 0 && std::isfinite(eps), "rmsnorm_forward: eps must be positive, got {}", eps);
  const std::int64_t cols = x.dim(-1);
  const std::int64_t rows = x.numel() / cols;
  check_shape(y, x.shape(), op, "y");
  check_dtype(y, x.dtype(), op, "y");
  check_rmsnorm_params(weight, rstd, x.dtype(), rows, cols, op);
  backend_of(x).rmsnorm_forward(y, rstd, x, weight, rows, cols, eps);
}

void residual_rmsnorm_forward(Tensor& sum, Tensor& y, Tensor& rstd, const Tensor& a,
                              const Tensor& b, const Tensor& weight, float eps) {
  const char* op = "residual_rmsnorm_forward";
  check_defined(a, op, "a");
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&b, "b"},
                         {&sum, "sum"},
                         {&y, "y"},
                         {&rstd, "rstd"},
                         {&weight, "weight"}})
    check_same_device(a, *t, op, name);
  check_float(a, op, "a");
  MT_CHECK(a.ndim() >= 1 && a.dim(-1) > 0,
           "residual_rmsnorm_forward: a must have a last dimension, got {}", a.str());
  MT_CHECK(eps > 0 && std::isfinite(eps), "residual_rmsnorm_forward: eps must be positive, got {}",
           eps);
  const std::int64_t cols = a.dim(-1);
  const std::int64_t rows = a.numel() / cols;
  for (auto [t, name] :
       {std::pair<const Tensor*, const char*>{&b, "b"}, {&sum, "sum"}, {&y, "y"}}) {
    check_shape(*t, a.shape(), op, name);
    check_dtype(*t, a.dtype(), op, name);
  }
  MT_CHECK(y.data() != sum.data() && y.data() != a.data() && y.data() != b.data(),
           "residual_rmsnorm_forward: y must not alias sum, a or b");
  check_rmsnorm_params(weight, rstd, a.dtype(), rows, cols, op);
  backend_of(a).residual_rmsnorm_forward(sum, y, rstd, a, b, weight, rows, cols, eps);
}

void rmsnorm_backward(Tensor& dx, Tensor& dweight, const Tensor& dy, const Tensor& x,
                      const Tensor& weight, const Tensor& rstd, bool accumulate_dx) {
  const char* op = "rmsnorm_backward";
  check_defined(x, op, "x");
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&dx, "dx"},
                         {&dweight, "dweight"},
                         {&dy, "dy"},
                         {&weight, "weight"},
                         {&rstd, "rstd"}})
    check_same_device(x, *t, op, name);
  check_float(x, op, "x");
  MT_CHECK(x.ndim() >= 1, "rmsnorm_backward: x must have a last dimension, got {}", x.str());
  const std::int64_t cols = x.dim(-1);
  const std::int64_t rows = x.numel() / std::max<std::int64_t>(cols, 1);
  check_shape(dx, x.shape(), op, "dx");
  check_shape(dy, x.shape(), op, "dy");
  check_dtype(dx, x.dtype(), op, "dx");
  check_dtype(dy, x.dtype(), op, "dy");
  check_rmsnorm_params(weight, rstd, x.dtype(), rows, cols, op);
  check_shape(dweight, Shape{cols}, op, "dweight");
  check_dtype(dweight, DType::kF32, op, "dweight");
  if (rows == 0 || cols == 0) return;
  backend_of(x).rmsnorm_backward(dx, dweight, dy, x, weight, rstd, rows, cols, accumulate_dx);
}

}  // namespace meshtrain::ops
