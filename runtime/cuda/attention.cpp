// Causal attention on CUDA: cuDNN's fused scaled-dot-product attention (flash-attention
// kernels) through cudnn-frontend's graph API, forward and backward, with one graph built and
// cached per (dtype, B, T, H, KV, D). Where cuDNN refuses (fp32, head sizes it does not
// support, a cuDNN too old), our simple kernels in attention.cu run instead.
//
// cuDNN reads q, k, v in place from the fused projection, whose rows hold W = (H + 2 KV) D
// elements (3C for multi-head attention): q is [B, H, T, D] and k, v are [B, KV, T, D], all with
// strides (T*W, D, W, 1), at offsets 0, H D and (H + KV) D. With KV < H this is cuDNN's
// grouped-query attention (query head h uses key/value head h / (H / KV); its backward sums
// dK and dV over each group). out and dout have strides (T*C, D, C, 1), dqkv the strides of
// qkv. Its softmax statistics ("Stats", fp32 [B, H, T, 1]) are max + ln(sum exp) of the scaled
// scores (cudnn-frontend's Softmax_attributes: natural log unless stats_use_log2 is set),
// which is our lse. Backward asks for cuDNN's deterministic algorithm.
#include "runtime/cuda/cuda_backend.hpp"

// cudnn-frontend's JSON (de)serialisation is not used; skipping it keeps its bundled
// nlohmann/json from meeting the one that runtime/ uses.
#define CUDNN_FRONTEND_SKIP_JSON_LIB 1
#include <cudnn.h>
#include <cudnn_frontend.h>

#include <cmath>
#include <map>
#include <tuple>

#include "runtime/cuda/cuda_check.hpp"
#include "runtime/log.hpp"

namespace fe = cudnn_frontend;

namespace meshtrain::cuda {
namespace {

enum Uid : std::int64_t { kQ = 1, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV };

}  // namespace

class CudnnAttention {
 public:
  explicit CudnnAttention(cudaStream_t stream) {
    MT_CUDNN_CHECK(cudnnCreate(&handle_));
    MT_CUDNN_CHECK(cudnnSetStream(handle_, stream));
  }
  ~CudnnAttention() {
    cache_.clear();
    MT_CUDNN_LOG(cudnnDestroy(handle_));
  }
  CudnnAttention(const CudnnAttention&) = delete;
  CudnnAttention& operator=(const CudnnAttention&) = delete;

  // Each returns false, having launched nothing, when cuDNN cannot run the shape.
  bool forward(DType t, void* out, float* lse, const void* qkv, int b, int s, int h, int kv, int d,
               Scratch& scratch) {
    Entry& e = entry(Key{false, static_cast<int>(t), b, s, h, kv, d});
    if (e.graph == nullptr) return false;
    const std::int64_t c = std::int64_t{h} * d, ckv = std::int64_t{kv} * d;
    auto* base = static_cast<char*>(const_cast<void*>(qkv));
    const std::size_t es = dtype_size(t);
    std::unordered_map<std::int64_t, void*> pack{
        {kQ, base}, {kK, base + c * es}, {kV, base + (c + ckv) * es}, {kO, out}, {kStats, lse}};
    return run(e, pack, scratch);
  }

  bool backward(DType t, void* dqkv, const void* dout, const void* qkv, const void* out,
                const float* lse, int b, int s, int h, int kv, int d, Scratch& scratch) {
    Entry& e = entry(Key{true, static_cast<int>(t), b, s, h, kv, d});
    if (e.graph == nullptr) return false;
    const std::int64_t c = std::int64_t{h} * d, ckv = std::int64_t{kv} * d;
    const std::size_t es = dtype_size(t);
    auto* in = static_cast<char*>(const_cast<void*>(qkv));
    auto* grad = static_cast<char*>(dqkv);
    std::unordered_map<std::int64_t, void*> pack{{kQ, in},
                                                 {kK, in + c * es},
                                                 {kV, in + (c + ckv) * es},
                                                 {kO, const_cast<void*>(out)},
                                                 {kDO, const_cast<void*>(dout)},
                                                 {kStats, const_cast<float*>(lse)},
                                                 {kDQ, grad},
                                                 {kDK, grad + c * es},
                                                 {kDV, grad + (c + ckv) * es}};
    return run(e, pack, scratch);
  }

