// The CPU GEMM on oneDNN 2.x matmul primitives (see gemm.hpp for the contract).
//
// Everything that oneDNN fixes at primitive creation (shapes, strides, dtypes, alpha, beta,
// bias) is the cache key; only the data pointers change from call to call. Measured here
// (oneDNN 2.6, bf16 2048 x 1536 x 384): the first creation takes about 0.4 ms (the kernels are
// JIT-compiled), and later ones still 2 to 10 us through oneDNN's own primitive cache, which
// is as much as the arithmetic of a small GEMM; our cache makes a repeat a hash lookup.
#include "runtime/cpu/gemm.hpp"

#include <oneapi/dnnl/dnnl.hpp>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <bit>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

#include "runtime/cpu/parallel.hpp"
#include "runtime/error.hpp"

namespace meshtrain::cpu {
namespace {

using dnnl_dt = dnnl::memory::data_type;

// Everything a primitive depends on. bias_type is kF32 when there is no bias, so that an
// unused field cannot split one problem into two cache entries.
struct Problem {
  std::int64_t m = 0, n = 0, k = 0, lda = 0, ldb = 0, ldc = 0;
  std::uint32_t alpha_bits = 0;  // bits, so that a NaN alpha still finds its entry
  bool trans_a = false, trans_b = false, beta_one = false, has_bias = false;
  DType ab_type = DType::kF32, c_type = DType::kF32, bias_type = DType::kF32;

  bool operator==(const Problem&) const = default;

  float alpha() const { return std::bit_cast<float>(alpha_bits); }
  // A and B as they lie in memory (before transposition).
  std::int64_t a_rows() const { return trans_a ? k : m; }
  std::int64_t a_cols() const { return trans_a ? m : k; }
  std::int64_t b_rows() const { return trans_b ? n : k; }
  std::int64_t b_cols() const { return trans_b ? k : n; }
  bool all_f32() const {
    return ab_type == DType::kF32 && c_type == DType::kF32 && bias_type == DType::kF32;
  }
};

struct ProblemHash {
  std::size_t operator()(const Problem& p) const {
    std::size_t h = 0;
    auto mix = [&h](std::uint64_t v) {
      h ^= std::hash<std::uint64_t>{}(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    };
    for (std::int64_t v : {p.m, p.n, p.k, p.lda, p.ldb, p.ldc}) mix(static_cast<std::uint64_t>(v));
    mix(p.alpha_bits);
    mix(static_cast<std::uint64_t>(p.trans_a) | static_cast<std::uint64_t>(p.trans_b) << 1 |
        static_cast<std::uint64_t>(p.beta_one) << 2 | static_cast<std::uint64_t>(p.has_bias) << 3 |
        static_cast<std::uint64_t>(p.ab_type) << 8 | static_cast<std::uint64_t>(p.c_type) << 16 |
        static_cast<std::uint64_t>(p.bias_type) << 24);
    return h;
  }
};

std::string describe(const Problem& p) {
  return fmt::format(
      "m={} n={} k={}: A {} [{}, {}]{} lda={}, B {} [{}, {}]{} ldb={}, C {} [{}, {}] ldc={}, "
      "alpha={} beta={}{}{}",
      p.m, p.n, p.k, dtype_name(p.ab_type), p.a_rows(), p.a_cols(), p.trans_a ? " transposed" : "",
      p.lda, dtype_name(p.ab_type), p.b_rows(), p.b_cols(), p.trans_b ? " transposed" : "", p.ldb,
      dtype_name(p.c_type), p.m, p.n, p.ldc, p.alpha(), p.beta_one ? 1 : 0,
      p.has_bias ? ", bias " : "", p.has_bias ? dtype_name(p.bias_type) : "");
}

// oneDNN reports failures with dnnl::error at its C++ edge; ours are meshtrain exceptions.
// invalid_arguments means the problem itself was rejected, which our validation should have
// caught first, but it is still the caller's problem; anything else is oneDNN or us failing.
[[noreturn]] void throw_dnnl(const dnnl::error& e, const char* during, const Problem& p, int line) {
  const std::string msg =
      fmt::format("gemm: oneDNN failed while {} ({}, status {}) for {} [{}]", during, e.what(),
                  static_cast<int>(e.status), describe(p), detail::source_location(__FILE__, line));
  if (e.status == dnnl_invalid_arguments) throw InvalidArgument(msg);
  throw InternalError(msg);
}

dnnl_dt to_dnnl(DType t) {
  switch (t) {
    case DType::kF32:
      return dnnl_dt::f32;
    case DType::kBF16:
      return dnnl_dt::bf16;
    case DType::kF16:
      return dnnl_dt::f16;
    case DType::kI32:
      break;
  }
  MT_ASSERT(false, "gemm reached oneDNN with the non-float dtype {}", dtype_name(t));
  return dnnl_dt::undef;
}

// The engine and the per-thread streams own no device resources on the CPU, so static
// lifetime is safe here. Streams are per thread because oneDNN does not promise that one
// stream may be used by two threads at once.
const dnnl::engine& cpu_engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& thread_stream() {
  thread_local dnnl::stream stream(cpu_engine());
  return stream;
}

// Host memory that grows to the largest request and is then reused, so that steady-state
// calls allocate nothing. One per thread and role: oneDNN's scratchpad (we run primitives in
// user-scratchpad mode, so that they neither allocate per call nor share one buffer across
// threads) and the fp32 copies of the fallback path.
class ScratchBuffer {
 public:
  void* get(std::size_t bytes) {
    if (bytes > capacity_) {
      // Page alignment: oneDNN's kernels stream through the scratchpad in cache lines and
      // pages, and fp32 copies feed vector loads.
      const std::size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
      void* p = std::aligned_alloc(kAlign, rounded);
      if (p == nullptr) throw std::bad_alloc();
      data_.reset(static_cast<std::byte*>(p));
      capacity_ = rounded;
    }
    return data_.get();
  }

