// Position and attention: rotary embeddings (the inverse frequencies, with Llama 3.1's scaling,
// the cos/sin table, forward and backward on the fused q/k/v heads) and causal attention with
// n_kv_head key/value heads (forward, backward, and the KV-cache decode step).
#include "runtime/ops.hpp"

#include <cmath>
#include <initializer_list>
#include <string>

#include "runtime/backend.hpp"
#include "runtime/ops_impl.hpp"

namespace meshtrain::ops {

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

}  // namespace meshtrain::ops
