// The simple causal attention kernels: correct for every float dtype and head sizes up to
// kMaxHeadSize, used where cuDNN's fused attention refuses a shape or dtype (fp32), and for
// the KV-cache decode step. One warp per query row (forward, dQ) or key row (dK, dV); each
// lane holds head dimensions lane, lane + 32, ...; dot products are warp sums. Everything is
// fp32 and every sum runs in a fixed order, so results are deterministic. O(T^2 D) work with
// no tiling: slow, but short and easy to check.
//
// Layout as the CPU backend: qkv rows hold (H + 2 KV) D = [q of H heads | k of KV | v of KV]
// (3C with KV = H for multi-head attention); query head h reads key/value head g = h / (H / KV)
// at columns (H + g) D and (H + KV + g) D. out and dout rows hold C = H D; lse is [B, H, T].
// The key/value gradients sum over the query heads of their group inside one warp, in order.
#include "runtime/cuda/kernel_utils.cuh"

namespace meshtrain::cuda::kernels {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kPerLane = kMaxHeadSize / 32;

struct Geometry {
  int batch, seq, n_head, n_kv_head, head_size;
  __device__ int group() const { return n_head / n_kv_head; }
  __device__ std::int64_t c() const { return static_cast<std::int64_t>(n_head) * head_size; }
  __device__ std::int64_t width() const {
    return (n_head + 2 * static_cast<std::int64_t>(n_kv_head)) * head_size;
  }
  // Element offset of (b, t, part, head) in qkv, part 0/1/2 = q/k/v: head is a query head for
  // part 0 and a key/value head for parts 1 and 2.
  __device__ std::int64_t qkv_at(int b, int t, int part, int head) const {
    const std::int64_t first = part == 0 ? 0 : part == 1 ? n_head : n_head + n_kv_head;
    return (static_cast<std::int64_t>(b) * seq + t) * width() + (first + head) * head_size;
  }
  __device__ std::int64_t out_at(int b, int t, int h) const {
    return (static_cast<std::int64_t>(b) * seq + t) * c() +
           static_cast<std::int64_t>(h) * head_size;
  }
  __device__ std::int64_t lse_at(int b, int h, int t) const {
    return (static_cast<std::int64_t>(b) * n_head + h) * seq + t;
  }
};

// Loads this lane's head dimensions of a row into registers (zero beyond head_size).
template <typename T>
__device__ void load_lane(float (&dst)[kPerLane], const T* src, int head_size, float mul = 1.0f) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int d = lane + 32 * k;
    dst[k] = d < head_size ? to_f32(src[d]) * mul : 0.0f;
  }
}

template <typename T>
__device__ float dot_lane(const float (&a)[kPerLane], const T* b, int head_size) {
  const int lane = threadIdx.x % 32;
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int d = lane + 32 * k;
    if (d < head_size) s += a[k] * to_f32(b[d]);
  }
  return warp_sum(s);
}

template <typename T>
__device__ void store_lane(T* dst, const float (&src)[kPerLane], int head_size, float mul) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int d = lane + 32 * k;
    if (d < head_size) dst[d] = from_f32<T>(src[k] * mul);
  }
}

// Warp index over (b, h, row) for h among `heads` heads; false when past the end.
__device__ bool warp_task(const Geometry& g, int heads, int& b, int& h, int& row) {
  const std::int64_t w = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (w >= static_cast<std::int64_t>(g.batch) * heads * g.seq) return false;
  row = static_cast<int>(w % g.seq);
  h = static_cast<int>((w / g.seq) % heads);
  b = static_cast<int>(w / (static_cast<std::int64_t>(g.seq) * heads));
  return true;
}

template <typename T>
__global__ void forward_kernel(T* out, float* lse, const T* qkv, Geometry g, float scale) {
  int b, h, i;
  if (!warp_task(g, g.n_head, b, h, i)) return;
  const int kv = h / g.group();
  float q[kPerLane], acc[kPerLane];
  load_lane(q, qkv + g.qkv_at(b, i, 0, h), g.head_size, scale);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) acc[k] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int j = 0; j <= i; ++j) {
    const float s = dot_lane(q, qkv + g.qkv_at(b, j, 1, kv), g.head_size);
    const float m_new = fmaxf(m, s);
    const float shrink = expf(m - m_new);
    const float p = expf(s - m_new);
    l = l * shrink + p;
    const T* v = qkv + g.qkv_at(b, j, 2, kv);
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int d = lane + 32 * k;
      acc[k] = acc[k] * shrink + (d < g.head_size ? p * to_f32(v[d]) : 0.0f);
    }
    m = m_new;
  }
  store_lane(out + g.out_at(b, i, h), acc, g.head_size, 1.0f / l);
  if (threadIdx.x % 32 == 0) lse[g.lse_at(b, h, i)] = m + logf(l);
}

