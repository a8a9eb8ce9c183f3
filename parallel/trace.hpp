// Per-rank traces in the Chrome trace-event JSON format (Perfetto, chrome://tracing): complete
// events ("ph": "X") with microsecond timestamps on the host's steady clock, one process per
// rank (pid = world rank) and one track per kind of work (tid: compute, point-to-point, data
// parallelism, optimizer). scripts/plot_pipeline.py draws a PNG timeline from the files.
//
// Recording costs one vector push per event and nothing when the trace is off (active() false):
// the trainer switches it on for the steps trace.steps names. Thread-safety: one thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace meshtrain::parallel {

class Trace {
 public:
  using Clock = std::chrono::steady_clock;
  enum Track { kCompute = 0, kP2p = 1, kData = 2, kOptimizer = 3 };

  void set_active(bool on) { active_ = on; }
  bool active() const { return active_; }
  // The step the following events belong to (an argument of each event).
  void set_step(int step) { step_ = step; }

  // One complete event from t0 to t1 on `track`, when active.
  void complete(const std::string& name, Track track, Clock::time_point t0, Clock::time_point t1);
  std::size_t size() const { return events_.size(); }

  // Writes the events as {"traceEvents": [...]} to `path` (atomically: a temporary file renamed),
  // with the process named `process` (e.g. "rank 3: stage 1, dp 0, tp 1") and pid = `pid`.
  // Timestamps are the steady clock's microseconds, so that the ranks of one node line up when
  // their files are opened together. Throws IoError when the file cannot be written.
  void write(const std::string& path, int pid, const std::string& process) const;

 private:
  struct Event {
    std::string name;
    Track track;
    int step;
    std::int64_t t0_us, dur_us;
  };
  bool active_ = false;
  int step_ = 0;
  std::vector<Event> events_;
};

}  // namespace meshtrain::parallel
