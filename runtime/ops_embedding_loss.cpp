// The token ends of a model: the embedding (token + position) forward and backward, and the
// cross-entropy loss (forward, backward, and the vocab-parallel pieces: combine and the split
// backward).
#include "runtime/ops.hpp"

#include <cmath>
#include <initializer_list>
#include <string>

#include "runtime/backend.hpp"
#include "runtime/ops_impl.hpp"

namespace meshtrain::ops {

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

}  // namespace meshtrain::ops