// delta[b, h, i] = sum_d dout * out.
template <typename T>
__global__ void delta_kernel(float* delta, const T* dout, const T* out, Geometry g) {
  int b, h, i;
  if (!warp_task(g, g.n_head, b, h, i)) return;
  float o[kPerLane];
  load_lane(o, out + g.out_at(b, i, h), g.head_size);
  const float d = dot_lane(o, dout + g.out_at(b, i, h), g.head_size);
  if (threadIdx.x % 32 == 0) delta[g.lse_at(b, h, i)] = d;
}

// dQ_i = scale * sum_{j <= i} dS_ij K_j, with P_ij = exp(scale q_i.k_j - lse_i),
// dS_ij = P_ij (dO_i.v_j - delta_i).
template <typename T>
__global__ void dq_kernel(T* dqkv, const T* dout, const T* qkv, const float* lse,
                          const float* delta, Geometry g, float scale) {
  int b, h, i;
  if (!warp_task(g, g.n_head, b, h, i)) return;
  const int kv = h / g.group();
  float q[kPerLane], go[kPerLane], acc[kPerLane];
  load_lane(q, qkv + g.qkv_at(b, i, 0, h), g.head_size, scale);
  load_lane(go, dout + g.out_at(b, i, h), g.head_size);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) acc[k] = 0.0f;
  const float li = lse[g.lse_at(b, h, i)], di = delta[g.lse_at(b, h, i)];
  const int lane = threadIdx.x % 32;
  for (int j = 0; j <= i; ++j) {
    const T* kj = qkv + g.qkv_at(b, j, 1, kv);
    const float p = expf(dot_lane(q, kj, g.head_size) - li);
    const float ds = p * (dot_lane(go, qkv + g.qkv_at(b, j, 2, kv), g.head_size) - di);
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int d = lane + 32 * k;
      if (d < g.head_size) acc[k] += ds * to_f32(kj[d]);
    }
  }
  store_lane(dqkv + g.qkv_at(b, i, 0, h), acc, g.head_size, scale);
}

// Per key/value head kv: dV_j = sum_h sum_{i >= j} P_ij dO_i; dK_j = scale * sum_h
// sum_{i >= j} dS_ij q_i, over the query heads h of kv's group in order.
template <typename T>
__global__ void dkv_kernel(T* dqkv, const T* dout, const T* qkv, const float* lse,
                           const float* delta, Geometry g, float scale) {
  int b, kv, j;
  if (!warp_task(g, g.n_kv_head, b, kv, j)) return;
  float kr[kPerLane], vr[kPerLane], dk[kPerLane], dv[kPerLane];
  load_lane(kr, qkv + g.qkv_at(b, j, 1, kv), g.head_size, scale);
  load_lane(vr, qkv + g.qkv_at(b, j, 2, kv), g.head_size);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) dk[k] = dv[k] = 0.0f;
  const int lane = threadIdx.x % 32;
  for (int h = kv * g.group(); h < (kv + 1) * g.group(); ++h) {
    for (int i = j; i < g.seq; ++i) {
      const T* qi = qkv + g.qkv_at(b, i, 0, h);
      const T* goi = dout + g.out_at(b, i, h);
      const float p = expf(dot_lane(kr, qi, g.head_size) - lse[g.lse_at(b, h, i)]);
      const float ds = p * (dot_lane(vr, goi, g.head_size) - delta[g.lse_at(b, h, i)]);
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const int d = lane + 32 * k;
        if (d < g.head_size) {
          dv[k] += p * to_f32(goi[d]);
          dk[k] += ds * to_f32(qi[d]);
        }
      }
    }
  }
  store_lane(dqkv + g.qkv_at(b, j, 1, kv), dk, g.head_size, scale);
  store_lane(dqkv + g.qkv_at(b, j, 2, kv), dv, g.head_size, 1.0f);
}

