#include "runtime/ops.hpp"

#include <cmath>
#include <initializer_list>
#include <string>

#include "runtime/backend.hpp"

namespace meshtrain::ops {
namespace {

// Checks shared by every op: defined, same device, optional dtype.
void check_defined(const Tensor& t, const char* op, const char* arg) {
  MT_CHECK(t.defined(), "{}: argument '{}' is an undefined tensor", op, arg);
}

void check_same_device(const Tensor& ref, const Tensor& t, const char* op, const char* arg) {
  check_defined(t, op, arg);
  MT_CHECK(&t.device() == &ref.device(), "{}: argument '{}' is on {}, expected {}", op, arg,
           t.device().name(), ref.device().name());
}

void check_dtype(const Tensor& t, DType want, const char* op, const char* arg) {
  MT_CHECK(t.dtype() == want, "{}: argument '{}' is {}, expected {}", op, arg, t.str(),
           dtype_name(want));
}

void check_float(const Tensor& t, const char* op, const char* arg) {
  MT_CHECK(is_floating(t.dtype()), "{}: argument '{}' is {}, expected a float dtype", op, arg,
           t.str());
}

void check_shape(const Tensor& t, const Shape& want, const char* op, const char* arg) {
  MT_CHECK(t.shape() == want, "{}: argument '{}' is {}, expected shape {}", op, arg, t.str(),
           want.str());
}

void check_numel(const Tensor& t, std::int64_t want, const char* op, const char* arg) {
  MT_CHECK(t.numel() == want, "{}: argument '{}' is {}, expected {} elements", op, arg, t.str(),
           want);
}

// t holds `rows` rows of `cols` columns, however its leading dimensions are split.
void check_rows(const Tensor& t, std::int64_t rows, std::int64_t cols, const char* op,
                const char* arg) {
  MT_CHECK(t.ndim() >= 1 && t.dim(-1) == cols && t.numel() == rows * cols,
           "{}: argument '{}' is {}, expected {} rows of {} columns", op, arg, t.str(), rows, cols);
}

// A tensor argument and its name in messages.
struct Arg {
  const Tensor& t;
  const char* name;
};

// Each of `args` is on ref's device, with ref's shape and dtype: the operands and results of an
// elementwise op, or a gradient beside its tensor.
void check_like(const Tensor& ref, std::initializer_list<Arg> args, const char* op) {
  for (const Arg& a : args) {
    check_same_device(ref, a.t, op, a.name);
    check_shape(a.t, ref.shape(), op, a.name);
    check_dtype(a.t, ref.dtype(), op, a.name);
  }
}

// "fp32", or "bf16 or fp32": the dtypes a bias may have next to an output of dtype t.
std::string bias_dtypes(DType t) {
  return t == DType::kF32 ? "fp32" : fmt::format("{} or fp32", dtype_name(t));
}

Backend& backend_of(const Tensor& t) {
  return t.device().backend();
}

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

// shape with its last dimension replaced by last.
Shape with_last_dim(const Shape& shape, std::int64_t last) {
  std::vector<std::int64_t> dims = shape.to_vector();
  dims.back() = last;
  return Shape(dims);
}

}  // namespace

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

void add(Tensor& out, const Tensor& a, const Tensor& b) {
  const char* op = "add";
  check_defined(out, op, "out");
  check_float(out, op, "out");
  check_like(out, {{a, "a"}, {b, "b"}}, op);
  backend_of(out).add(out, a, b);
}

void gelu_forward(Tensor& y, const Tensor& x) {
  const char* op = "gelu_forward";
  check_defined(x, op, "x");
  check_float(x, op, "x");
  check_like(x, {{y, "y"}}, op);
  backend_of(x).gelu_forward(y, x);
}

void gelu_backward(Tensor& dx, const Tensor& dy, const Tensor& x) {
  const char* op = "gelu_backward";
  check_defined(x, op, "x");
  check_float(x, op, "x");
  check_like(x, {{dx, "dx"}, {dy, "dy"}}, op);
  backend_of(x).gelu_backward(dx, dy, x);
}

void convert(Tensor& dst, const Tensor& src) {
  const char* op = "convert";
  check_defined(dst, op, "dst");
  check_same_device(dst, src, op, "src");
  check_float(dst, op, "dst");
  check_float(src, op, "src");
  check_numel(src, dst.numel(), op, "src");
  backend_of(dst).convert(dst, src);
}

void scale_(Tensor& x, float alpha) {
  check_defined(x, "scale_", "x");
  check_float(x, "scale_", "x");
  MT_CHECK(std::isfinite(alpha), "scale_: alpha must be finite, got {}", alpha);
  backend_of(x).scale(x, alpha);
}

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

namespace {
// x [.., 2F] (gate | up) and the [.., F] tensor beside it; returns F.
std::int64_t check_swiglu(const Tensor& x, const Tensor& half, const char* op,
                          const char* half_name) {
  check_defined(x, op, "x");
  check_same_device(x, half, op, half_name);
  check_float(x, op, "x");
  MT_CHECK(x.ndim() >= 1 && x.dim(-1) % 2 == 0,
           "{}: argument 'x' is {}, expected [.., 2F] (gate | up) with an even last dimension", op,
           x.str());
  const std::int64_t hidden = x.dim(-1) / 2;
  check_shape(half, with_last_dim(x.shape(), hidden), op, half_name);
  check_dtype(half, x.dtype(), op, half_name);
  return hidden;
}
}  // namespace

void swiglu_forward(Tensor& y, const Tensor& x) {
  const char* op = "swiglu_forward";
  const std::int64_t hidden = check_swiglu(x, y, op, "y");
  if (x.numel() == 0) return;
  backend_of(x).swiglu_forward(y, x, x.numel() / (2 * hidden), hidden);
}

void swiglu_backward(Tensor& dx, const Tensor& dy, const Tensor& x) {
  const char* op = "swiglu_backward";
  const std::int64_t hidden = check_swiglu(x, dy, op, "dy");
  check_same_device(x, dx, op, "dx");
  check_shape(dx, x.shape(), op, "dx");
  check_dtype(dx, x.dtype(), op, "dx");
  if (x.numel() == 0) return;
  backend_of(x).swiglu_backward(dx, dy, x, x.numel() / (2 * hidden), hidden);
}

std::vector<float> rope_inv_freq(int head_dim, const RopeConfig& cfg) {
  const char* op = "rope_inv_freq";
  MT_CHECK(head_dim >= 2 && head_dim % 2 == 0, "{}: head_dim must be even and positive, got {}", op,
           head_dim);
  MT_CHECK(std::isfinite(cfg.theta) && cfg.theta > 1.0,
           "{}: theta (rope_theta) must be > 1, got {}", op, cfg.theta);
  if (cfg.scaling != RopeConfig::Scaling::kNone)
    MT_CHECK(std::isfinite(cfg.factor) && cfg.factor >= 1.0,
             "{}: rope_scaling factor must be at least 1, got {}", op, cfg.factor);
  if (cfg.scaling == RopeConfig::Scaling::kLlama3) {
    MT_CHECK(std::isfinite(cfg.low_freq_factor) && std::isfinite(cfg.high_freq_factor) &&
                 cfg.low_freq_factor > 0 && cfg.high_freq_factor > cfg.low_freq_factor,
             "{}: llama3 rope_scaling needs 0 < low_freq_factor < high_freq_factor, got {} and {}",
             op, cfg.low_freq_factor, cfg.high_freq_factor);
    MT_CHECK(cfg.original_max_position >= 1,
             "{}: llama3 rope_scaling original_max_position_embeddings must be positive, got {}",
             op, cfg.original_max_position);
  }
  const int half = head_dim / 2;
  std::vector<float> out(static_cast<std::size_t>(half));
  for (int i = 0; i < half; ++i) {
    // Hugging Face forms the exponent 2i / D in fp32 and the power in fp32; the power is taken
    // here in double from the same fp32 exponent and rounded once.
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    double f = 1.0 / std::pow(cfg.theta, static_cast<double>(exponent));
    if (cfg.scaling == RopeConfig::Scaling::kLinear) {
      f /= cfg.factor;
    } else if (cfg.scaling == RopeConfig::Scaling::kLlama3) {
      const double old_len = static_cast<double>(cfg.original_max_position);
      const double low_wavelen = old_len / cfg.low_freq_factor;
      const double high_wavelen = old_len / cfg.high_freq_factor;
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_wavelen) {
        f /= cfg.factor;  // low frequencies: interpolated by factor
      } else if (wavelen >= high_wavelen) {
        // In between: (1 - s) f / factor + s f, s = (old_len / wavelen - low) / (high - low),
        // which is continuous with both neighbours at the band's edges.
        const double smooth = (old_len / wavelen - cfg.low_freq_factor) /
                              (cfg.high_freq_factor - cfg.low_freq_factor);
        f = (1.0 - smooth) * f / cfg.factor + smooth * f;
      }
    }
    out[static_cast<std::size_t>(i)] = static_cast<float>(f);
  }
  return out;
}

