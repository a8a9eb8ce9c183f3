// The ops' shared argument checks (declared in runtime/ops_impl.hpp), the elementwise ops and
// activations (add, GELU, convert, scale_, SwiGLU), and AdamW with the gradient norms. The other
// op families: ops_linear.cpp, ops_norm.cpp, ops_attention.cpp, ops_embedding_loss.cpp.
#include "runtime/ops.hpp"

#include <cmath>
#include <initializer_list>
#include <string>

#include "runtime/backend.hpp"
#include "runtime/ops_impl.hpp"

namespace meshtrain::ops {
namespace detail {

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

}  // namespace detail

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

namespace {
// shape with its last dimension replaced by last.
Shape with_last_dim(const Shape& shape, std::int64_t last) {
  std::vector<std::int64_t> dims = shape.to_vector();
  dims.back() = last;
  return Shape(dims);
}

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
