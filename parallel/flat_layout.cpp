#include "parallel/flat_layout.hpp"

#include "runtime/error.hpp"

namespace meshtrain::parallel {

std::int64_t flat_numel(std::span<const ParamSlot> slots, const char* who) {
  std::int64_t expect = 0;
  for (const ParamSlot& s : slots) {
    MT_CHECK(s.offset == expect && s.numel() > 0,
             "{}: parameters must tile the flat buffer in order (parameter '{}' at {} of {} "
             "elements, expected offset {})",
             who, s.name, s.offset, s.numel(), expect);
    expect += s.numel();
  }
  return expect;
}

Tensor slot_view(const Tensor& flat, const ParamSlot& s) {
  return flat.slice(s.offset, s.numel()).view(s.shape);
}

}  // namespace meshtrain::parallel