void rope_table(Tensor& table, const RopeConfig& cfg) {
  const char* op = "rope_table";
  check_defined(table, op, "table");
  check_dtype(table, DType::kF32, op, "table");
  MT_CHECK(table.ndim() == 2 && table.dim(1) >= 2 && table.dim(1) % 2 == 0,
           "{}: table must be [max_position, head_dim] with an even head_dim, got {}", op,
           table.str());
  const std::int64_t positions = table.dim(0);
  const int head_dim = static_cast<int>(table.dim(1)), half = head_dim / 2;
  const std::vector<float> inv_freq = rope_inv_freq(head_dim, cfg);
  MT_CHECK(positions <= (std::int64_t{1} << 24),
           "{}: {} positions: beyond 2^24 an fp32 position is no longer exact", op, positions);
  std::vector<float> host(static_cast<std::size_t>(positions * head_dim));
  for (std::int64_t t = 0; t < positions; ++t) {
    float* row = host.data() + t * head_dim;
    for (int i = 0; i < half; ++i) {
      const float angle = static_cast<float>(t) * inv_freq[static_cast<std::size_t>(i)];
      row[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      row[half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
  }
  table.copy_from(Tensor::wrap(host.data(), table.shape(), DType::kF32));
}

namespace {
// The rotary layout of x: rows of `heads` heads of head_dim, the first rot_heads rotated.
struct RopeDims {
  int batch, seq, rot_heads, heads, head_dim;
};

RopeDims check_rope(const Tensor& y, const Tensor& x, const Tensor& table, int n_head,
                    int n_kv_head, int pos0, const char* op, const char* x_name,
                    const char* y_name) {
  check_defined(x, op, x_name);
  check_same_device(x, y, op, y_name);
  check_same_device(x, table, op, "table");
  check_float(x, op, x_name);
  check_shape(y, x.shape(), op, y_name);
  check_dtype(y, x.dtype(), op, y_name);
  check_dtype(table, DType::kF32, op, "table");
  MT_CHECK(table.ndim() == 2 && table.dim(1) >= 2 && table.dim(1) % 2 == 0,
           "{}: table must be [max_position, head_dim] with an even head_dim, got {}", op,
           table.str());
  MT_CHECK(n_head >= 1 && n_kv_head >= 1 && n_head % n_kv_head == 0,
           "{}: n_kv_head ({}) must be at least 1 and divide n_head ({})", op, n_kv_head, n_head);
  MT_CHECK(x.ndim() == 3 || x.ndim() == 2,
           "{}: argument '{}' is {}, expected [B, T, (n_head + 2 n_kv_head) D] or [B, W]", op,
           x_name, x.str());
  const std::int64_t head_dim = table.dim(1);
  const std::int64_t heads = n_head + 2 * static_cast<std::int64_t>(n_kv_head);
  MT_CHECK(x.dim(-1) == heads * head_dim,
           "{}: argument '{}' is {}: its last dimension should be (n_head ({}) + 2 x n_kv_head "
           "({})) x head_dim ({}) = {}",
           op, x_name, x.str(), n_head, n_kv_head, head_dim, heads * head_dim);
  const std::int64_t seq = x.ndim() == 3 ? x.dim(1) : 1;
  MT_CHECK(pos0 >= 0 && pos0 + seq <= table.dim(0),
           "{}: positions {} to {} are outside the table's {} positions", op, pos0, pos0 + seq - 1,
           table.dim(0));
  return RopeDims{static_cast<int>(x.dim(0)), static_cast<int>(seq), n_head + n_kv_head,
                  static_cast<int>(heads), static_cast<int>(head_dim)};
}
}  // namespace

void rope_forward(Tensor& y, const Tensor& x, const Tensor& table, int n_head, int n_kv_head,
                  int pos0) {
  const RopeDims d = check_rope(y, x, table, n_head, n_kv_head, pos0, "rope_forward", "x", "y");
  if (x.numel() == 0) return;
  backend_of(x).rope(y, x, table, d.batch, d.seq, d.rot_heads, d.heads, d.head_dim, pos0, false);
}

void rope_backward(Tensor& dx, const Tensor& dy, const Tensor& table, int n_head, int n_kv_head,
                   int pos0) {
  const RopeDims d =
      check_rope(dx, dy, table, n_head, n_kv_head, pos0, "rope_backward", "dy", "dx");
  if (dy.numel() == 0) return;
  backend_of(dy).rope(dx, dy, table, d.batch, d.seq, d.rot_heads, d.heads, d.head_dim, pos0, true);
}

namespace {
struct AttnDims {
  int batch, seq, n_head, n_kv_head, head_size;
};

// n_head >= 1 and n_kv_head dividing it; `what` names the layout for messages.
void check_heads(int n_head, int n_kv_head, const char* op) {
  MT_CHECK(n_head >= 1, "{}: n_head must be at least 1, got {}", op, n_head);
  MT_CHECK(n_kv_head >= 1 && n_head % n_kv_head == 0,
           "{}: n_kv_head ({}) must be at least 1 and divide n_head ({})", op, n_kv_head, n_head);
}

// The width of a fused q/k/v row, (n_head + 2 n_kv_head) * head size; returns the head size.
std::int64_t qkv_head_size(std::int64_t width, int n_head, int n_kv_head, const char* op) {
  const std::int64_t heads = n_head + 2 * static_cast<std::int64_t>(n_kv_head);
  if (n_kv_head == n_head)
    MT_CHECK(width % heads == 0, "{}: qkv's last dimension {} is not 3 x n_head ({}) x head size",
             op, width, n_head);
  else
    MT_CHECK(width % heads == 0,
             "{}: qkv's last dimension {} is not (n_head ({}) + 2 x n_kv_head ({})) x head size",
             op, width, n_head, n_kv_head);
  return width / heads;
}

AttnDims check_attention(const Tensor& qkv, const Tensor& out, const Tensor& lse, int n_head,
                         int n_kv_head, const char* op) {
  check_defined(qkv, op, "qkv");
  check_same_device(qkv, out, op, "out");
  check_same_device(qkv, lse, op, "lse");
  check_float(qkv, op, "qkv");
  MT_CHECK(qkv.ndim() == 3, "{}: qkv must be {}, got {}", op,
           n_kv_head == n_head ? "[B, T, 3C]" : "[B, T, (n_head + 2 n_kv_head) D]", qkv.str());
  check_heads(n_head, n_kv_head, op);
  const std::int64_t hs = qkv_head_size(qkv.dim(2), n_head, n_kv_head, op);
  AttnDims d{static_cast<int>(qkv.dim(0)), static_cast<int>(qkv.dim(1)), n_head, n_kv_head,
             static_cast<int>(hs)};
  check_shape(out, Shape{d.batch, d.seq, n_head * hs}, op, "out");
  check_dtype(out, qkv.dtype(), op, "out");
  check_shape(lse, Shape{d.batch, n_head, d.seq}, op, "lse");
  check_dtype(lse, DType::kF32, op, "lse");
  return d;
}
}  // namespace

void attention_forward(Tensor& out, Tensor& lse, const Tensor& qkv, int n_head) {
  attention_forward(out, lse, qkv, n_head, n_head);
}

void attention_forward(Tensor& out, Tensor& lse, const Tensor& qkv, int n_head, int n_kv_head) {
  const AttnDims d = check_attention(qkv, out, lse, n_head, n_kv_head, "attention_forward");
  if (qkv.numel() == 0) return;
  backend_of(qkv).attention_forward(out, lse, qkv, d.batch, d.seq, d.n_head, d.n_kv_head,
                                    d.head_size);
}

void attention_backward(Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& out,
                        const Tensor& lse, int n_head) {
  attention_backward(dqkv, dout, qkv, out, lse, n_head, n_head);
}

void attention_backward(Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& out,
                        const Tensor& lse, int n_head, int n_kv_head) {
  const char* op = "attention_backward";
  const AttnDims d = check_attention(qkv, out, lse, n_head, n_kv_head, op);
  check_like(qkv, {{dqkv, "dqkv"}}, op);
  check_like(out, {{dout, "dout"}}, op);
  if (qkv.numel() == 0) return;
  backend_of(qkv).attention_backward(dqkv, dout, qkv, out, lse, d.batch, d.seq, d.n_head,
                                     d.n_kv_head, d.head_size);
}

void attention_decode(Tensor& out, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv, int pos,
                      int n_head) {
  attention_decode(out, k_cache, v_cache, qkv, pos, n_head, n_head);
}

void attention_decode(Tensor& out, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv, int pos,
                      int n_head, int n_kv_head) {
  const char* op = "attention_decode";
  check_defined(qkv, op, "qkv");
  check_same_device(qkv, out, op, "out");
  check_same_device(qkv, k_cache, op, "k_cache");
  check_same_device(qkv, v_cache, op, "v_cache");
  check_float(qkv, op, "qkv");
  MT_CHECK(qkv.ndim() == 2, "attention_decode: qkv must be {}, got {}",
           n_kv_head == n_head ? "[B, 3C]" : "[B, (n_head + 2 n_kv_head) D]", qkv.str());
  check_heads(n_head, n_kv_head, op);
  const std::int64_t hs = qkv_head_size(qkv.dim(1), n_head, n_kv_head, op);
  const std::int64_t b = qkv.dim(0), c = n_head * hs, kv = n_kv_head * hs;
  check_shape(out, Shape{b, c}, op, "out");
  check_dtype(out, qkv.dtype(), op, "out");
  MT_CHECK(k_cache.ndim() == 3 && k_cache.dim(0) == b && k_cache.dim(2) == kv,
           "attention_decode: k_cache must be [{}, T_max, {}], got {}", b, kv, k_cache.str());
  check_shape(v_cache, k_cache.shape(), op, "v_cache");
  check_dtype(k_cache, qkv.dtype(), op, "k_cache");
  check_dtype(v_cache, qkv.dtype(), op, "v_cache");
  MT_CHECK(pos >= 0 && pos < k_cache.dim(1),
           "attention_decode: position {} outside the cache of {}", pos, k_cache.dim(1));
  backend_of(qkv).attention_decode(out, k_cache, v_cache, qkv, static_cast<int>(b),
                                   static_cast<int>(k_cache.dim(1)), pos, n_head, n_kv_head,
                                   static_cast<int>(hs));
}

namespace {
void check_tokens(const Tensor& tokens, std::int64_t vocab, const char* op) {
  check_dtype(tokens, DType::kI32, op, "tokens");
  MT_CHECK(tokens.ndim() == 2, "{}: tokens must be [B, T], got {}", op, tokens.str());
  if (tokens.numel() == 0) return;
  std::int32_t lo, hi;
  std::int64_t lo_at, hi_at;
  backend_of(tokens).token_range(tokens, lo, lo_at, hi, hi_at);
  const std::int64_t t = tokens.dim(1);
  MT_CHECK(lo >= 0, "{}: token id {} at position (batch {}, time {}) is negative", op, lo,
           lo_at / t, lo_at % t);
  MT_CHECK(hi < vocab,
           "{}: token id {} at position (batch {}, time {}) is outside the vocabulary of {}", op,
           hi, hi_at / t, hi_at % t, vocab);
}
}  // namespace

void embedding_forward(Tensor& out, const Tensor& tokens, const Tensor& wte, const Tensor& wpe) {
  const char* op = "embedding_forward";
  check_defined(wte, op, "wte");
  check_same_device(wte, out, op, "out");
  check_same_device(wte, tokens, op, "tokens");
  check_float(wte, op, "wte");
  MT_CHECK(wte.ndim() == 2, "embedding_forward: wte must be [V, C], got {}", wte.str());
  check_tokens(tokens, wte.dim(0), op);
  const std::int64_t b = tokens.dim(0), t = tokens.dim(1), c = wte.dim(1);
  check_shape(out, Shape{b, t, c}, op, "out");
  check_dtype(out, wte.dtype(), op, "out");
  if (wpe.defined()) {
    check_same_device(wte, wpe, op, "wpe");
    check_dtype(wpe, wte.dtype(), op, "wpe");
    MT_CHECK(wpe.ndim() == 2 && wpe.dim(1) == c,
             "embedding_forward: wpe must be [T_max, {}], got {}", c, wpe.str());
    MT_CHECK(t <= wpe.dim(0),
             "embedding_forward: sequence length {} exceeds the {} positions of wpe", t,
             wpe.dim(0));
  }
  if (out.numel() == 0) return;
  backend_of(wte).embedding_forward(out, tokens, wte, wpe, static_cast<int>(b), static_cast<int>(t),
                                    static_cast<int>(c));
}

void embedding_backward(Tensor& dwte, Tensor& dwpe, const Tensor& dout, const Tensor& tokens) {
  const char* op = "embedding_backward";
  check_defined(dwte, op, "dwte");
  check_same_device(dwte, dout, op, "dout");
  check_same_device(dwte, tokens, op, "tokens");
  check_dtype(dwte, DType::kF32, op, "dwte");
  check_float(dout, op, "dout");
  MT_CHECK(dwte.ndim() == 2, "embedding_backward: dwte must be [V, C], got {}", dwte.str());
  check_tokens(tokens, dwte.dim(0), op);
  const std::int64_t b = tokens.dim(0), t = tokens.dim(1), c = dwte.dim(1);
  check_shape(dout, Shape{b, t, c}, op, "dout");
  if (dwpe.defined()) {
    check_same_device(dwte, dwpe, op, "dwpe");
    check_dtype(dwpe, DType::kF32, op, "dwpe");
    MT_CHECK(dwpe.ndim() == 2 && dwpe.dim(1) == c && t <= dwpe.dim(0),
             "embedding_backward: dwpe must be [T_max >= {}, {}], got {}", t, c, dwpe.str());
  }
  if (dout.numel() == 0) return;
  backend_of(dwte).embedding_backward(dwte, dwpe, dout, tokens, static_cast<int>(b),
                                      static_cast<int>(t), static_cast<int>(c));
}

namespace {
void check_cross_entropy(const Tensor& logits, const Tensor& lse, const Tensor& targets, int vocab,
                         const char* op) {
  check_defined(logits, op, "logits");
  check_same_device(logits, lse, op, "lse");
  check_same_device(logits, targets, op, "targets");
  check_float(logits, op, "logits");
  MT_CHECK(logits.ndim() >= 2, "{}: logits must be [N, V_padded], got {}", op, logits.str());
  const std::int64_t vp = logits.dim(-1);
  MT_CHECK(vocab >= 1 && vocab <= vp, "{}: vocab {} must be in [1, {}] (the padded width)", op,
           vocab, vp);
  const std::int64_t rows = logits.numel() / vp;
  check_dtype(targets, DType::kI32, op, "targets");
  check_numel(targets, rows, op, "targets");
  check_dtype(lse, DType::kF32, op, "lse");
  check_numel(lse, rows, op, "lse");
  if (targets.numel() == 0) return;
  std::int32_t lo, hi;
  std::int64_t lo_at, hi_at;
  backend_of(targets).token_range(targets, lo, lo_at, hi, hi_at);
  MT_CHECK(hi < vocab, "{}: target {} at row {} is outside the vocabulary of {}", op, hi, hi_at,
           vocab);
}
}  // namespace

void cross_entropy_forward(Tensor& losses, Tensor& lse, const Tensor& logits, const Tensor& targets,
                           int vocab) {
  const char* op = "cross_entropy_forward";
  check_cross_entropy(logits, lse, targets, vocab, op);
  check_same_device(logits, losses, op, "losses");
  check_dtype(losses, DType::kF32, op, "losses");
  check_numel(losses, lse.numel(), op, "losses");
  if (lse.numel() == 0) return;
  backend_of(logits).cross_entropy_forward(losses, lse, logits, targets, lse.numel(),
                                           logits.dim(-1), vocab);
}

void cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& lse,
                            const Tensor& targets, int vocab, float dloss) {
  const char* op = "cross_entropy_backward";
  check_cross_entropy(logits, lse, targets, vocab, op);
  check_like(logits, {{dlogits, "dlogits"}}, op);
  MT_CHECK(std::isfinite(dloss), "cross_entropy_backward: dloss must be finite, got {}", dloss);
  if (lse.numel() == 0) return;
  backend_of(logits).cross_entropy_backward(dlogits, logits, lse, targets, lse.numel(),
                                            logits.dim(-1), vocab, dloss);
}

void cross_entropy_combine(Tensor& losses, Tensor& lse, const Tensor& parts, const Tensor& owner) {
  const char* op = "cross_entropy_combine";
  check_defined(parts, op, "parts");
  for (auto [t, name] :
       {std::pair<const Tensor*, const char*>{&losses, "losses"}, {&lse, "lse"}, {&owner, "owner"}})
    check_same_device(parts, *t, op, name);
  check_dtype(parts, DType::kF32, op, "parts");
  MT_CHECK(parts.ndim() == 3 && parts.dim(1) == 2 && parts.dim(0) >= 1,
           "cross_entropy_combine: parts must be [K, 2, N], got {}", parts.str());
  const std::int64_t ranks = parts.dim(0), rows = parts.dim(2);
  check_dtype(losses, DType::kF32, op, "losses");
  check_numel(losses, rows, op, "losses");
  check_dtype(lse, DType::kF32, op, "lse");
  check_numel(lse, rows, op, "lse");
  check_dtype(owner, DType::kI32, op, "owner");
  check_numel(owner, rows, op, "owner");
  if (rows == 0) return;
  std::int32_t lo, hi;
  std::int64_t lo_at, hi_at;
  backend_of(owner).token_range(owner, lo, lo_at, hi, hi_at);
  MT_CHECK(hi < ranks, "cross_entropy_combine: owner {} at row {} is not one of the {} ranks", hi,
           hi_at, ranks);
  backend_of(parts).cross_entropy_combine(losses, lse, parts, owner, static_cast<int>(ranks), rows);
}

void cross_entropy_backward_split(Tensor& dlogits, const Tensor& logits, const Tensor& lse,
                                  const Tensor& targets, int valid, float dloss) {
  const char* op = "cross_entropy_backward_split";
  check_defined(logits, op, "logits");
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&dlogits, "dlogits"},
                         {&lse, "lse"},
                         {&targets, "targets"}})
    check_same_device(logits, *t, op, name);
  check_float(logits, op, "logits");
  MT_CHECK(logits.ndim() >= 2, "{}: logits must be [N, V_local], got {}", op, logits.str());
  const std::int64_t cols = logits.dim(-1), rows = logits.numel() / std::max<std::int64_t>(cols, 1);
  MT_CHECK(valid >= 0 && valid <= cols, "{}: valid {} must be in [0, {}] (the local width)", op,
           valid, cols);
  check_like(logits, {{dlogits, "dlogits"}}, op);
  check_dtype(lse, DType::kF32, op, "lse");
  check_numel(lse, rows, op, "lse");
  check_dtype(targets, DType::kI32, op, "targets");
  check_numel(targets, rows, op, "targets");
  MT_CHECK(std::isfinite(dloss), "{}: dloss must be finite, got {}", op, dloss);
  if (rows == 0) return;
  std::int32_t lo, hi;
  std::int64_t lo_at, hi_at;
  backend_of(targets).token_range(targets, lo, lo_at, hi, hi_at);
  MT_CHECK(hi < valid && lo >= -2,
           "{}: targets must be in [-2, {}) (-1: on another rank, -2: ignored); row {} holds {}",
           op, valid, hi >= valid ? hi_at : lo_at, hi >= valid ? hi : lo);
  backend_of(logits).cross_entropy_backward_split(dlogits, logits, lse, targets, rows, cols, valid,
                                                  dloss);
}

