// Matmul through cuBLASLt: 16-bit (or fp32) operands, fp32 accumulation (CUBLAS_COMPUTE_32F,
// never TF32, so that the fp32 policy stays the reference), bias and GELU epilogues, a 32 MiB
// workspace, and the heuristic's first algorithm cached per shape, dtypes, epilogue and
// pointer alignment (the heuristic runs once per key, not per call).
//
// Row-major to column-major: lt_layout.hpp (cuBLASLt's A is our b, its B is our a, m = N,
// n = M; the bias runs along m, i.e. our bias is added to every row), checked on the CPU by
// tests/runtime/test_lt_layout.cpp.
#include <bit>
#include <cstdint>

#include "runtime/cuda/cuda_backend.hpp"
#include "runtime/cuda/cuda_check.hpp"
#include "runtime/cuda/lt_layout.hpp"
#include "runtime/log.hpp"

namespace meshtrain::cuda {
namespace {

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::kF32:
      return CUDA_R_32F;
    case DType::kBF16:
      return CUDA_R_16BF;
    case DType::kF16:
      return CUDA_R_16F;
    case DType::kI32:
      break;
  }
  MT_FAIL("cuBLASLt: no float type for {}", dtype_name(t));
}

// Largest power of two (at most 256) dividing the address: what the heuristic must respect.
std::uint32_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  if (a == 0) return 256;
  return static_cast<std::uint32_t>(
      std::min<std::uintptr_t>(256, std::uintptr_t{1} << std::countr_zero(a)));
}

// RAII for the cuBLASLt descriptors of one call.
struct LtDescs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtDescs() {
    if (pref) MT_CUBLAS_LOG(cublasLtMatmulPreferenceDestroy(pref));
    if (c) MT_CUBLAS_LOG(cublasLtMatrixLayoutDestroy(c));
    if (b) MT_CUBLAS_LOG(cublasLtMatrixLayoutDestroy(b));
    if (a) MT_CUBLAS_LOG(cublasLtMatrixLayoutDestroy(a));
    if (op) MT_CUBLAS_LOG(cublasLtMatmulDescDestroy(op));
  }
};

template <typename V>
void set_desc(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const V& value) {
  MT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d, attr, &value, sizeof(value)));
}

}  // namespace

bool CudaBackend::lt_matmul(void* out, DType out_type, const void* a, const void* b, DType ab_type,
                            std::int64_t m, std::int64_t n, std::int64_t k, bool trans_a,
                            bool trans_b, bool accumulate, const void* bias, DType bias_type,
                            void* aux, cublasLtEpilogue_t epilogue) {
  // cuBLASLt's view: D[N, M] = opA(ours b) opB(ours a).
  const LtLayout lay = lt_layout(m, n, k, trans_a, trans_b);
  const cublasOperation_t op_a = lay.a.transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = lay.b.transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
  LtDescs d;
  MT_CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set_desc(d.op, CUBLASLT_MATMUL_DESC_TRANSA, op_a);
  set_desc(d.op, CUBLASLT_MATMUL_DESC_TRANSB, op_b);
  set_desc(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue);
  if (bias != nullptr) {
    set_desc(d.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
    set_desc(d.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
             static_cast<std::int32_t>(cuda_type(bias_type)));
  }
  if (aux != nullptr) {
    set_desc(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux);
    set_desc(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, lay.aux_ld);
  }
  const cudaDataType_t t_ab = cuda_type(ab_type), t_c = cuda_type(out_type);
  MT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.a, t_ab, lay.a.rows, lay.a.cols, lay.a.ld));
  MT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.b, t_ab, lay.b.rows, lay.b.cols, lay.b.ld));
  MT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.c, t_c, lay.c.rows, lay.c.cols, lay.c.ld));

  GemmKey key{trans_a,
              trans_b,
              m,
              n,
              k,
              static_cast<int>(ab_type),
              static_cast<int>(out_type),
              bias != nullptr ? static_cast<int>(bias_type) : -1,
              static_cast<int>(epilogue),
              static_cast<int>(alignment_of(a)),
              static_cast<int>(alignment_of(b)),
              static_cast<int>(std::min(alignment_of(out), aux ? alignment_of(aux) : 256u)),
              accumulate};
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    MT_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&d.pref));
    const std::uint64_t ws = lt_workspace_.size();
    MT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    const std::uint32_t align_a = alignment_of(b), align_b = alignment_of(a),
                        align_c = static_cast<std::uint32_t>(key.align_c);
    MT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)));
    MT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)));
    MT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof(align_c)));
    MT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c, sizeof(align_c)));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(lt_, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &result, &found);
    GemmPlan plan;
    plan.found = st == CUBLAS_STATUS_SUCCESS && found > 0 && result.state == CUBLAS_STATUS_SUCCESS;
    if (plan.found) {
      plan.algo = result.algo;
    } else {
      // No algorithm for this combination (NOT_SUPPORTED, or INVALID_VALUE for an epilogue or
      // bias type it does not take): the caller falls back. Said once per key, since it costs
      // speed and a benchmark should show why.
      log::warn(
          "cuBLASLt offers no algorithm for M={} N={} K={} {} -> {} (epilogue {}, bias {}): "
          "{}; using the fallback",
          m, n, k, dtype_name(ab_type), dtype_name(out_type), static_cast<int>(epilogue),
          bias != nullptr ? dtype_name(bias_type) : "none", cublasLtGetStatusString(st));
    }
    it = plans_.emplace(key, plan).first;
  }
  if (!it->second.found) return false;
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  MT_CUBLAS_CHECK(cublasLtMatmul(lt_, d.op, &alpha, b, d.a, a, d.b, &beta, out, d.c, out, d.c,
                                 &it->second.algo, lt_workspace_.data(), lt_workspace_.size(),
                                 stream()));
  return true;
}

