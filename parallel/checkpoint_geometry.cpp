#include "parallel/checkpoint_geometry.hpp"

#include <algorithm>

#include "runtime/error.hpp"

namespace meshtrain::parallel::ckpt {
namespace {

// Appends a copy, extending the last one when it continues it in both the target and the piece.
void add_copy(LoadPlan& plan, const CopyRun& c) {
  if (!plan.copies.empty()) {
    CopyRun& last = plan.copies.back();
    if (last.target == c.target && last.piece == c.piece && last.dst + last.length == c.dst &&
        last.src + last.length == c.src) {
      last.length += c.length;
      return;
    }
  }
  plan.copies.push_back(c);
}

// One box of a slot as a loading rank holds it: its local elements [base, base + box.numel())
// of the flat buffers, of which the target needs [a, e).
struct TargetBox {
  const ParamSlot& slot;
  const Box& box;
  std::int64_t base, a, e;
};

// The runs of piece `pi` that fall in a target box, row by row through the piece's elements.
void plan_piece(LoadPlan& plan, std::size_t t, const LoadTarget& target, const Piece& p,
                std::size_t pi, const TargetBox& tb, std::vector<std::uint8_t>& covered,
                const std::string& where) {
  const Box& b = tb.box;
  const std::size_t nd = b.shape.size();
  bool overlap = true;
  for (std::size_t d = 0; d < nd && overlap; ++d)
    overlap = p.box.offsets[d] < b.offsets[d] + b.shape[d] &&
              b.offsets[d] < p.box.offsets[d] + p.box.shape[d];
  const std::int64_t pw = p.box.shape.back();
  if (!overlap || p.flat_hi == p.flat_lo || pw == 0) return;
  const std::int64_t width = b.shape.back(), col0 = b.offsets[nd - 1];
  std::vector<std::int64_t> idx(nd, 0);
  for (std::int64_t r = p.flat_lo / pw; r * pw < p.flat_hi; ++r) {
    const std::int64_t c0 = std::max<std::int64_t>(p.flat_lo - r * pw, 0);
    const std::int64_t c1 = std::min<std::int64_t>(p.flat_hi - r * pw, pw);
    // Row r's index in the piece's box, then in full coordinates, then in the target box's.
    std::int64_t rem = r, row = 0, stride = 1;
    bool inside = true;
    for (int d = static_cast<int>(nd) - 2; d >= 0; --d) {
      idx[d] = rem % p.box.shape[d];
      rem /= p.box.shape[d];
    }
    for (int d = static_cast<int>(nd) - 2; d >= 0 && inside; --d) {
      const std::int64_t local = p.box.offsets[d] + idx[d] - b.offsets[d];
      inside = local >= 0 && local < b.shape[d];
      row += local * stride;
      stride *= b.shape[d];
    }
    if (!inside) continue;
    if (tb.slot.real_rows >= 0 && p.box.offsets[0] + idx[0] >= tb.slot.real_rows)
      continue;  // padding, zero-filled
    // Columns [c0, c1) of the piece's row in full coordinates, clipped to the target box, then
    // to the target's range [a, e).
    const std::int64_t g_lo = std::max(p.box.offsets[nd - 1] + c0, col0);
    const std::int64_t g_hi = std::min(p.box.offsets[nd - 1] + c1, col0 + width);
    const std::int64_t row_flat = tb.base + row * width - col0;  // flat element of column 0
    const std::int64_t f_lo = std::max(row_flat + g_lo, tb.a);
    const std::int64_t f_hi = std::min(row_flat + g_hi, tb.e);
    if (f_hi <= f_lo) continue;
    const std::int64_t g = f_lo - row_flat;
    for (std::int64_t f = f_lo; f < f_hi; ++f) {
      std::uint8_t& c = covered[static_cast<std::size_t>(f - target.flat_lo)];
      MT_CHECK(c == 0, "{}: element {} of '{}' ({}) is stored twice", where, f - tb.base,
               tb.slot.name, target.kind);
      c = 1;
    }
    add_copy(plan, CopyRun{t, pi, f_lo - target.flat_lo,
                           r * pw + (g - p.box.offsets[nd - 1]) - p.flat_lo, f_hi - f_lo});
  }
}

}  // namespace

std::int64_t Box::numel() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

std::string shard_file_name(int world_rank) {
  return fmt::format("shard-{:05}.safetensors", world_rank);
}

std::vector<Box> shard_boxes(const ParamSlot& s, int tp_rank, int tp_size) {
  const auto full = s.full_shape.to_vector();
  const auto local = s.shape.to_vector();
  MT_ASSERT(full.size() == local.size(),
            "tensor '{}': local shape {} and full shape {} differ in rank", s.name, s.shape.str(),
            s.full_shape.str());
  if (s.shard_dim < 0) {
    MT_ASSERT(full == local, "tensor '{}' is replicated but its shape {} is not the full {}",
              s.name, s.shape.str(), s.full_shape.str());
    return {Box{std::vector<std::int64_t>(full.size(), 0), full}};
  }
  const int k = s.shard_dim, parts = s.shard_parts;
  MT_ASSERT(k < static_cast<int>(full.size()) && parts >= 1, "tensor '{}': bad shard dim {}",
            s.name, k);
  MT_CHECK(parts == 1 || k == 0,
           "checkpoint: tensor '{}' is sharded in {} parts along dimension {}; only dimension 0 "
           "supports parts",
           s.name, parts, k);
  // Replicated slices (ParamSlot::max_shards): the ranks sharing a slice hold the same box.
  const int slices = s.shard_count(tp_size), index = s.shard_index(tp_rank, tp_size);
  const std::int64_t block = full[k] / parts, slice = block / slices;
  MT_ASSERT(block * parts == full[k] && slice * slices == block && slice * parts == local[k],
            "tensor '{}': full {} in {} parts over TP {} ({} slices) does not give the local {}",
            s.name, s.full_shape.str(), parts, tp_size, slices, s.shape.str());
  std::vector<Box> out;
  for (int p = 0; p < parts; ++p) {
    Box b{std::vector<std::int64_t>(full.size(), 0), local};
    b.offsets[k] = p * block + index * slice;
    b.shape[k] = slice;
    out.push_back(b);
  }
  return out;
}

std::vector<FlatRun> default_writes(std::int64_t flat_numel, int dp_rank, int dp_size) {
  const std::int64_t chunk = (flat_numel + dp_size - 1) / dp_size;
  const std::int64_t lo = std::min(flat_numel, chunk * dp_rank);
  return {FlatRun{lo, 0, std::min(flat_numel, lo + chunk) - lo}};
}

std::vector<Piece> writer_pieces(std::span<const ParamSlot> slots, std::span<const FlatRun> runs,
                                 const std::vector<std::string>& kinds, int tp_rank, int tp_size,
                                 int world_rank) {
  std::vector<Piece> out;
  for (const std::string& kind : kinds) {
    for (const FlatRun& run : runs) {
      const std::int64_t lo = run.flat, hi = run.flat + run.length;
      for (std::size_t i = 0; i < slots.size(); ++i) {
        const ParamSlot& s = slots[i];
        // A tied copy (the last pipeline stage's wte) equals the original, which is written.
        if (s.tied_copy) continue;
        // Every TP rank holds a replicated tensor: one of them writes it, in turn by tensor so
        // that the writing stays spread.
        if (s.replicated() && static_cast<int>(i % static_cast<std::size_t>(tp_size)) != tp_rank)
          continue;
        // A slice held by several ranks (ParamSlot::max_shards): one of its replicas writes it,
        // again in turn by tensor.
        const int reps = s.replicas(tp_size);
        if (reps > 1 && static_cast<int>(i % static_cast<std::size_t>(reps)) != tp_rank % reps)
          continue;
        const std::vector<Box> boxes = shard_boxes(s, tp_rank, tp_size);
        std::int64_t local = s.offset;
        for (std::size_t b = 0; b < boxes.size(); ++b) {
          const std::int64_t n = boxes[b].numel();
          const std::int64_t a = std::max(lo, local), e = std::min(hi, local + n);
          if (a < e) {
            Piece p;
            p.tensor = s.name;
            p.kind = kind;
            p.file = shard_file_name(world_rank);
            p.key = fmt::format("{}/{}#{}@{}", kind, s.name, b, a - local);
            p.box = boxes[b];
            p.flat_lo = a - local;
            p.flat_hi = e - local;
            p.src = a;
            out.push_back(p);
          }
          local += n;
        }
      }
    }
  }
  return out;
}

LoadPlan plan_load(std::span<const Piece> pieces, std::span<const ParamSlot> slots,
                   std::span<const LoadTarget> targets, int tp_rank, int tp_size,
                   const std::string& where) {
  LoadPlan plan;
  for (std::size_t t = 0; t < targets.size(); ++t) {
    const LoadTarget& target = targets[t];
    const std::int64_t lo = target.flat_lo, hi = target.flat_hi;
    if (hi <= lo) continue;
    std::vector<std::uint8_t> covered(static_cast<std::size_t>(hi - lo), 0);
    for (const ParamSlot& s : slots) {
      std::int64_t local = s.offset;
      for (const Box& box : shard_boxes(s, tp_rank, tp_size)) {
        const TargetBox tb{s, box, local, std::max(lo, local), std::min(hi, local + box.numel())};
        local += box.numel();
        if (tb.a >= tb.e) continue;
        MT_ASSERT(s.real_rows < 0 || box.shape.size() >= 2,
                  "tensor '{}': real_rows needs 2 or more dimensions", s.name);
        if (s.real_rows >= 0) {
          // Rows from real_rows on are padding: a suffix of the box's elements.
          const std::int64_t rows = box.shape[0],
                             row_elems = box.numel() / std::max<std::int64_t>(rows, 1);
          const std::int64_t first =
              tb.base + std::clamp<std::int64_t>(s.real_rows - box.offsets[0], 0, rows) * row_elems;
          const std::int64_t z = std::max(tb.a, first);
          if (z < tb.e) {
            plan.zeros.push_back(ZeroRun{t, z - lo, tb.e - z});
            std::fill(covered.begin() + (z - lo), covered.begin() + (tb.e - lo), 1);
          }
        }
        for (std::size_t pi = 0; pi < pieces.size(); ++pi)
          if (pieces[pi].tensor == s.name && pieces[pi].kind == target.kind)
            plan_piece(plan, t, target, pieces[pi], pi, tb, covered, where);
      }
    }
    const auto missing = std::find(covered.begin(), covered.end(), 0);
    if (missing != covered.end()) {
      const std::int64_t at = lo + (missing - covered.begin());
      std::string name = "?";
      for (const ParamSlot& s : slots)
        if (at >= s.offset && at < s.offset + s.numel()) name = s.name;
      MT_FAIL(
          "{}: no piece holds element {} of this rank's '{}' state (tensor '{}'): the "
          "checkpoint is incomplete",
          where, at, target.kind, name);
    }
  }
  return plan;
}

}  // namespace meshtrain::parallel::ckpt
