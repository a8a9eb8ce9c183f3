#include "runtime/cuda/stream.hpp"

#include <utility>

#include "runtime/cuda/cuda_check.hpp"
#include "runtime/error.hpp"
#include "runtime/log.hpp"

namespace meshtrain::cuda {

Stream::Stream(int priority) {
  MT_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, priority));
}

Stream::~Stream() {
  if (stream_ != nullptr) MT_CUDA_LOG(cudaStreamDestroy(stream_));
}

Stream& Stream::operator=(Stream&& o) noexcept {
  std::swap(stream_, o.stream_);
  return *this;
}

void Stream::synchronize() const {
  MT_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

Event::Event(bool timing) {
  MT_CUDA_CHECK(
      cudaEventCreateWithFlags(&event_, timing ? cudaEventDefault : cudaEventDisableTiming));
}

Event::~Event() {
  if (event_ != nullptr) MT_CUDA_LOG(cudaEventDestroy(event_));
}

Event& Event::operator=(Event&& o) noexcept {
  std::swap(event_, o.event_);
  return *this;
}

void Event::record(cudaStream_t stream) {
  MT_CUDA_CHECK(cudaEventRecord(event_, stream));
}

void Event::block(cudaStream_t stream) const {
  MT_CUDA_CHECK(cudaStreamWaitEvent(stream, event_, 0));
}

bool Event::query() const {
  return MT_CUDA_ALLOW(cudaEventQuery(event_), cudaErrorNotReady) == cudaSuccess;
}

void Event::synchronize() const {
  MT_CUDA_CHECK(cudaEventSynchronize(event_));
}

float Event::elapsed_ms(const Event& later) const {
  float ms = 0.0f;
  MT_CUDA_CHECK(cudaEventElapsedTime(&ms, event_, later.event_));
  return ms;
}

int device_count() {
  int n = 0;
  // Not checked: no driver or no device is an answer here (0), not an error.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the "no device" error
    return 0;
  }
  return n;
}

int device_for_local_rank(int local_rank) {
  const int n = device_count();
  if (n == 0)
    throw CudaError("no CUDA device is visible to this process (" + log::rank_label() + ")");
  MT_CHECK(local_rank >= 0, "local rank must be non-negative, got {}", local_rank);
  return local_rank % n;
}

}  // namespace meshtrain::cuda