void CudaBackend::matmul(Tensor& out, const Tensor& a, const Tensor& b, std::int64_t m,
                         std::int64_t n, std::int64_t k, const ops::MatmulOptions& opt) {
  DeviceGuard g(device_.index());
  if (k == 0) {
    // An empty inner dimension: the product is zero (plus bias). cuBLASLt rejects k = 0.
    if (!opt.accumulate) out.zero_();
    if (opt.bias != nullptr) {
      Tensor rows = Tensor::empty(Shape{m, n}, out.dtype(), device_);
      rows.zero_();
      Tensor bias = opt.bias->dtype() == out.dtype() ? *opt.bias : opt.bias->to(out.dtype());
      for (std::int64_t r = 0; r < m; ++r)
        device_.copy_within(static_cast<char*>(rows.data()) + r * n * dtype_size(out.dtype()),
                            bias.data(), bias.nbytes());
      kernels::add(out.dtype(), out.data(), out.data(), rows.data(), out.numel(), stream());
    }
    return;
  }
  const void* bias = opt.bias != nullptr ? opt.bias->data() : nullptr;
  const DType bias_type = opt.bias != nullptr ? opt.bias->dtype() : out.dtype();
  const cublasLtEpilogue_t epi = bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  if (lt_matmul(out.data(), out.dtype(), a.data(), b.data(), a.dtype(), m, n, k, opt.trans_a,
                opt.trans_b, opt.accumulate, bias, bias_type, nullptr, epi))
    return;
  // No algorithm for this combination of dtypes (fp32 operands into a 16-bit output, or an
  // fp32 bias beside a 16-bit output): compute into fp32 with an fp32 bias, then convert.
  Tensor acc = Tensor::empty(Shape{m, n}, DType::kF32, device_);
  if (opt.accumulate)
    kernels::convert(DType::kF32, acc.data(), out.dtype(), out.data(), m * n, stream());
  Tensor bias32;
  if (opt.bias != nullptr)
    bias32 = opt.bias->dtype() == DType::kF32 ? *opt.bias : opt.bias->to(DType::kF32);
  const bool ok = lt_matmul(acc.data(), DType::kF32, a.data(), b.data(), a.dtype(), m, n, k,
                            opt.trans_a, opt.trans_b, opt.accumulate,
                            bias32.defined() ? bias32.data() : nullptr, DType::kF32, nullptr, epi);
  MT_ASSERT(ok, "cuBLASLt has no algorithm for {} operands into fp32 (M={}, N={}, K={})",
            dtype_name(a.dtype()), m, n, k);
  kernels::convert(out.dtype(), out.data(), DType::kF32, acc.data(), m * n, stream());
}

void CudaBackend::matmul_gelu(Tensor& out, Tensor& pre_gelu, const Tensor& a, const Tensor& b,
                              const Tensor& bias, std::int64_t m, std::int64_t n, std::int64_t k,
                              bool trans_a, bool trans_b) {
  DeviceGuard g(device_.index());
  MT_CHECK(out.dtype() == a.dtype() && pre_gelu.dtype() == a.dtype() && bias.dtype() == a.dtype() &&
               a.dtype() != DType::kF32,
           "matmul_gelu: out, pre_gelu, a, b and bias must share one 16-bit dtype");
  // The aux leading dimension (N) must be a multiple of 8 for cuBLASLt.
  if (k > 0 && n % 8 == 0 &&
      lt_matmul(out.data(), out.dtype(), a.data(), b.data(), a.dtype(), m, n, k, trans_a, trans_b,
                false, bias.data(), bias.dtype(), pre_gelu.data(), CUBLASLT_EPILOGUE_GELU_AUX_BIAS))
    return;
  ops::MatmulOptions opt;
  opt.trans_a = trans_a;
  opt.trans_b = trans_b;
  opt.bias = &bias;
  matmul(pre_gelu, a, b, m, n, k, opt);
  kernels::gelu_forward(out.dtype(), out.data(), pre_gelu.data(), out.numel(), stream());
}

}  // namespace meshtrain::cuda