 private:
  struct Key {
    bool backward;
    int dtype, b, s, h, kv, d;
    bool operator<(const Key& o) const {
      return std::tie(backward, dtype, b, s, h, kv, d) <
             std::tie(o.backward, o.dtype, o.b, o.s, o.h, o.kv, o.d);
    }
  };
  struct Entry {
    std::shared_ptr<fe::graph::Graph> graph;  // null: cuDNN refused this key
    std::int64_t workspace = 0;
  };

  bool run(Entry& e, std::unordered_map<std::int64_t, void*>& pack, Scratch& scratch) {
    void* ws = e.workspace > 0 ? scratch.get(static_cast<std::size_t>(e.workspace)) : nullptr;
    fe::error_t st = e.graph->execute(handle_, pack, ws);
    if (!st.is_good())
      detail::fail_call("cudnn_frontend Graph::execute (SDPA)", static_cast<int>(st.get_code()),
                        st.get_message(), __FILE__, __LINE__);
    return true;
  }

  Entry& entry(const Key& key) {
    auto it = cache_.find(key);
    if (it != cache_.end()) return it->second;
    Entry e;
    std::string why;
    try {
      e = build(key, true, why);
      if (e.graph == nullptr && key.backward) {
        const std::string first = why;
        e = build(key, false, why);
        if (e.graph != nullptr)
          log::warn(
              "cuDNN has no deterministic attention backward for B={} T={} H={} KV={} D={} "
              "({}); using its non-deterministic one",
              key.b, key.s, key.h, key.kv, key.d, first);
      }
    } catch (const std::exception& ex) {
      e = Entry{};
      why = ex.what();
    }
    if (e.graph == nullptr)
      log::info(
          "cuDNN attention {} refused {} B={} T={} H={} KV={} D={} ({}); using the simple kernel",
          key.backward ? "backward" : "forward", dtype_name(static_cast<DType>(key.dtype)), key.b,
          key.s, key.h, key.kv, key.d, why);
    return cache_.emplace(key, std::move(e)).first->second;
  }