void adamw_update(Tensor& param, Tensor& master, const Tensor& grad, Tensor& m, Tensor& v,
                  const AdamWParams& p) {
  const char* op = "adamw_update";
  check_defined(master, op, "master");
  for (auto [t, name] :
       {std::pair<const Tensor*, const char*>{&grad, "grad"}, {&m, "m"}, {&v, "v"}}) {
    check_same_device(master, *t, op, name);
    check_dtype(*t, DType::kF32, op, name);
    check_numel(*t, master.numel(), op, name);
  }
  check_dtype(master, DType::kF32, op, "master");
  if (param.defined()) {
    check_same_device(master, param, op, "param");
    check_float(param, op, "param");
    check_numel(param, master.numel(), op, "param");
  }
  MT_CHECK(p.step >= 1, "adamw_update: step is 1-based, got {}", p.step);
  MT_CHECK(p.beta1 >= 0 && p.beta1 < 1 && p.beta2 >= 0 && p.beta2 < 1,
           "adamw_update: betas must be in [0, 1), got ({}, {})", p.beta1, p.beta2);
  MT_CHECK(p.eps > 0 && p.lr >= 0 && p.weight_decay >= 0 && std::isfinite(p.eps) &&
               std::isfinite(p.lr) && std::isfinite(p.weight_decay),
           "adamw_update: need finite eps > 0, lr >= 0, weight_decay >= 0; got eps {}, lr {}, "
           "wd {}",
           p.eps, p.lr, p.weight_decay);
  MT_CHECK(std::isfinite(p.grad_scale), "adamw_update: grad_scale must be finite, got {}",
           p.grad_scale);
  backend_of(master).adamw_update(param, master, grad, m, v, p);
}

