// Causal multi-head attention on the CPU in the flash-attention formulation: scores exist only
// as a bounded per-thread block, the softmax is computed online in fp32, and backward
// recomputes the probabilities from the saved log-sum-exp instead of keeping [B, H, T, T].
//
// Layout: qkv rows hold (H + 2 KV) D elements (3C for multi-head attention, where KV = H):
// query head h of batch b reads q at column h*D and k, v of its key/value head g = h / (H / KV)
// at columns (H + g) D and (H + KV + g) D, with the row width as leading dimension, so every
// GEMM addresses the head in place, without copies. out and dout rows hold C = H D.
//
// Forward, per (b, h, block of kQueryRows queries), over key chunks of at most kKeyChunk keys
// that stop at the block's last query (chunks wholly above the causal diagonal are never formed):
//   S = Q K^T / sqrt(D)                                  GEMM, fp32 out
//   m' = max(m, rowmax S);  P = exp(S - m');  l = l e^(m - m') + rowsum P
//   O = O e^(m - m') + P V                               P in the operand dtype, fp32 acc
// and finally out = O / l, lse = m + log l.
//
// Backward works on transposed scores, so that lse and delta index columns and vectorise:
// per (b, g) and key block of kKeyRows keys of key/value head g, for each query head h of g's
// group in order, over query chunks (aligned to kQueryChunk) that start at the block's first key,
//   S^T = K Q^T / sqrt(D);  P^T = exp(S^T - lse);  dP^T = V dO^T
//   dS^T = P^T o (dP^T - delta),  delta_i = rowsum(dO o O)_i
//   dV += P^T dO;  dK += dS^T Q / sqrt(D);  dQ += dS K / sqrt(D)
// P^T and dS^T are rounded to the operand dtype for their GEMMs, as on GPUs. dK and dV of a key
// block are final when the query chunks of every head of the group are done; dQ gathers over
// key blocks in increasing order in an fp32 [T, D] buffer per query head (fp32 tensors
// accumulate in dqkv itself). Every sum runs in a fixed order inside one task, so results do
// not depend on the thread count.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "runtime/cpu/cpu_backend.hpp"
#include "runtime/cpu/gemm.hpp"
#include "runtime/cpu/simd.hpp"
#include "runtime/threads.hpp"

namespace meshtrain::cpu {
namespace {

// Forward tiles: kQueryRows is the M of both GEMMs and the unit of parallel work; kKeyChunk
// bounds the score block (kQueryRows x kKeyChunk fp32 per thread). Sequences up to kKeyChunk
// need one chunk per query block and so no online rescaling at all.
constexpr int kQueryRows = 64;
constexpr int kKeyChunk = 256;
// Backward tiles: key blocks of kKeyRows against query chunks of at most kQueryChunk queries.
// Chunks are aligned to multiples of kQueryChunk (the first one of a key block starts at its
// first key), which lets the dQ-only pass below reproduce the single pass bit for bit.
constexpr int kKeyRows = 64;
constexpr int kQueryChunk = 256;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Dims {
  int batch, seq, n_head, n_kv_head, head_size;
  int group() const { return n_head / n_kv_head; }
  std::int64_t channels() const { return static_cast<std::int64_t>(n_head) * head_size; }
  std::int64_t qkv_ld() const {
    return (n_head + 2 * static_cast<std::int64_t>(n_kv_head)) * head_size;
  }
  // Column of part 0 (q, of query head `head`), 1 (k) or 2 (v, of key/value head `head`).
  std::int64_t col(int part, int head) const {
    const std::int64_t first = part == 0 ? 0 : part == 1 ? n_head : n_head + n_kv_head;
    return (first + head) * head_size;
  }
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(head_size)); }
};

// ---- row kernels: the O(T^2) elementwise work, vectorised ---------------------------------

// The largest of x[0, n); -inf when n is 0.
inline float row_max(const float* x, int n) {
#if MT_CPU_AVX512
  __m512 mx = _mm512_set1_ps(kNegInf);
  for (int j = 0; j < n; j += 16)
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, lanes_below(n - j), x + j));
  return _mm512_reduce_max_ps(mx);
