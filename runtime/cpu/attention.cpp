// PLACEHOLDER: replaced by the flash-attention implementation.
#include "runtime/cpu/cpu_backend.hpp"

namespace meshtrain::cpu {

void CpuBackend::attention_forward(Tensor&, Tensor&, const Tensor&, int, int, int, int) {
  MT_FAIL("attention_forward: not implemented yet");
}
void CpuBackend::attention_backward(Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                    const Tensor&, int, int, int, int) {
  MT_FAIL("attention_backward: not implemented yet");
}

}  // namespace meshtrain::cpu
