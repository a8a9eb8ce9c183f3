// PLACEHOLDER: replaced by the oneDNN implementation.
#include "runtime/cpu/cpu_backend.hpp"

namespace meshtrain::cpu {

void CpuBackend::matmul(Tensor&, const Tensor&, const Tensor&, std::int64_t, std::int64_t,
                        std::int64_t, const ops::MatmulOptions&) {
  MT_FAIL("matmul: not implemented yet");
}

}  // namespace meshtrain::cpu