#else
  float mx = kNegInf;
  for (int j = 0; j < n; ++j) mx = std::max(mx, x[j]);
  return mx;
#endif
}

// p[j] = exp(x[j] - sub) for j < valid and 0 for valid <= j < n, stored in the operand dtype.
// Returns the fp32 sum of the exponentials. p may alias x (fp32).
template <typename T>
float softmax_row(const float* x, float sub, int valid, int n, T* p) {
#if MT_CPU_AVX512
  __m512 sum = _mm512_setzero_ps();
  const __m512 vsub = _mm512_set1_ps(sub);
  for (int j = 0; j < n; j += 16) {
    const __mmask16 live = lanes_below(valid - j);
    const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(load16(x + j, live), vsub)));
    sum = _mm512_add_ps(sum, e);
    store16(p + j, e, lanes_below(n - j));
  }
  return _mm512_reduce_add_ps(sum);
#else
  float sum = 0.0f;
  for (int j = 0; j < n; ++j) {
    const float e = j < valid ? std::exp(x[j] - sub) : 0.0f;
    sum += e;
    p[j] = from_float<T>(e);
  }
  return sum;
#endif
}

// One row of a transposed score block (key k against queries c of the chunk): for c >= c0,
// p = exp(s[c] - lse[c]) and ds = p (dp[c] - delta[c]); for c < c0 (queries before the key)
// both are 0. p may alias s and ds may alias dp (fp32).
template <typename T>
void grad_row(const float* s, const float* dp, const float* lse, const float* delta, int c0, int n,
              T* p, T* ds) {
#if MT_CPU_AVX512
  for (int c = 0; c < n; c += 16) {
    const __mmask16 tail = lanes_below(n - c);
    const __mmask16 live = static_cast<__mmask16>(tail & ~lanes_below(std::max(c0 - c, 0)));
    const __m512 e = exp512(_mm512_sub_ps(load16(s + c, live), load16(lse + c, live)));
    const __m512 pv = _mm512_maskz_mov_ps(live, e);
    const __m512 dv =
        _mm512_mul_ps(pv, _mm512_sub_ps(load16(dp + c, live), load16(delta + c, live)));
    store16(p + c, pv, tail);
    store16(ds + c, dv, tail);
  }
#else
  for (int c = 0; c < n; ++c) {
    const float pv = c >= c0 ? std::exp(s[c] - lse[c]) : 0.0f;
    const float dv = c >= c0 ? pv * (dp[c] - delta[c]) : 0.0f;
    p[c] = from_float<T>(pv);
    ds[c] = from_float<T>(dv);
  }
#endif
}

// dst[j] = src[j] * mul in the operand dtype.
template <typename T>
void store_row(T* dst, const float* src, int n, float mul) {
#if MT_CPU_AVX512
  const __m512 vm = _mm512_set1_ps(mul);
  for (int j = 0; j < n; j += 16) {
    const __mmask16 m = lanes_below(n - j);
    store16(dst + j, _mm512_mul_ps(load16(src + j, m), vm), m);
  }
#else
  for (int j = 0; j < n; ++j) dst[j] = from_float<T>(src[j] * mul);
#endif
}