// One warp per (b, h): attends over rows 0..pos of the caches ([B, T_max, KV D]) with the
// token's own k and v read from qkv at pos, and the group's first query head stores them in row
// pos of the caches. No warp reads row pos of a cache, so no ordering between warps is needed.
template <typename T>
__global__ void decode_kernel(T* out, T* kc, T* vc, const T* qkv, int batch, int max_seq, int pos,
                              int n_head, int n_kv_head, int head_size, float scale) {
  const int w = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (w >= batch * n_head) return;
  const int b = w / n_head, h = w % n_head, lane = threadIdx.x % 32;
  const int group = n_head / n_kv_head;
  const std::int64_t c = static_cast<std::int64_t>(n_head) * head_size;
  const std::int64_t kvw = static_cast<std::int64_t>(n_kv_head) * head_size;
  const T* row = qkv + b * (c + 2 * kvw);
  const std::int64_t head = static_cast<std::int64_t>(h / group) * head_size;
  const T* k_new = row + c + head;
  const T* v_new = row + c + kvw + head;
  if (h % group == 0) {
    const std::int64_t at = (static_cast<std::int64_t>(b) * max_seq + pos) * kvw + head;
    for (int d = lane; d < head_size; d += 32) {
      kc[at + d] = k_new[d];
      vc[at + d] = v_new[d];
    }
  }
  float q[kPerLane], acc[kPerLane];
  load_lane(q, row + static_cast<std::int64_t>(h) * head_size, head_size, scale);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) acc[k] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int t = 0; t <= pos; ++t) {
    const std::int64_t at = (static_cast<std::int64_t>(b) * max_seq + t) * kvw + head;
    const T* kt = t == pos ? k_new : kc + at;
    const T* vt = t == pos ? v_new : vc + at;
    const float s = dot_lane(q, kt, head_size);
    const float m_new = fmaxf(m, s);
    const float shrink = expf(m - m_new);
    const float p = expf(s - m_new);
    l = l * shrink + p;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int d = lane + 32 * k;
      acc[k] = acc[k] * shrink + (d < head_size ? p * to_f32(vt[d]) : 0.0f);
    }
    m = m_new;
  }
  store_lane(out + b * c + static_cast<std::int64_t>(h) * head_size, acc, head_size, 1.0f / l);
}

unsigned warp_blocks(std::int64_t warps) {
  return static_cast<unsigned>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

}  // namespace

void attention_forward(DType t, void* out, float* lse, const void* qkv, int batch, int seq,
                       int n_head, int n_kv_head, int head_size, cudaStream_t s) {
  const Geometry g{batch, seq, n_head, n_kv_head, head_size};
  const float scale = 1.0f / sqrtf(static_cast<float>(head_size));
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    forward_kernel<<<warp_blocks(std::int64_t{batch} * n_head * seq), kWarpsPerBlock * 32, 0, s>>>(
        static_cast<T*>(out), lse, static_cast<const T*>(qkv), g, scale);
    MT_CUDA_LAUNCH_CHECK();
  });
}

void attention_backward(DType t, void* dqkv, const void* dout, const void* qkv, const void* out,
                        const float* lse, int batch, int seq, int n_head, int n_kv_head,
                        int head_size, Scratch& scratch, cudaStream_t s) {
  const Geometry g{batch, seq, n_head, n_kv_head, head_size};
  const float scale = 1.0f / sqrtf(static_cast<float>(head_size));
  const std::int64_t rows = std::int64_t{batch} * n_head * seq;
  const std::int64_t kv_rows = std::int64_t{batch} * n_kv_head * seq;
  auto* delta = static_cast<float*>(scratch.get(sizeof(float) * rows));
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* go = static_cast<const T*>(dout);
    const T* in = static_cast<const T*>(qkv);
    delta_kernel<<<warp_blocks(rows), kWarpsPerBlock * 32, 0, s>>>(delta, go,
                                                                   static_cast<const T*>(out), g);
    MT_CUDA_LAUNCH_CHECK();
    dq_kernel<<<warp_blocks(rows), kWarpsPerBlock * 32, 0, s>>>(static_cast<T*>(dqkv), go, in, lse,
                                                                delta, g, scale);
    MT_CUDA_LAUNCH_CHECK();
    dkv_kernel<<<warp_blocks(kv_rows), kWarpsPerBlock * 32, 0, s>>>(static_cast<T*>(dqkv), go, in,
                                                                    lse, delta, g, scale);
    MT_CUDA_LAUNCH_CHECK();
  });
}

void attention_decode(DType t, void* out, void* k_cache, void* v_cache, const void* qkv, int batch,
                      int max_seq, int pos, int n_head, int n_kv_head, int head_size,
                      cudaStream_t s) {
  const float scale = 1.0f / sqrtf(static_cast<float>(head_size));
  dispatch_float(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    decode_kernel<<<warp_blocks(std::int64_t{batch} * n_head), kWarpsPerBlock * 32, 0, s>>>(
        static_cast<T*>(out), static_cast<T*>(k_cache), static_cast<T*>(v_cache),
        static_cast<const T*>(qkv), batch, max_seq, pos, n_head, n_kv_head, head_size, scale);
    MT_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace meshtrain::cuda::kernels
