#include "parallel/trace.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "runtime/file_io.hpp"

namespace meshtrain::parallel {
namespace {

std::int64_t micros(Trace::Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::microseconds>(t.time_since_epoch()).count();
}

// JSON string contents (names are ours, but a process name may carry anything).
std::string escaped(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += fmt::format("\\u{:04x}", static_cast<int>(c));
    } else {
      out += c;
    }
  }
  return out;
}

const char* track_name(Trace::Track t) {
  switch (t) {
    case Trace::kCompute:
      return "compute";
    case Trace::kP2p:
      return "pipeline p2p";
    case Trace::kData:
      return "data parallel";
    default:
      return "optimizer";
  }
}

}  // namespace

void Trace::complete(const std::string& name, Track track, Clock::time_point t0,
                     Clock::time_point t1) {
  if (!active_) return;
  events_.push_back(
      Event{name, track, step_, micros(t0), std::max<std::int64_t>(0, micros(t1) - micros(t0))});
}

void Trace::write(const std::string& path, int pid, const std::string& process) const {
  std::string out = "{\"displayTimeUnit\": \"ms\", \"traceEvents\": [\n";
  out += fmt::format(
      "{{\"name\": \"process_name\", \"ph\": \"M\", \"pid\": {}, \"args\": {{\"name\": \"{}\"}}}}",
      pid, escaped(process));
  for (Track t : {kCompute, kP2p, kData, kOptimizer})
    out += fmt::format(
        ",\n{{\"name\": \"thread_name\", \"ph\": \"M\", \"pid\": {}, \"tid\": {}, \"args\": "
        "{{\"name\": \"{}\"}}}}",
        pid, static_cast<int>(t), track_name(t));
  for (const Event& e : events_)
    out += fmt::format(
        ",\n{{\"name\": \"{}\", \"cat\": \"{}\", \"ph\": \"X\", \"pid\": {}, \"tid\": {}, \"ts\": "
        "{}, \"dur\": {}, \"args\": {{\"step\": {}}}}}",
        escaped(e.name), track_name(e.track), pid, static_cast<int>(e.track), e.t0_us, e.dur_us,
        e.step);
  out += "\n]}\n";
  write_file_atomic(path, out);
}

}  // namespace meshtrain::parallel