 private:
  static constexpr std::size_t kAlign = 4096;
  struct Free {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::unique_ptr<std::byte, Free> data_;
  std::size_t capacity_ = 0;
};

enum Slot { kScratchpad, kCopyA, kCopyB, kCopyC, kCopyBias, kSlots };

ScratchBuffer& scratch(Slot slot) {
  thread_local std::array<ScratchBuffer, kSlots> buffers;
  return buffers[slot];
}

// How to run one problem: natively with a primitive, or (when oneDNN has no kernel for its
// dtypes on this processor) as the fp32 problem f32_problem on converted copies.
struct Plan {
  dnnl::matmul primitive;
  dnnl::memory::desc a_md, b_md, c_md, bias_md, scratchpad_md;
  const Plan* f32 = nullptr;
  Problem f32_problem;
};

// The fp32 problem a non-native one runs as: converted operands are packed densely.
Problem f32_problem_of(const Problem& p) {
  Problem q = p;
  if (p.ab_type != DType::kF32) {
    q.ab_type = DType::kF32;
    q.lda = std::max<std::int64_t>(1, p.a_cols());
    q.ldb = std::max<std::int64_t>(1, p.b_cols());
  }
  if (p.c_type != DType::kF32) {
    q.c_type = DType::kF32;
    q.ldc = p.n;
  }
  q.bias_type = DType::kF32;
  return q;
}

// Row-major strides for the logical [rows, cols] view of a matrix stored with leading
// dimension ld, transposed or not: transposition is a stride swap, never a copy.
dnnl::memory::desc matrix_md(std::int64_t rows, std::int64_t cols, DType t, std::int64_t ld,
                             bool transposed) {
  const dnnl::memory::dims strides =
      transposed ? dnnl::memory::dims{1, ld} : dnnl::memory::dims{ld, 1};
  return dnnl::memory::desc({rows, cols}, to_dnnl(t), strides);
}

// Fills plan with a native primitive; throws dnnl::error when oneDNN has none.
void create_native(const Problem& p, Plan& plan) {
  plan.a_md = matrix_md(p.m, p.k, p.ab_type, p.lda, p.trans_a);
  plan.b_md = matrix_md(p.k, p.n, p.ab_type, p.ldb, p.trans_b);
  plan.c_md = matrix_md(p.m, p.n, p.c_type, p.ldc, false);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (p.alpha_bits != std::bit_cast<std::uint32_t>(1.0f)) attr.set_output_scales(0, {p.alpha()});
  if (p.beta_one) {
    dnnl::post_ops ops;
    ops.append_sum(1.0f);
    attr.set_post_ops(ops);
  }
  const dnnl::engine& engine = cpu_engine();
  dnnl::matmul::primitive_desc pd;
  if (p.has_bias) {
    plan.bias_md = dnnl::memory::desc({1, p.n}, to_dnnl(p.bias_type), dnnl::memory::dims{p.n, 1});
    pd = dnnl::matmul::primitive_desc(
        dnnl::matmul::desc(plan.a_md, plan.b_md, plan.bias_md, plan.c_md), attr, engine);
  } else {
    pd = dnnl::matmul::primitive_desc(dnnl::matmul::desc(plan.a_md, plan.b_md, plan.c_md), attr,
                                      engine);
  }
  plan.scratchpad_md = pd.scratchpad_desc();
  plan.primitive = dnnl::matmul(pd);
}

class PlanCache {
 public:
  // The plan stays valid for the life of the process: plans are never evicted, and
  // unordered_map never moves its elements.
  const Plan& get(const Problem& p) {
    std::lock_guard<std::mutex> lock(mutex_);
    return get_locked(p);
  }