// Sum of a[j] * b[j] in fp32.
template <typename T>
float dot_row(const T* a, const T* b, int n) {
#if MT_CPU_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    const __mmask16 m = lanes_below(n - j);
    acc = _mm512_fmadd_ps(load16(a + j, m), load16(b + j, m), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float acc = 0.0f;
  for (int j = 0; j < n; ++j) acc += to_float(a[j]) * to_float(b[j]);
  return acc;
#endif
}

// ---- forward ------------------------------------------------------------------------------

// Per-thread forward scratch. probs is the P operand of P V; fp32 reuses scores in place.
template <typename T>
struct ForwardScratch {
  static constexpr std::size_t kBlock = static_cast<std::size_t>(kQueryRows) * kKeyChunk;

  explicit ForwardScratch(int head_size)
      : scores(kBlock),
        probs(std::is_same_v<T, float> ? 0 : kBlock),
        acc(static_cast<std::size_t>(kQueryRows) * head_size),
        row_max(kQueryRows),
        row_sum(kQueryRows) {}

  T* p() {
    if constexpr (std::is_same_v<T, float>)
      return scores.data();
    else
      return probs.data();
  }

  std::vector<float> scores;
  std::vector<T> probs;
  std::vector<float> acc, row_max, row_sum;
};

template <typename T>
void forward_block(const Dims& d, const T* qkv, T* out, float* lse, int b, int h, int q0,
                   ForwardScratch<T>& s) {
  const int hd = d.head_size;
  const std::int64_t ld = d.qkv_ld(), c = d.channels();
  const int rows = std::min(kQueryRows, d.seq - q0);
  const int q_end = q0 + rows;
  const T* base = qkv + static_cast<std::int64_t>(b) * d.seq * ld;
  const T* q = base + d.col(0, h) + q0 * ld;
  const T* k = base + d.col(1, h / d.group());
  const T* v = base + d.col(2, h / d.group());
  float* m = s.row_max.data();
  float* l = s.row_sum.data();
  float* acc = s.acc.data();
  T* p = s.p();
  std::fill(m, m + rows, kNegInf);
  std::fill(l, l + rows, 0.0f);
  for (int k0 = 0; k0 < q_end; k0 += kKeyChunk) {
    const int n = std::min(kKeyChunk, q_end - k0);
    gemm_f32(false, true, rows, n, hd, q, ld, k + k0 * ld, ld, DTypeOf<T>::value, s.scores.data(),
             kKeyChunk, d.scale(), 0.0f);
    for (int r = 0; r < rows; ++r) {
      // Keys k0 .. q of this chunk are visible to query q = q0 + r.
      const int valid = std::clamp(q0 + r - k0 + 1, 0, n);
      const float* srow = s.scores.data() + static_cast<std::int64_t>(r) * kKeyChunk;
      // Finite: the first chunk always holds key 0, which every query sees.
      const float m_new = std::max(m[r], row_max(srow, valid));
      const float corr = std::exp(m[r] - m_new);  // 0 on the first chunk (m = -inf)
      l[r] = l[r] * corr +
             softmax_row(srow, m_new, valid, n, p + static_cast<std::int64_t>(r) * kKeyChunk);
      if (k0 > 0 && corr != 1.0f) {
        float* arow = acc + static_cast<std::int64_t>(r) * hd;
        for (int j = 0; j < hd; ++j) arow[j] *= corr;
      }
      m[r] = m_new;
    }
    gemm_f32(false, false, rows, hd, n, p, kKeyChunk, v + k0 * ld, ld, DTypeOf<T>::value, acc, hd,
             1.0f, k0 == 0 ? 0.0f : 1.0f);
  }
  T* o = out + (static_cast<std::int64_t>(b) * d.seq + q0) * c + static_cast<std::int64_t>(h) * hd;
  float* lse_row = lse + (static_cast<std::int64_t>(b) * d.n_head + h) * d.seq + q0;
  for (int r = 0; r < rows; ++r) {
    store_row(o + r * c, acc + static_cast<std::int64_t>(r) * hd, hd, 1.0f / l[r]);
    lse_row[r] = m[r] + std::log(l[r]);
  }
}

// ---- backward -----------------------------------------------------------------------------

// Everything one backward task reads and writes, with the per-thread scratch.
template <typename T>
struct BackwardTask {
  const Dims& d;
  const T* qkv;
  const T* dout;
  const float* lse;    // [B, H, T]
  const float* delta;  // [B, H, T]: rowsum(dO o O)
  T* dqkv;
  // Scratch: transposed scores and their gradients (kKeyRows x kQueryChunk), the 16-bit
  // operands made from them (fp32 uses the fp32 blocks in place), dK and dV of one key block,
  // and the dQ rows this task gathers, dq_rows per query head for dq_heads heads (fp32 dtype
  // writes all three straight into dqkv).
  std::vector<float> st, dpt;
  std::vector<T> pt, dst;
  std::vector<float> dk, dv, dq;
  std::int64_t dq_rows;

  static constexpr bool kDirect = std::is_same_v<T, float>;
  static constexpr std::size_t kBlock = static_cast<std::size_t>(kKeyRows) * kQueryChunk;

  BackwardTask(const Dims& dims, const T* qkv_, const T* dout_, const float* lse_,
               const float* delta_, T* dqkv_, int dq_rows_, int dq_heads)
      : d(dims),
        qkv(qkv_),
        dout(dout_),
        lse(lse_),
        delta(delta_),
        dqkv(dqkv_),
        st(kBlock),
        dpt(kBlock),
        pt(kDirect ? 0 : kBlock),
        dst(kDirect ? 0 : kBlock),
        dk(kDirect ? 0 : static_cast<std::size_t>(kKeyRows) * dims.head_size),
        dv(kDirect ? 0 : static_cast<std::size_t>(kKeyRows) * dims.head_size),
        dq(kDirect ? 0 : static_cast<std::size_t>(dq_rows_) * dq_heads * dims.head_size),
        dq_rows(dq_rows_) {}

  std::int64_t row(int b, int t) const { return static_cast<std::int64_t>(b) * d.seq + t; }
  // Element (b, t) of part (0 q, 1 k, 2 v) of a head in a [B, T, (H + 2 KV) D] tensor: a query
  // head for part 0, a key/value head for parts 1 and 2.
  std::int64_t qkv_at(int b, int head, int t, int part) const {
    return row(b, t) * d.qkv_ld() + d.col(part, head);
  }
  T* p_op() {
    if constexpr (kDirect)
      return st.data();
    else
      return pt.data();
  }
  T* ds_op() {
    if constexpr (kDirect)
      return dpt.data();
    else
      return dst.data();
  }

  // P^T and dS^T of keys [k0, k0 + kc) against the queries [qs, qs + nq) of query head h,
  // qs >= k0, into p_op() and ds_op() (leading dimension kQueryChunk).
  void grads(int b, int h, int k0, int kc, int qs, int nq) {
    const std::int64_t ld = d.qkv_ld(), c = d.channels();
    const int hd = d.head_size, g = h / d.group();
    const DType type = DTypeOf<T>::value;
    gemm_f32(false, true, kc, nq, hd, qkv + qkv_at(b, g, k0, 1), ld, qkv + qkv_at(b, h, qs, 0), ld,
             type, st.data(), kQueryChunk, d.scale(), 0.0f);
    gemm_f32(false, true, kc, nq, hd, qkv + qkv_at(b, g, k0, 2), ld,
             dout + row(b, qs) * c + static_cast<std::int64_t>(h) * hd, c, type, dpt.data(),
             kQueryChunk, 1.0f, 0.0f);
    const std::int64_t stats = (static_cast<std::int64_t>(b) * d.n_head + h) * d.seq + qs;
    for (int r = 0; r < kc; ++r) {
      const std::int64_t off = static_cast<std::int64_t>(r) * kQueryChunk;
      // Key k0 + r is seen by queries from k0 + r on.
      grad_row(st.data() + off, dpt.data() + off, lse + stats, delta + stats, k0 + r - qs, nq,
               p_op() + off, ds_op() + off);
    }
  }

  // dQ[qs, qs + nq) of query head h (+)= dS K / sqrt(D) for key block [k0, k0 + kc), into
  // dq slot `slot`, whose first row is query dq_row0. Key block 0 writes, the later ones
  // accumulate.
  void add_dq(int b, int h, int k0, int kc, int qs, int nq, int dq_row0, int slot) {
    const int hd = d.head_size;
    float* out;
    std::int64_t ldc;
    if constexpr (kDirect) {
      out = dqkv + qkv_at(b, h, qs, 0);
      ldc = d.qkv_ld();
    } else {
      out = dq.data() + (slot * dq_rows + qs - dq_row0) * hd;
      ldc = hd;
    }
    gemm_f32(true, false, nq, hd, kc, ds_op(), kQueryChunk, qkv + qkv_at(b, h / d.group(), k0, 1),
             d.qkv_ld(), DTypeOf<T>::value, out, ldc, d.scale(), k0 == 0 ? 0.0f : 1.0f);
  }

  // Writes the fp32 dQ rows [q0, q0 + n) of query head h gathered in dq slot `slot` (row
  // dq_row0 first) to dqkv.
  void store_dq(int b, int h, int q0, int n, int dq_row0, int slot) {
    if constexpr (!kDirect) {
      const int hd = d.head_size;
      for (int t = q0; t < q0 + n; ++t)
        store_row(dqkv + qkv_at(b, h, t, 0), dq.data() + (slot * dq_rows + t - dq_row0) * hd, hd,
                  1.0f);
    }
  }

  // dK and dV of key block [k0, k0 + kc) of key/value head g: the sum over the query heads of
  // its group, in order; with_dq: also their dQ contributions (query head h into slot h - first).
  void key_block(int b, int g, int k0, bool with_dq) {
    const int kc = std::min(kKeyRows, d.seq - k0);
    const int hd = d.head_size;
    const std::int64_t ld = d.qkv_ld(), c = d.channels();
    const DType type = DTypeOf<T>::value;
    float* dk_out = dk.data();
    float* dv_out = dv.data();
    std::int64_t ldo = hd;
    if constexpr (kDirect) {
      dk_out = dqkv + qkv_at(b, g, k0, 1);
      dv_out = dqkv + qkv_at(b, g, k0, 2);
      ldo = ld;
    }
    const int first = g * d.group();
    for (int h = first; h < first + d.group(); ++h) {
      for (int qs = k0; qs < d.seq;) {
        const int qe = std::min(d.seq, (qs / kQueryChunk + 1) * kQueryChunk);
        const int nq = qe - qs;
        grads(b, h, k0, kc, qs, nq);
        const float beta = h == first && qs == k0 ? 0.0f : 1.0f;
        gemm_f32(false, false, kc, hd, nq, p_op(), kQueryChunk,
                 dout + row(b, qs) * c + static_cast<std::int64_t>(h) * hd, c, type, dv_out, ldo,
                 1.0f, beta);
        gemm_f32(false, false, kc, hd, nq, ds_op(), kQueryChunk, qkv + qkv_at(b, h, qs, 0), ld,
                 type, dk_out, ldo, d.scale(), beta);
        if (with_dq) add_dq(b, h, k0, kc, qs, nq, 0, h - first);
        qs = qe;
      }
    }
    if constexpr (!kDirect) {
      for (int r = 0; r < kc; ++r) {
        store_row(dqkv + qkv_at(b, g, k0 + r, 1), dk.data() + static_cast<std::int64_t>(r) * hd, hd,
                  1.0f);
        store_row(dqkv + qkv_at(b, g, k0 + r, 2), dv.data() + static_cast<std::int64_t>(r) * hd, hd,
                  1.0f);
      }
    }
  }

  // dQ of query head h on the aligned query chunk [q0, q0 + kQueryChunk): the same GEMMs on
  // the same blocks, in the same key order, as key_block(with_dq) performs for these rows.
  void query_chunk(int b, int h, int q0) {
    const int qe = std::min(d.seq, q0 + kQueryChunk);
    for (int k0 = 0; k0 < qe; k0 += kKeyRows) {
      const int kc = std::min(kKeyRows, d.seq - k0);
      const int qs = std::max(q0, k0);
      grads(b, h, k0, kc, qs, qe - qs);
      add_dq(b, h, k0, kc, qs, qe - qs, q0, 0);
    }
    store_dq(b, h, q0, qe - q0, q0, 0);
  }
};

int blocks(int n, int size) {
  return (n + size - 1) / size;
}

}  // namespace

