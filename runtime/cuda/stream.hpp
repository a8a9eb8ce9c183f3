// Move-only RAII for CUDA streams and events, and the choice of one GPU per local rank.
// Destructors never throw: a failure there is logged.
#pragma once

#include <cuda_runtime.h>

namespace meshtrain::cuda {

class Stream {
 public:
  // A non-blocking stream on the current device, with the given priority (lower = higher).
  explicit Stream(int priority = 0);
  ~Stream();
  Stream(Stream&& o) noexcept : stream_(o.stream_) { o.stream_ = nullptr; }
  Stream& operator=(Stream&& o) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  cudaStream_t get() const { return stream_; }
  void synchronize() const;

 private:
  cudaStream_t stream_ = nullptr;
};

class Event {
 public:
  // Timing disabled unless asked: such events are cheaper to record and wait on.
  explicit Event(bool timing = false);
  ~Event();
  Event(Event&& o) noexcept : event_(o.event_) { o.event_ = nullptr; }
  Event& operator=(Event&& o) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  cudaEvent_t get() const { return event_; }
  void record(cudaStream_t stream);
  // Makes `stream` wait for this event (device-side; the host does not block).
  void block(cudaStream_t stream) const;
  bool query() const;
  void synchronize() const;
  // Milliseconds between two recorded timing events.
  float elapsed_ms(const Event& later) const;

 private:
  cudaEvent_t event_ = nullptr;
};

// Number of visible GPUs; 0 when there is no driver or no device (never throws for that).
int device_count();
// The GPU for a rank that is local_rank-th on its node: local_rank modulo the visible count.
// Throws CudaError when there is no GPU.
int device_for_local_rank(int local_rank);

}  // namespace meshtrain::cuda
