// op_runner: runs single meshtrain ops on cases written by the PyTorch conformance suite
// (tests/runtime/test_ops_torch.py) and writes what they produced.
//
//   op_runner --device cpu|cuda [--threads N] --in CASE_DIR --out RESULT_DIR
//
// Every CASE_DIR/*.safetensors is one case: its metadata names the op ("op") and the op's
// scalar arguments; its tensors are the op's inputs, by argument name, plus the initial
// values of outputs that the op accumulates into. The result, RESULT_DIR/<same name>, holds
// the output tensors by name and, in its metadata, scalar results ("result") or the error the
// op threw ("error"). A case whose op throws does not stop the others. Outputs that an op
// writes (rather than accumulates into) start as NaN, so that an element the op forgets to
// write cannot pass.
//
// The device is a parameter so that every backend built runs the same cases. --threads sets
// the CPU backend's OpenMP thread count (default: OpenMP's), so that results can be compared
// across thread counts.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/config.hpp"
#include "runtime/threads.hpp"
#if MESHTRAIN_HAS_CUDA
#include "runtime/cuda/cuda_device.hpp"
#endif
#include "runtime/ops.hpp"
#include "runtime/safetensors.hpp"

namespace meshtrain {
namespace {

namespace fs = std::filesystem;

using Outputs = std::vector<std::pair<std::string, Tensor>>;

// The device called name; a CUDA device is opened into `owned`, which must outlive every
// tensor on it.
Device& device_named(const std::string& name, std::unique_ptr<Device>& owned) {
  if (name == "cpu") return cpu_device();
#if MESHTRAIN_HAS_CUDA
  if (name == "cuda") {
    owned = cuda::open_device(0);  // one process: the first visible GPU
    return *owned;
  }
  MT_FAIL("op_runner: unknown device '{}' (available: cpu, cuda)", name);
#else
  MT_FAIL("op_runner: device '{}' is not available in this build (available: cpu)", name);
#endif
}

// A tensor on `device` whose every float element is NaN.
Tensor nan_tensor(const Shape& shape, DType dtype, Device& device) {
  std::vector<float> values(static_cast<std::size_t>(shape.numel()),
                            std::numeric_limits<float>::quiet_NaN());
  return Tensor::from_floats(values, shape, dtype, device);
}

class Case {
 public:
  Case(const SafetensorsFile& file, Device& device) : file_(file), device_(device) {
    for (const auto& [name, t] : file.tensors) on_device_.emplace(name, t.to(device));
  }

  const std::string& path() const { return file_.path; }
  Device& device() const { return device_; }

  bool has(const std::string& name) const { return on_device_.count(name) != 0; }
  bool has_text(const std::string& key) const { return file_.metadata.count(key) != 0; }
  // The input called name (on the device). Mutable: some ops work in place.
  Tensor& tensor(const std::string& name) {
    auto it = on_device_.find(name);
    MT_CHECK(it != on_device_.end(), "case '{}' has no tensor '{}'", path(), name);
    return it->second;
  }
  // The input, or an undefined tensor when the case has none of that name.
  Tensor optional(const std::string& name) { return has(name) ? tensor(name) : Tensor(); }

  const std::string& text(const std::string& key) const {
    auto it = file_.metadata.find(key);
    MT_CHECK(it != file_.metadata.end(), "case '{}' has no metadata '{}'", path(), key);
    return it->second;
  }
  std::string text(const std::string& key, const std::string& fallback) const {
    auto it = file_.metadata.find(key);
    return it == file_.metadata.end() ? fallback : it->second;
  }
  int integer(const std::string& key) const { return std::stoi(text(key)); }
  float real(const std::string& key) const { return std::stof(text(key)); }
  double real64(const std::string& key) const { return std::stod(text(key)); }
  bool flag(const std::string& key) const { return text(key, "0") == "1"; }