  Entry build(const Key& k, bool deterministic, std::string& why) {
    const DType t = static_cast<DType>(k.dtype);
    if (t == DType::kF32) {
      why = "cuDNN SDPA takes 16-bit inputs only";
      return {};
    }
    const std::int64_t b = k.b, s = k.s, h = k.h, kv = k.kv, d = k.d, c = h * d;
    const std::int64_t w = (h + 2 * kv) * d;  // a qkv row
    auto graph = std::make_shared<fe::graph::Graph>();
    graph->set_io_data_type(t == DType::kBF16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    const std::vector<std::int64_t> dims{b, h, s, d}, kv_dims{b, kv, s, d};
    const std::vector<std::int64_t> qkv_stride{s * w, d, w, 1};
    const std::vector<std::int64_t> out_stride{s * c, d, c, 1};
    auto tensor = [&](const char* name, Uid uid, const std::vector<std::int64_t>& shape,
                      const std::vector<std::int64_t>& stride) {
      return graph->tensor(
          fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim(shape).set_stride(
              stride));
    };
    auto q = tensor("Q", kQ, dims, qkv_stride);
    auto kk = tensor("K", kK, kv_dims, qkv_stride);
    auto v = tensor("V", kV, kv_dims, qkv_stride);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    if (!k.backward) {
      auto opts = fe::graph::SDPA_attributes()
                      .set_name("sdpa_forward")
                      .set_generate_stats(true)
                      .set_attn_scale(scale)
                      .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                      .set_diagonal_band_right_bound(0);
      auto [o, stats] = graph->sdpa(q, kk, v, opts);
      o->set_output(true).set_uid(kO).set_dim(dims).set_stride(out_stride);
      stats->set_output(true)
          .set_uid(kStats)
          .set_data_type(fe::DataType_t::FLOAT)
          .set_dim({b, h, s, 1})
          .set_stride({h * s, s, 1, 1});
    } else {
      auto o = tensor("O", kO, dims, out_stride);
      auto dout = tensor("dO", kDO, dims, out_stride);
      auto stats = graph->tensor(fe::graph::Tensor_attributes()
                                     .set_name("Stats")
                                     .set_uid(kStats)
                                     .set_dim({b, h, s, 1})
                                     .set_stride({h * s, s, 1, 1})
                                     .set_data_type(fe::DataType_t::FLOAT));
      auto opts = fe::graph::SDPA_backward_attributes()
                      .set_name("sdpa_backward")
                      .set_attn_scale(scale)
                      .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                      .set_diagonal_band_right_bound(0)
                      .set_deterministic_algorithm(deterministic);
      auto [dq, dk, dv] = graph->sdpa_backward(q, kk, v, o, dout, stats, opts);
      dq->set_output(true).set_uid(kDQ).set_dim(dims).set_stride(qkv_stride);
      dk->set_output(true).set_uid(kDK).set_dim(kv_dims).set_stride(qkv_stride);
      dv->set_output(true).set_uid(kDV).set_dim(kv_dims).set_stride(qkv_stride);
    }
    auto ok = [&](fe::error_t st) {
      if (st.is_good()) return true;
      why = st.get_message();
      return false;
    };
    if (!ok(graph->validate()) || !ok(graph->build_operation_graph(handle_)) ||
        !ok(graph->create_execution_plans({fe::HeurMode_t::A})) ||
        !ok(graph->check_support(handle_)) || !ok(graph->build_plans(handle_)))
      return {};
    Entry e;
    if (!ok(graph->get_workspace_size(e.workspace))) return {};
    e.graph = std::move(graph);
    return e;
  }

  cudnnHandle_t handle_ = nullptr;
  std::map<Key, Entry> cache_;
};

void CudnnAttentionDeleter::operator()(CudnnAttention* p) const noexcept {
  delete p;
}

void CudaBackend::attention_forward(Tensor& out, Tensor& lse, const Tensor& qkv, int batch, int seq,
                                    int n_head, int n_kv_head, int head_size) {
  DeviceGuard g(device_.index());
  if (cudnn_ == nullptr) cudnn_.reset(new CudnnAttention(stream()));
  last_attention_cudnn_ =
      cudnn_->forward(qkv.dtype(), out.data(), static_cast<float*>(lse.data()), qkv.data(), batch,
                      seq, n_head, n_kv_head, head_size, scratch_);
  if (last_attention_cudnn_) return;
  MT_CHECK(
      head_size <= kernels::kMaxHeadSize,
      "attention on CUDA: cuDNN refused head size {} and the fallback kernel supports up to {}",
      head_size, kernels::kMaxHeadSize);
  kernels::attention_forward(qkv.dtype(), out.data(), static_cast<float*>(lse.data()), qkv.data(),
                             batch, seq, n_head, n_kv_head, head_size, stream());
}

void CudaBackend::attention_backward(Tensor& dqkv, const Tensor& dout, const Tensor& qkv,
                                     const Tensor& out, const Tensor& lse, int batch, int seq,
                                     int n_head, int n_kv_head, int head_size) {
  DeviceGuard g(device_.index());
  if (cudnn_ == nullptr) cudnn_.reset(new CudnnAttention(stream()));
  last_attention_cudnn_ = cudnn_->backward(qkv.dtype(), dqkv.data(), dout.data(), qkv.data(),
                                           out.data(), static_cast<const float*>(lse.data()), batch,
                                           seq, n_head, n_kv_head, head_size, scratch_);
  if (last_attention_cudnn_) return;
  MT_CHECK(
      head_size <= kernels::kMaxHeadSize,
      "attention on CUDA: cuDNN refused head size {} and the fallback kernel supports up to {}",
      head_size, kernels::kMaxHeadSize);
  kernels::attention_backward(qkv.dtype(), dqkv.data(), dout.data(), qkv.data(), out.data(),
                              static_cast<const float*>(lse.data()), batch, seq, n_head, n_kv_head,
                              head_size, scratch_, stream());
}

}  // namespace meshtrain::cuda
