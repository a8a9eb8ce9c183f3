// Matrix products: matmul (the one the backends implement), linear forward (with an optional
// bias), the fused linear + GELU forward, linear backward and the bias gradient.
#include "runtime/ops.hpp"

#include <cmath>
#include <initializer_list>
#include <string>

#include "runtime/backend.hpp"
#include "runtime/ops_impl.hpp"

namespace meshtrain::ops {

void matmul(Tensor& out, const Tensor& a, const Tensor& b, const MatmulOptions& opt) {
  const char* op = "matmul";
  check_defined(out, op, "out");
  check_same_device(out, a, op, "a");
  check_same_device(out, b, op, "b");
  check_float(a, op, "a");
  check_float(out, op, "out");
  MT_CHECK(a.dtype() == b.dtype(), "matmul: operands differ in dtype: a is {}, b is {}", a.str(),
           b.str());
  MT_CHECK(b.ndim() == 2, "matmul: b must be 2-D, got {}", b.str());
  MT_CHECK(a.ndim() >= 2, "matmul: a must be at least 2-D, got {}", a.str());
  MT_CHECK(!opt.trans_a || a.ndim() == 2, "matmul: a transposed must be 2-D, got {}", a.str());
  MT_CHECK(out.ndim() >= 1, "matmul: out must have at least one dimension, got {}", out.str());
  const std::int64_t a_cols = a.dim(-1);
  std::int64_t a_rows = 1;  // not numel / cols, which is 0 for a [M, 0] operand
  for (int d = 0; d + 1 < a.ndim(); ++d) a_rows *= a.dim(d);
  const std::int64_t m = opt.trans_a ? a_cols : a_rows;
  const std::int64_t k = opt.trans_a ? a_rows : a_cols;
  const std::int64_t kb = opt.trans_b ? b.dim(1) : b.dim(0);
  const std::int64_t n = opt.trans_b ? b.dim(0) : b.dim(1);
  MT_CHECK(k == kb, "matmul: inner dimensions differ: a {}{} has K={}, b {}{} has K={}", a.str(),
           opt.trans_a ? " (transposed)" : "", k, b.str(), opt.trans_b ? " (transposed)" : "", kb);
  MT_CHECK(out.dim(-1) == n && out.numel() == m * n,
           "matmul: out is {}, expected {} rows of {} columns", out.str(), m, n);
  if (opt.bias != nullptr) {
    check_same_device(out, *opt.bias, op, "bias");
    check_shape(*opt.bias, Shape{n}, op, "bias");
    MT_CHECK(opt.bias->dtype() == out.dtype() || opt.bias->dtype() == DType::kF32,
             "matmul: bias is {}, expected {}", opt.bias->str(), bias_dtypes(out.dtype()));
    MT_CHECK(!opt.accumulate, "matmul: bias cannot be combined with accumulate");
  }
  if (m == 0 || n == 0) return;
  backend_of(out).matmul(out, a, b, m, n, k, opt);
}

namespace {
// x [.., in] (at least 2-D, as matmul's a) and w [out, in] of x's float dtype, on x's device.
void check_linear(const Tensor& x, const Tensor& w, const char* op) {
  check_defined(x, op, "x");
  check_same_device(x, w, op, "w");
  check_float(x, op, "x");
  MT_CHECK(x.ndim() >= 2,
           "{}: argument 'x' is {}, expected [.., in_features] with at least 2 "
           "dimensions",
           op, x.str());
  check_dtype(w, x.dtype(), op, "w");
  MT_CHECK(w.ndim() == 2 && w.dim(1) == x.dim(-1),
           "{}: argument 'w' is {}, expected [out_features, {}] (x is {})", op, w.str(), x.dim(-1),
           x.str());
}
}  // namespace

void linear_forward(Tensor& y, const Tensor& x, const Tensor& w, const Tensor* bias) {
  const char* op = "linear_forward";
  check_linear(x, w, op);
  check_same_device(x, y, op, "y");
  check_float(y, op, "y");
  const std::int64_t out_features = w.dim(0);
  check_rows(y, x.numel() / std::max<std::int64_t>(x.dim(-1), 1), out_features, op, "y");
  if (bias != nullptr) {
    check_same_device(x, *bias, op, "bias");
    check_shape(*bias, Shape{out_features}, op, "bias");
    MT_CHECK(bias->dtype() == y.dtype() || bias->dtype() == DType::kF32,
             "linear_forward: argument 'bias' is {}, expected {}", bias->str(),
             bias_dtypes(y.dtype()));
  }
  MatmulOptions opt;
  opt.trans_b = true;
  opt.bias = bias;
  matmul(y, x, w, opt);
}

void linear_gelu_forward(Tensor& pre, Tensor& y, const Tensor& x, const Tensor& w,
                         const Tensor* bias) {
  const char* op = "linear_gelu_forward";
  check_linear(x, w, op);
  const std::int64_t rows = x.numel() / std::max<std::int64_t>(x.dim(-1), 1);
  const std::int64_t out_features = w.dim(0);
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&pre, "pre"}, {&y, "y"}}) {
    check_same_device(x, *t, op, name);
    check_dtype(*t, x.dtype(), op, name);
    check_rows(*t, rows, out_features, op, name);
  }
  if (bias != nullptr) {
    check_same_device(x, *bias, op, "bias");
    check_shape(*bias, Shape{out_features}, op, "bias");
    MT_CHECK(bias->dtype() == x.dtype() || bias->dtype() == DType::kF32,
             "linear_gelu_forward: argument 'bias' is {}, expected {}", bias->str(),
             bias_dtypes(x.dtype()));
  }
  MT_CHECK(pre.data() != y.data() || pre.numel() == 0,
           "linear_gelu_forward: pre and y must be different buffers (backward needs pre)");
  if (rows == 0 || out_features == 0) return;
  backend_of(x).linear_gelu_forward(pre, y, x, w, bias, rows, out_features, x.dim(-1));
}