  // A NaN-filled output, or the input of the same name when the case gives an initial value.
  Tensor output(const std::string& name, const Shape& shape, DType dtype) {
    if (has(name)) return tensor(name);
    return nan_tensor(shape, dtype, device_);
  }

 private:
  const SafetensorsFile& file_;
  Device& device_;
  std::map<std::string, Tensor> on_device_;
};

// Leading dimensions of t with its last one replaced by last.
Shape with_last(const Tensor& t, std::int64_t last) {
  std::vector<std::int64_t> dims = t.shape().to_vector();
  dims.back() = last;
  return Shape(dims);
}

Shape without_last(const Tensor& t) {
  std::vector<std::int64_t> dims = t.shape().to_vector();
  dims.pop_back();
  return Shape(dims);
}

std::vector<Tensor> numbered(Case& c, const char* prefix) {
  std::vector<Tensor> out;
  for (int i = 0; c.has(fmt::format("{}{}", prefix, i)); ++i)
    out.push_back(c.tensor(fmt::format("{}{}", prefix, i)));
  return out;
}

struct Result {
  Outputs tensors;
  std::map<std::string, std::string> metadata;
};

using OpFn = std::function<Result(Case&)>;

const std::map<std::string, OpFn>& op_table() {
  static const std::map<std::string, OpFn> table{
      {"matmul",
       [](Case& c) {
         const Tensor& a = c.tensor("a");
         const Tensor& b = c.tensor("b");
         ops::MatmulOptions opt;
         opt.trans_a = c.flag("trans_a");
         opt.trans_b = c.flag("trans_b");
         opt.accumulate = c.flag("accumulate");
         Tensor bias = c.optional("bias");
         if (bias.defined()) opt.bias = &bias;
         const std::int64_t n = opt.trans_b ? b.dim(0) : b.dim(1);
         const Shape shape = opt.trans_a ? Shape{a.dim(1), n} : with_last(a, n);
         const DType dtype = parse_dtype(c.text("out_dtype", std::string(dtype_name(a.dtype()))));
         Tensor out = c.output("out", shape, dtype);
         ops::matmul(out, a, b, opt);
         return Result{{{"out", out}}, {}};
       }},
      {"linear_forward",
       [](Case& c) {
         const Tensor& x = c.tensor("x");
         const Tensor& w = c.tensor("w");
         Tensor bias = c.optional("bias");
         Tensor y = c.output("y", with_last(x, w.dim(0)), x.dtype());
         ops::linear_forward(y, x, w, bias.defined() ? &bias : nullptr);
         return Result{{{"y", y}}, {}};
       }},
      {"linear_backward",
       [](Case& c) {
         const Tensor& x = c.tensor("x");
         Tensor dx = c.flag("with_dx") ? c.output("dx", x.shape(), x.dtype()) : Tensor();
         Tensor& dw = c.tensor("dw");
         Tensor dbias = c.optional("dbias");
         ops::linear_backward(dx.defined() ? &dx : nullptr, dw, dbias.defined() ? &dbias : nullptr,
                              c.tensor("dy"), x, c.tensor("w"));
         Result r{{{"dw", dw}}, {}};
         if (dx.defined()) r.tensors.emplace_back("dx", dx);
         if (dbias.defined()) r.tensors.emplace_back("dbias", dbias);
         return r;
       }},
      {"bias_backward",
       [](Case& c) {
         Tensor& dbias = c.tensor("dbias");
         ops::bias_backward(dbias, c.tensor("dy"));
         return Result{{{"dbias", dbias}}, {}};
       }},
      {"add",
       [](Case& c) {
         Tensor& a = c.tensor("a");
         Tensor& b = c.tensor("b");
         const std::string alias = c.text("alias", "none");
         Tensor out = alias == "a" ? a : alias == "b" ? b : c.output("out", a.shape(), a.dtype());
         ops::add(out, a, b);
         return Result{{{"out", out}}, {}};
       }},
      {"gelu_forward",
       [](Case& c) {
         const Tensor& x = c.tensor("x");
         Tensor y = c.output("y", x.shape(), x.dtype());
         ops::gelu_forward(y, x);
         return Result{{{"y", y}}, {}};
       }},
      {"gelu_backward",
       [](Case& c) {
         const Tensor& x = c.tensor("x");
         Tensor& dy = c.tensor("dy");
         Tensor dx = c.text("alias", "none") == "dy" ? dy : c.output("dx", x.shape(), x.dtype());
         ops::gelu_backward(dx, dy, x);
         return Result{{{"dx", dx}}, {}};
       }},
      {"convert",
       [](Case& c) {
         const Tensor& src = c.tensor("src");
         Tensor dst = c.output("dst", src.shape(), parse_dtype(c.text("dtype")));
         ops::convert(dst, src);
         return Result{{{"dst", dst}}, {}};
       }},
      {"scale_",
       [](Case& c) {
         Tensor& x = c.tensor("x");
         ops::scale_(x, c.real("alpha"));
         return Result{{{"x", x}}, {}};
       }},
      {"layernorm_forward",
       [](Case& c) {
         const Tensor& x = c.tensor("x");
         Tensor y = c.output("y", x.shape(), x.dtype());
         Tensor mean = c.output("mean", without_last(x), DType::kF32);
         Tensor rstd = c.output("rstd", without_last(x), DType::kF32);
         ops::layernorm_forward(y, mean, rstd, x, c.tensor("weight"), c.tensor("bias"),
                                c.real("eps"));
         return Result{{{"y", y}, {"mean", mean}, {"rstd", rstd}}, {}};
       }},
      {"layernorm_backward",
       [](Case& c) {
         const Tensor& x = c.tensor("x");
         const bool accumulate_dx = c.flag("accumulate_dx");
         Tensor dx = c.output("dx", x.shape(), x.dtype());
         Tensor& dweight = c.tensor("dweight");
         Tensor& dbias = c.tensor("dbias");
         ops::layernorm_backward(dx, dweight, dbias, c.tensor("dy"), x, c.tensor("weight"),
                                 c.tensor("mean"), c.tensor("rstd"), accumulate_dx);
         return Result{{{"dx", dx}, {"dweight", dweight}, {"dbias", dbias}}, {}};
       }},
      {"rmsnorm_forward",
       [](Case& c) {
         const Tensor& x = c.tensor("x");
         Tensor y = c.output("y", x.shape(), x.dtype());
         Tensor rstd = c.output("rstd", without_last(x), DType::kF32);
         ops::rmsnorm_forward(y, rstd, x, c.tensor("weight"), c.real("eps"));
         return Result{{{"y", y}, {"rstd", rstd}}, {}};
       }},
      {"residual_rmsnorm_forward",
       [](Case& c) {
         Tensor& a = c.tensor("a");
         Tensor& b = c.tensor("b");
         const std::string alias = c.text("alias", "none");
         Tensor sum = alias == "a" ? a : alias == "b" ? b : c.output("sum", a.shape(), a.dtype());
         Tensor y = c.output("y", a.shape(), a.dtype());
         Tensor rstd = c.output("rstd", without_last(a), DType::kF32);
         ops::residual_rmsnorm_forward(sum, y, rstd, a, b, c.tensor("weight"), c.real("eps"));
         return Result{{{"sum", sum}, {"y", y}, {"rstd", rstd}}, {}};
       }},
      {"rmsnorm_backward",
       [](Case& c) {
         const Tensor& x = c.tensor("x");
         Tensor dx = c.output("dx", x.shape(), x.dtype());
         Tensor& dweight = c.tensor("dweight");
         ops::rmsnorm_backward(dx, dweight, c.tensor("dy"), x, c.tensor("weight"), c.tensor("rstd"),
                               c.flag("accumulate_dx"));
         return Result{{{"dx", dx}, {"dweight", dweight}}, {}};
       }},
      {"swiglu_forward",
       [](Case& c) {
         const Tensor& x = c.tensor("x");
         Tensor y = c.output("y", with_last(x, x.dim(-1) / 2), x.dtype());
         ops::swiglu_forward(y, x);
         return Result{{{"y", y}}, {}};
       }},
      {"swiglu_backward",
       [](Case& c) {
         Tensor& x = c.tensor("x");
         Tensor dx = c.text("alias", "none") == "x" ? x : c.output("dx", x.shape(), x.dtype());
         ops::swiglu_backward(dx, c.tensor("dy"), x);
         return Result{{{"dx", dx}}, {}};
       }},
      {"rope_table",
       // The table and, for checking the frequencies alone, rope_inv_freq's result.
       [](Case& c) {
         ops::RopeConfig cfg;
         cfg.theta = c.real64("theta");
         const std::string scaling = c.text("scaling", "none");
         cfg.scaling = scaling == "llama3"   ? ops::RopeConfig::Scaling::kLlama3
                       : scaling == "linear" ? ops::RopeConfig::Scaling::kLinear
                                             : ops::RopeConfig::Scaling::kNone;
         if (c.has_text("factor")) cfg.factor = c.real64("factor");
         if (c.has_text("low_freq_factor")) cfg.low_freq_factor = c.real64("low_freq_factor");
         if (c.has_text("high_freq_factor")) cfg.high_freq_factor = c.real64("high_freq_factor");
         if (c.has_text("original_max_position"))
           cfg.original_max_position = c.integer("original_max_position");
         const int head_dim = c.integer("head_dim");
         Tensor table = c.output("table", Shape{c.integer("positions"), head_dim}, DType::kF32);
         ops::rope_table(table, cfg);
         const std::vector<float> f = ops::rope_inv_freq(head_dim, cfg);
         Tensor inv_freq = Tensor::from_floats(f, Shape{head_dim / 2}, DType::kF32);
         return Result{{{"table", table}, {"inv_freq", inv_freq}}, {}};
       }},
      {"rope_forward",
       [](Case& c) {
         Tensor& x = c.tensor("x");
         Tensor y = c.text("alias", "none") == "x" ? x : c.output("y", x.shape(), x.dtype());
         ops::rope_forward(y, x, c.tensor("table"), c.integer("n_head"), c.integer("n_kv_head"),
                           c.integer("pos0"));
         return Result{{{"y", y}}, {}};
       }},
      {"rope_backward",
       [](Case& c) {
         Tensor& dy = c.tensor("dy");
         Tensor dx = c.text("alias", "none") == "dy" ? dy : c.output("dx", dy.shape(), dy.dtype());
         ops::rope_backward(dx, dy, c.tensor("table"), c.integer("n_head"), c.integer("n_kv_head"),
                            c.integer("pos0"));
         return Result{{{"dx", dx}}, {}};
       }},
      // Attention: n_kv_head defaults to n_head (multi-head attention), which runs the
      // four-argument overloads.
      {"attention_forward",
       [](Case& c) {
         const Tensor& qkv = c.tensor("qkv");
         const int n_head = c.integer("n_head");
         const int n_kv = c.has_text("n_kv_head") ? c.integer("n_kv_head") : n_head;
         const std::int64_t hs = qkv.dim(2) / (n_head + 2 * n_kv);
         Tensor out = c.output("out", Shape{qkv.dim(0), qkv.dim(1), n_head * hs}, qkv.dtype());
         Tensor lse = c.output("lse", Shape{qkv.dim(0), n_head, qkv.dim(1)}, DType::kF32);
         if (c.has_text("n_kv_head"))
           ops::attention_forward(out, lse, qkv, n_head, n_kv);
         else
           ops::attention_forward(out, lse, qkv, n_head);
         return Result{{{"out", out}, {"lse", lse}}, {}};
       }},
      {"attention_backward",
       [](Case& c) {
         const Tensor& qkv = c.tensor("qkv");
         Tensor dqkv = c.output("dqkv", qkv.shape(), qkv.dtype());
         const int n_head = c.integer("n_head");
         if (c.has_text("n_kv_head"))
           ops::attention_backward(dqkv, c.tensor("dout"), qkv, c.tensor("out"), c.tensor("lse"),
                                   n_head, c.integer("n_kv_head"));
         else
           ops::attention_backward(dqkv, c.tensor("dout"), qkv, c.tensor("out"), c.tensor("lse"),
                                   n_head);
         return Result{{{"dqkv", dqkv}}, {}};
       }},
      {"attention_decode",
       [](Case& c) {
         const Tensor& qkv = c.tensor("qkv");
         Tensor& k_cache = c.tensor("k_cache");
         Tensor& v_cache = c.tensor("v_cache");
         const int n_head = c.integer("n_head");
         const int n_kv = c.has_text("n_kv_head") ? c.integer("n_kv_head") : n_head;
         const std::int64_t hs = qkv.dim(1) / (n_head + 2 * n_kv);
         Tensor out = c.output("out", Shape{qkv.dim(0), n_head * hs}, qkv.dtype());
         if (c.has_text("n_kv_head"))
           ops::attention_decode(out, k_cache, v_cache, qkv, c.integer("pos"), n_head, n_kv);
         else
           ops::attention_decode(out, k_cache, v_cache, qkv, c.integer("pos"), n_head);
         return Result{{{"out", out}, {"k_cache", k_cache}, {"v_cache", v_cache}}, {}};
       }},
      {"embedding_forward",
       [](Case& c) {
         const Tensor& tokens = c.tensor("tokens");
         const Tensor& wte = c.tensor("wte");
         Tensor out = c.output("out", Shape{tokens.dim(0), tokens.dim(1), wte.dim(1)}, wte.dtype());
         ops::embedding_forward(out, tokens, wte, c.optional("wpe"));
         return Result{{{"out", out}}, {}};
       }},
      {"embedding_backward",
       [](Case& c) {
         Tensor& dwte = c.tensor("dwte");
         Tensor dwpe = c.optional("dwpe");
         ops::embedding_backward(dwte, dwpe, c.tensor("dout"), c.tensor("tokens"));
         Result r{{{"dwte", dwte}}, {}};
         if (dwpe.defined()) r.tensors.emplace_back("dwpe", dwpe);
         return r;
       }},
      {"cross_entropy_forward",
       [](Case& c) {
         const Tensor& logits = c.tensor("logits");
         Tensor losses = c.output("losses", without_last(logits), DType::kF32);
         Tensor lse = c.output("lse", without_last(logits), DType::kF32);
         ops::cross_entropy_forward(losses, lse, logits, c.tensor("targets"), c.integer("vocab"));
         return Result{{{"losses", losses}, {"lse", lse}}, {}};
       }},
      {"cross_entropy_backward",
       [](Case& c) {
         Tensor& logits = c.tensor("logits");
         Tensor dlogits = c.text("alias", "none") == "logits"
                              ? logits
                              : c.output("dlogits", logits.shape(), logits.dtype());
         ops::cross_entropy_backward(dlogits, logits, c.tensor("lse"), c.tensor("targets"),
                                     c.integer("vocab"), c.real("dloss"));
         return Result{{{"dlogits", dlogits}}, {}};
       }},
      {"adamw_update",
       // Several steps in a row: grads is [steps, numel], one row per step.
       [](Case& c) {
         Tensor& master = c.tensor("master");
         Tensor& m = c.tensor("m");
         Tensor& v = c.tensor("v");
         Tensor param = c.optional("param");
         const Tensor& grads = c.tensor("grads");
         ops::AdamWParams p;
         p.lr = c.real("lr");
         p.beta1 = c.real("beta1");
         p.beta2 = c.real("beta2");
         p.eps = c.real("eps");
         p.weight_decay = c.real("weight_decay");
         p.grad_scale = c.real("grad_scale");
         const int first_step = c.integer("first_step");
         for (std::int64_t s = 0; s < grads.dim(0); ++s) {
           p.step = first_step + static_cast<int>(s);
           ops::adamw_update(param, master, grads.slice(s, 1).view(master.shape()), m, v, p);
         }
         Result r{{{"master", master}, {"m", m}, {"v", v}}, {}};
         if (param.defined()) r.tensors.emplace_back("param", param);
         return r;
       }},
      {"sum_of_squares",
       [](Case& c) {
         return Result{{}, {{"result", fmt::format("{}", ops::sum_of_squares(c.tensor("x")))}}};
       }},
      {"global_norm",
       [](Case& c) {
         const std::vector<Tensor> tensors = numbered(c, "t");
         return Result{{}, {{"result", fmt::format("{}", ops::global_norm(tensors))}}};
       }},
      {"clip_grad_norm",
       [](Case& c) {
         std::vector<Tensor> tensors = numbered(c, "t");
         const double norm = ops::clip_grad_norm(tensors, c.real64("max_norm"));
         Result r{{}, {{"result", fmt::format("{}", norm)}}};
         for (std::size_t i = 0; i < tensors.size(); ++i)
           r.tensors.emplace_back(fmt::format("t{}", i), tensors[i]);
         return r;
       }},
  };
  return table;
}

// Runs one case; an error becomes the result's "error" metadata.
Result run_case(const std::string& path, Device& device) {
  try {
    const SafetensorsFile file = load_safetensors(path);
    Case c(file, device);
    const std::string& op = c.text("op");
    auto it = op_table().find(op);
    MT_CHECK(it != op_table().end(), "case '{}': unknown op '{}'", path, op);
    Result r = it->second(c);
    device.synchronize();
    return r;
  } catch (const std::exception& e) {
    return Result{{}, {{"error", e.what()}}};
  }
}

int run(int argc, char** argv) {
  std::string device_name = "cpu", in_dir, out_dir;
  int threads = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    MT_CHECK(i + 1 < argc, "op_runner: option {} needs a value", arg);
    if (arg == "--device")
      device_name = argv[++i];
    else if (arg == "--threads")
      threads = std::stoi(argv[++i]);
    else if (arg == "--in")
      in_dir = argv[++i];
    else if (arg == "--out")
      out_dir = argv[++i];
    else
      MT_FAIL("op_runner: unknown option '{}' (expected --device, --threads, --in, --out)", arg);
  }
  MT_CHECK(!in_dir.empty() && !out_dir.empty(),
           "usage: op_runner --device cpu [--threads N] --in CASE_DIR --out RESULT_DIR");
  std::unique_ptr<Device> owned;
  Device& device = device_named(device_name, owned);
  if (threads > 0) set_cpu_threads(threads);
  std::vector<fs::path> cases;
  for (const auto& entry : fs::directory_iterator(in_dir))
    if (entry.path().extension() == ".safetensors") cases.push_back(entry.path());
  std::sort(cases.begin(), cases.end());
  fs::create_directories(out_dir);
  int errors = 0;
  for (const fs::path& p : cases) {
    Result r = run_case(p.string(), device);
    errors += r.metadata.count("error") != 0;
    save_safetensors((fs::path(out_dir) / p.filename()).string(), r.tensors, r.metadata);
  }
  std::printf("op_runner: %zu cases on %s, %d raised errors\n", cases.size(), device.name().c_str(),
              errors);
  return 0;
}

}  // namespace
}  // namespace meshtrain

int main(int argc, char** argv) {
  try {
    return meshtrain::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "op_runner: %s\n", e.what());
    return 2;
  }
}