void CpuBackend::attention_forward(Tensor& out, Tensor& lse, const Tensor& qkv, int batch, int seq,
                                   int n_head, int n_kv_head, int head_size) {
  const Dims d{batch, seq, n_head, n_kv_head, head_size};
  float* lse_data = static_cast<float*>(lse.data());
  dispatch_float(qkv.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(qkv.data());
    T* o = static_cast<T*>(out.data());
    const int q_blocks = blocks(seq, kQueryRows);
    const std::int64_t tasks = static_cast<std::int64_t>(batch) * n_head * q_blocks;
    // Query blocks are the unit of work, so that few heads still fill the threads. Later blocks
    // see more keys: handing out the heaviest first balances the dynamic schedule.
#pragma omp parallel if (tasks > 1)
    {
      ForwardScratch<T> scratch(head_size);
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t i = 0; i < tasks; ++i) {
        const int qb =
            q_blocks - 1 - static_cast<int>(i / (static_cast<std::int64_t>(batch) * n_head));
        const int bh = static_cast<int>(i % (static_cast<std::int64_t>(batch) * n_head));
        forward_block(d, in, o, lse_data, bh / n_head, bh % n_head, qb * kQueryRows, scratch);
      }
    }
  });
}

void CpuBackend::attention_backward(Tensor& dqkv, const Tensor& dout, const Tensor& qkv,
                                    const Tensor& out, const Tensor& lse, int batch, int seq,
                                    int n_head, int n_kv_head, int head_size) {
  const Dims d{batch, seq, n_head, n_kv_head, head_size};
  const int heads = batch * n_head, kv_heads = batch * n_kv_head, group = d.group();
  const std::int64_t c = d.channels();
  std::vector<float> delta(static_cast<std::size_t>(heads) * seq);
  const float* lse_data = static_cast<const float*>(lse.data());
  dispatch_float(qkv.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(qkv.data());
    const T* o = static_cast<const T*>(out.data());
    const T* g = static_cast<const T*>(dout.data());
    T* gin = static_cast<T*>(dqkv.data());
    // delta_t = rowsum(dO o O) of query head bh, read where a task needs it rather than in a
    // pass of its own: one parallel region (and one barrier) fewer.
    float* dl = delta.data();
    auto head_delta = [&](int bh) {
      const std::int64_t b = bh / n_head, h = bh % n_head;
      for (int t = 0; t < seq; ++t) {
        const std::int64_t at = (b * seq + t) * c + h * head_size;
        dl[static_cast<std::int64_t>(bh) * seq + t] = dot_row(g + at, o + at, head_size);
      }
    };
    if (kv_heads >= cpu_threads()) {
      // One task per key/value head: dK, dV and the dQ of its query heads in one sweep, each
      // GEMM and exp done once.
#pragma omp parallel if (kv_heads > 1)
      {
        BackwardTask<T> task(d, in, g, lse_data, dl, gin, seq, group);
#pragma omp for schedule(dynamic, 1)
        for (int bg = 0; bg < kv_heads; ++bg) {
          const int b = bg / n_kv_head, first = (bg % n_kv_head) * group;
          for (int h = first; h < first + group; ++h) head_delta(b * n_head + h);
          for (int k0 = 0; k0 < seq; k0 += kKeyRows) task.key_block(b, bg % n_kv_head, k0, true);
          for (int h = first; h < first + group; ++h) task.store_dq(b, h, 0, seq, 0, h - first);
        }
      }
      return;
    }
    // Fewer key/value heads than threads: split into independent tasks per key block (dK, dV)
    // and per query head and chunk (dQ). The two score GEMMs and the exp are done twice, but
    // every thread has work, and the results are bit-identical to the single sweep.
    const int k_blocks = blocks(seq, kKeyRows), q_chunks = blocks(seq, kQueryChunk);
    const std::int64_t dq_tasks = static_cast<std::int64_t>(heads) * q_chunks;
    const std::int64_t tasks = dq_tasks + static_cast<std::int64_t>(kv_heads) * k_blocks;
#pragma omp parallel
    {
      BackwardTask<T> task(d, in, g, lse_data, dl, gin, kQueryChunk, 1);
      // Every task of a head reads its delta: the implicit barrier after this loop orders them.
#pragma omp for schedule(static)
      for (int bh = 0; bh < heads; ++bh) head_delta(bh);
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t i = 0; i < tasks; ++i) {
        // The dQ chunks, which sweep the most key blocks, are handed out first.
        if (i < dq_tasks) {
          const int bh = static_cast<int>(i % heads);
          const int j = static_cast<int>(i / heads);
          task.query_chunk(bh / n_head, bh % n_head, (q_chunks - 1 - j) * kQueryChunk);
        } else {
          const std::int64_t k = i - dq_tasks;
          const int bg = static_cast<int>(k % kv_heads);
          const int j = static_cast<int>(k / kv_heads);
          task.key_block(bg / n_kv_head, bg % n_kv_head, j * kKeyRows, false);
        }
      }
    }
  });
}

}  // namespace meshtrain::cpu