void bias_backward(Tensor& dbias, const Tensor& dy) {
  const char* op = "bias_backward";
  check_defined(dy, op, "dy");
  check_same_device(dy, dbias, op, "dbias");
  check_dtype(dbias, DType::kF32, op, "dbias");
  check_float(dy, op, "dy");
  MT_CHECK(dy.ndim() >= 1, "bias_backward: argument 'dy' is {}, expected [.., N]", dy.str());
  const std::int64_t cols = dy.dim(-1);
  check_shape(dbias, Shape{cols}, op, "dbias");
  backend_of(dy).bias_backward(dbias, dy, dy.numel() / std::max<std::int64_t>(cols, 1), cols);
}

void linear_backward(Tensor* dx, Tensor& dw, Tensor* dbias, const Tensor& dy, const Tensor& x,
                     const Tensor& w) {
  const char* op = "linear_backward";
  check_linear(x, w, op);
  const std::int64_t rows = x.numel() / std::max<std::int64_t>(x.dim(-1), 1);
  check_same_device(x, dy, op, "dy");
  check_dtype(dy, x.dtype(), op, "dy");
  check_rows(dy, rows, w.dim(0), op, "dy");
  check_same_device(x, dw, op, "dw");
  check_dtype(dw, DType::kF32, op, "dw");
  check_shape(dw, w.shape(), op, "dw");
  if (dx != nullptr) {
    check_same_device(x, *dx, op, "dx");
    check_float(*dx, op, "dx");
    check_rows(*dx, rows, w.dim(1), op, "dx");
  }
  if (dbias != nullptr) {
    check_same_device(x, *dbias, op, "dbias");
    check_dtype(*dbias, DType::kF32, op, "dbias");
    check_shape(*dbias, Shape{w.dim(0)}, op, "dbias");
  }
  if (dx != nullptr) matmul(*dx, dy, w);
  const std::int64_t out_features = dy.dim(-1);
  const std::int64_t in_features = x.dim(-1);
  MatmulOptions opt;
  opt.trans_a = true;
  opt.accumulate = true;
  matmul(dw, dy.view(Shape{dy.numel() / std::max<std::int64_t>(out_features, 1), out_features}),
         x.view(Shape{x.numel() / std::max<std::int64_t>(in_features, 1), in_features}), opt);
  if (dbias != nullptr) bias_backward(*dbias, dy);
}

}  // namespace meshtrain::ops