  std::size_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return plans_.size();
  }

 private:
  const Plan& get_locked(const Problem& p) {
    if (auto it = plans_.find(p); it != plans_.end()) return it->second;
    Plan plan;
    try {
      create_native(p, plan);
    } catch (const dnnl::error& e) {
      // Only "no kernel for these dtypes" has a way out; fp32 everywhere must always work.
      if (e.status != dnnl_unimplemented || p.all_f32()) {
        throw_dnnl(e, "creating the matmul primitive", p, __LINE__);
      }
      plan = Plan{};
      plan.f32_problem = f32_problem_of(p);
      plan.f32 = &get_locked(plan.f32_problem);
    }
    return plans_.emplace(p, std::move(plan)).first->second;
  }

  std::mutex mutex_;
  std::unordered_map<Problem, Plan, ProblemHash> plans_;
};

PlanCache& plan_cache() {
  // Created after the engine, so destroyed before it: the primitives are made on the engine.
  cpu_engine();
  static PlanCache cache;
  return cache;
}

// The plan for p. Each thread remembers the plans it has used, so that a repeated problem
// takes no lock.
const Plan& find_plan(const Problem& p) {
  thread_local std::unordered_map<Problem, const Plan*, ProblemHash> seen;
  if (auto it = seen.find(p); it != seen.end()) return *it->second;
  const Plan& plan = plan_cache().get(p);
  seen.emplace(p, &plan);
  return plan;
}

// A thread's oneDNN memory objects and argument map for one plan. Creating them costs a few
// microseconds, as much as the arithmetic of a 64^3 GEMM, so they are made once per thread
// and plan and only re-pointed at each call's data.
struct Bindings {
  dnnl::memory a, b, c, bias, scratchpad;
  std::unordered_map<int, dnnl::memory> args;
};

Bindings& thread_bindings(const Plan& plan, const Problem& p) {
  thread_local std::unordered_map<const Plan*, Bindings> all;
  if (auto it = all.find(&plan); it != all.end()) return it->second;
  const dnnl::engine& engine = cpu_engine();
  Bindings bind;
  bind.a = dnnl::memory(plan.a_md, engine, DNNL_MEMORY_NONE);
  bind.b = dnnl::memory(plan.b_md, engine, DNNL_MEMORY_NONE);
  bind.c = dnnl::memory(plan.c_md, engine, DNNL_MEMORY_NONE);
  bind.args = {{DNNL_ARG_SRC, bind.a}, {DNNL_ARG_WEIGHTS, bind.b}, {DNNL_ARG_DST, bind.c}};
  if (p.has_bias) {
    bind.bias = dnnl::memory(plan.bias_md, engine, DNNL_MEMORY_NONE);
    bind.args.emplace(DNNL_ARG_BIAS, bind.bias);
  }
  if (plan.scratchpad_md.get_size() > 0) {
    bind.scratchpad = dnnl::memory(plan.scratchpad_md, engine, DNNL_MEMORY_NONE);
    bind.args.emplace(DNNL_ARG_SCRATCHPAD, bind.scratchpad);
  }
  return all.emplace(&plan, std::move(bind)).first->second;
}

void execute_native(const Plan& plan, const Problem& p, const void* a, const void* b, void* c,
                    const void* bias) {
  try {
    Bindings& bind = thread_bindings(plan, p);
    // oneDNN never writes through the source and weights handles; its API is simply not const.
    bind.a.set_data_handle(const_cast<void*>(a));
    bind.b.set_data_handle(const_cast<void*>(b));
    bind.c.set_data_handle(c);
    if (p.has_bias) bind.bias.set_data_handle(const_cast<void*>(bias));
    // Every call: the thread's scratch buffer moves when a larger plan has grown it.
    if (const std::size_t bytes = plan.scratchpad_md.get_size(); bytes > 0) {
      bind.scratchpad.set_data_handle(scratch(kScratchpad).get(bytes));
    }
    dnnl::stream& stream = thread_stream();
    plan.primitive.execute(stream, bind.args);
    stream.wait();
  } catch (const dnnl::error& e) {
    throw_dnnl(e, "executing the matmul primitive", p, __LINE__);
  }
}

// n elements between float dtypes. fp16 <-> fp32 uses F16C where the build targets it: the
// scalar conversion in dtype.cpp made the fp16 fallback twice as slow as fp32 at 1024^3.
// VCVTPH2PS is exact, and VCVTPS2PH rounding to nearest even gives float_to_f16's bits
// (Inf on overflow, subnormals, quiet NaN keeping sign and top payload bits).
void convert_span(void* dst, DType dst_type, const void* src, DType src_type, std::size_t n) {
#if defined(__F16C__)
  if (src_type == DType::kF16 && dst_type == DType::kF32) {
    auto* d = static_cast<float*>(dst);
    const auto* s = static_cast<const std::uint16_t*>(src);
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
      _mm256_storeu_ps(d + i, _mm256_cvtph_ps(h));
    }
    convert_host(d + i, dst_type, s + i, src_type, n - i);
    return;
  }
  if (src_type == DType::kF32 && dst_type == DType::kF16) {
    auto* d = static_cast<std::uint16_t*>(dst);
    const auto* s = static_cast<const float*>(src);
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), h);
    }
    convert_host(d + i, dst_type, s + i, src_type, n - i);
    return;
  }