double sum_of_squares(const Tensor& x) {
  check_defined(x, "sum_of_squares", "x");
  check_float(x, "sum_of_squares", "x");
  if (x.numel() == 0) return 0.0;
  return backend_of(x).sum_of_squares(x);
}

namespace {
double norm_of(std::span<const Tensor> tensors, const char* op) {
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    MT_CHECK(tensors[i].defined(), "{}: tensor {} of {} is undefined", op, i, tensors.size());
    MT_CHECK(is_floating(tensors[i].dtype()), "{}: tensor {} of {} is {}, expected a float dtype",
             op, i, tensors.size(), tensors[i].str());
  }
  double total = 0.0;
  for (const Tensor& t : tensors) total += sum_of_squares(t);
  return std::sqrt(total);
}
}  // namespace

double global_norm(std::span<const Tensor> tensors) {
  return norm_of(tensors, "global_norm");
}

double clip_grad_norm(std::span<Tensor> tensors, double max_norm) {
  MT_CHECK(max_norm > 0, "clip_grad_norm: max_norm must be positive, got {}", max_norm);
  const double norm = norm_of(tensors, "clip_grad_norm");
  if (!std::isfinite(norm) || norm <= max_norm) return norm;
  // As torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6).
  const float alpha = static_cast<float>(max_norm / (norm + 1e-6));
  for (Tensor& t : tensors) scale_(t, alpha);
  return norm;
}

}  // namespace meshtrain::ops