#endif
  convert_host(dst, dst_type, src, src_type, n);
}

// dst[r, :cols] = src[r, :cols] for rows rows, converting dtypes; both row-major with their
// own leading dimensions. Called inside a parallel region, the region's threads share the
// rows without waiting for each other at the end (the region's own end is the barrier), so
// that several copies cost one fork and join.
void copy_rows(void* dst, DType dst_type, std::int64_t ld_dst, const void* src, DType src_type,
               std::int64_t ld_src, std::int64_t rows, std::int64_t cols) {
  const std::size_t dsz = dtype_size(dst_type), ssz = dtype_size(src_type);
  auto* d = static_cast<std::byte*>(dst);
  const auto* s = static_cast<const std::byte*>(src);
#pragma omp for schedule(static) nowait
  for (std::int64_t r = 0; r < rows; ++r) {
    convert_span(d + r * ld_dst * dsz, dst_type, s + r * ld_src * ssz, src_type,
                 static_cast<std::size_t>(cols));
  }
}

// The same problem on fp32 copies of every operand that is not fp32 already.
void execute_via_f32(const Plan& plan, const Problem& p, const GemmArgs& g) {
  const Problem& q = plan.f32_problem;
  const bool convert_ab = p.ab_type != DType::kF32;
  const bool convert_c = p.c_type != DType::kF32;
  // The buffers are the calling thread's: look them up before any parallel region.
  void* a32 = convert_ab ? scratch(kCopyA).get(sizeof(float) * p.a_rows() * p.a_cols()) : nullptr;
  void* b32 = convert_ab ? scratch(kCopyB).get(sizeof(float) * p.b_rows() * p.b_cols()) : nullptr;
  void* c = convert_c ? scratch(kCopyC).get(sizeof(float) * p.m * p.n) : g.c;
  const std::int64_t copied =
      (convert_ab ? p.m * p.k + p.k * p.n : 0) + (convert_c && p.beta_one ? p.m * p.n : 0);
#pragma omp parallel if (copied > kParallelGrain)
  {
    if (convert_ab) {
      copy_rows(a32, DType::kF32, q.lda, g.a, p.ab_type, p.lda, p.a_rows(), p.a_cols());
      copy_rows(b32, DType::kF32, q.ldb, g.b, p.ab_type, p.ldb, p.b_rows(), p.b_cols());
    }
    if (convert_c && p.beta_one) copy_rows(c, DType::kF32, q.ldc, g.c, p.c_type, p.ldc, p.m, p.n);
  }
  const void* a = convert_ab ? a32 : g.a;
  const void* b = convert_ab ? b32 : g.b;
  const void* bias = g.bias;
  if (p.has_bias && p.bias_type != DType::kF32) {
    void* bias32 = scratch(kCopyBias).get(sizeof(float) * p.n);
    convert_span(bias32, DType::kF32, g.bias, p.bias_type, static_cast<std::size_t>(p.n));
    bias = bias32;
  }
  execute_native(*plan.f32, q, a, b, c, bias);
  if (convert_c) {
#pragma omp parallel if (p.m * p.n > kParallelGrain)
    copy_rows(g.c, p.c_type, p.ldc, c, DType::kF32, q.ldc, p.m, p.n);
  }
}

// K = 0: the product is empty, so C = alpha * bias + beta * C. oneDNN 2.6 divides by zero
// on such a problem, so it never sees one.
void empty_product(const GemmArgs& g) {
  std::vector<float> bias(static_cast<std::size_t>(g.n), 0.0f);
  if (g.bias != nullptr) convert_host(bias.data(), DType::kF32, g.bias, g.bias_type, bias.size());
  std::vector<float> row(static_cast<std::size_t>(g.n));
  const std::size_t csz = dtype_size(g.c_type);
  for (std::int64_t i = 0; i < g.m; ++i) {
    void* c_row = static_cast<std::byte*>(g.c) + i * g.ldc * csz;
    if (g.beta != 0.0f) {
      convert_host(row.data(), DType::kF32, c_row, g.c_type, row.size());
    } else {
      std::fill(row.begin(), row.end(), 0.0f);
    }
    for (std::size_t j = 0; j < row.size(); ++j) row[j] += g.alpha * bias[j];
    convert_host(c_row, g.c_type, row.data(), DType::kF32, row.size());
  }
}

void check_ld(const char* name, std::int64_t ld, std::int64_t cols, const char* what) {
  MT_CHECK(ld >= std::max<std::int64_t>(1, cols),
           "gemm: {}={} is less than the {} columns of {} as stored (at least max(1, {}))", name,
           ld, cols, what, cols);
}

}  // namespace

void gemm(const GemmArgs& g) {
  MT_CHECK(g.m >= 0 && g.n >= 0 && g.k >= 0, "gemm: sizes must be non-negative, got m={} n={} k={}",
           g.m, g.n, g.k);
  MT_CHECK(g.a_type == g.b_type, "gemm: A is {} and B is {}; they must share a dtype",
           dtype_name(g.a_type), dtype_name(g.b_type));
  MT_CHECK(is_floating(g.a_type) && is_floating(g.c_type),
           "gemm: A and C must have float dtypes, got A {} and C {}", dtype_name(g.a_type),
           dtype_name(g.c_type));
  MT_CHECK(g.beta == 0.0f || g.beta == 1.0f, "gemm: beta must be 0 or 1, got {}", g.beta);
  if (g.bias != nullptr) {
    MT_CHECK(g.bias_type == DType::kF32 || g.bias_type == g.c_type,
             "gemm: bias is {}, expected fp32 or C's dtype {}", dtype_name(g.bias_type),
             dtype_name(g.c_type));
  }
  if (g.m == 0 || g.n == 0) return;
  Problem p;
  p.m = g.m;
  p.n = g.n;
  p.k = g.k;
  p.lda = g.lda;
  p.ldb = g.ldb;
  p.ldc = g.ldc;
  p.alpha_bits = std::bit_cast<std::uint32_t>(g.alpha);
  p.trans_a = g.trans_a;
  p.trans_b = g.trans_b;
  p.beta_one = g.beta == 1.0f;
  p.has_bias = g.bias != nullptr;
  p.ab_type = g.a_type;
  p.c_type = g.c_type;
  p.bias_type = p.has_bias ? g.bias_type : DType::kF32;
  check_ld("ldc", g.ldc, g.n, "C");
  MT_CHECK(g.c != nullptr, "gemm: C is null for {}", describe(p));
  if (g.k == 0) {
    empty_product(g);
    return;
  }
  check_ld("lda", g.lda, p.a_cols(), g.trans_a ? "A (transposed, [K, M])" : "A ([M, K])");
  check_ld("ldb", g.ldb, p.b_cols(), g.trans_b ? "B (transposed, [N, K])" : "B ([K, N])");
  MT_CHECK(g.a != nullptr && g.b != nullptr, "gemm: A or B is null for {}", describe(p));

  const Plan& plan = find_plan(p);
  if (plan.f32 == nullptr) {
    execute_native(plan, p, g.a, g.b, g.c, g.bias);
  } else {
    execute_via_f32(plan, p, g);
  }
}

std::size_t gemm_cache_size() {
  return plan_cache().size();
}

void gemm_f32(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
              const void* a, std::int64_t lda, const void* b, std::int64_t ldb, DType type,
              float* c, std::int64_t ldc, float alpha, float beta) {
  GemmArgs g;
  g.trans_a = trans_a;
  g.trans_b = trans_b;
  g.m = m;
  g.n = n;
  g.k = k;
  g.a = a;
  g.a_type = type;
  g.lda = lda;
  g.b = b;
  g.b_type = type;
  g.ldb = ldb;
  g.c = c;
  g.c_type = DType::kF32;
  g.ldc = ldc;
  g.alpha = alpha;
  g.beta = beta;
  gemm(g);
}

}  // namespace meshtrain::cpu
