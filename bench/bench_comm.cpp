// Allreduce benchmark in the style of nccl-tests: for each message size, the time of one
// allreduce through our Communicator (MPI backend) and through raw MPI_Allreduce, in the same
// run, with algbw = bytes / time and busbw = algbw * 2(n-1)/n (the bytes every rank's link
// carries in an optimal allreduce, comparable across rank counts).
//
// Rows: fp32 (ours; ours without the ring, i.e. MPI_Iallreduce; raw MPI_Allreduce on
// MPI_FLOAT), and bf16 (ours with 16-bit data on the wire; ours with convert-reduce-convert;
// ours without the ring, i.e. MPI_Iallreduce with the bf16 user op; raw MPI_Allreduce with the
// same user op). The benchmark is the one place outside comm/ that calls MPI directly: raw MPI
// is its reference.
//
// Timing: variants are interleaved round by round (the machine may be shared), each round times
// `iters` back-to-back operations after one untimed warm-up and a barrier, and the best round's
// mean is reported.
//
//   mpirun -np 2 bench_comm [-b MIN_BYTES] [-e MAX_BYTES] [-f FACTOR] [-r ROUNDS]
//                           [-t BYTES_PER_ROUND] [-i] [-c]
//   -i: in place (default: out of place, as nccl-tests' first column); -c: check results.

// The C API only (no deprecated MPI C++ bindings to link).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "comm/mpi.hpp"
#include "comm/mpi/reduce16.hpp"
#include "runtime/dtype.hpp"
#include "runtime/error.hpp"
#include "runtime/tensor.hpp"

namespace {

using namespace meshtrain;
using namespace meshtrain::comm;

// The raw reference's bf16 op uses the same loop as ours, so that the comparison measures the
// Communicator, not two different loops.
void bf16_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  comm::detail::reduce16(DType::kBF16, ReduceOp::kSum, in, inout, static_cast<std::size_t>(*len));
}

struct Args {
  std::size_t min_bytes = 8;
  std::size_t max_bytes = 256u << 20;
  std::size_t factor = 4;
  int rounds = 10;
  std::size_t round_bytes = 32u << 20;
  bool in_place = false;
  bool check = false;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> std::string {
      MT_CHECK(i + 1 < argc, "option {} needs a value", k);
      return argv[++i];
    };
    if (k == "-b")
      a.min_bytes = std::stoull(next());
    else if (k == "-e")
      a.max_bytes = std::stoull(next());
    else if (k == "-f")
      a.factor = std::stoull(next());
    else if (k == "-r")
      a.rounds = std::stoi(next());
    else if (k == "-t")
      a.round_bytes = std::stoull(next());
    else if (k == "-i")
      a.in_place = true;
    else if (k == "-c")
      a.check = true;
    else
      MT_FAIL("unknown option '{}': expected -b, -e, -f, -r, -t, -i or -c", k);
  }
  MT_CHECK(a.min_bytes >= 4 && a.min_bytes <= a.max_bytes && a.factor >= 2 && a.rounds >= 1,
           "bad sizes: -b {} -e {} -f {} -r {}", a.min_bytes, a.max_bytes, a.factor, a.rounds);
  return a;
}

// Operations per timed round: about `target` bytes in all, at least 3. Short rounds and many
// of them: on a shared machine the best round is the one nobody else disturbed.
int iterations(std::size_t bytes, std::size_t target) {
  return static_cast<int>(
      std::clamp(static_cast<double>(target) / static_cast<double>(bytes), 3.0, 2000.0));
}

struct Variant {
  std::string name;
  DType dtype;
  std::function<void()> run;  // one allreduce
  double best_s = 1e30;
};

}  // namespace

int main(int argc, char** argv) {
  MpiSession session(&argc, &argv);
  const Args args = parse(argc, argv);
  const int n = session.size();
  const bool root = session.rank() == 0;
  CommOptions o = CommOptions::from_settings();
  MpiOptions wire_opts;
  wire_opts.reduce16 = Reduce16::kWireOp;
  MpiOptions convert_opts;
  convert_opts.reduce16 = Reduce16::kConvert;
  MpiOptions nbc_opts;  // MPI_Iallreduce at every size: what the ring is measured against
  nbc_opts.ring_min_bytes = SIZE_MAX;
  Communicator wire = session.world(o, wire_opts);
  Communicator convert = session.world(o, convert_opts);
  Communicator nbc = session.world(o, nbc_opts);
  MPI_Comm raw = MPI_COMM_NULL;
  MPI_Comm_dup(MPI_COMM_WORLD, &raw);
  MPI_Op raw_bf16_sum = MPI_OP_NULL;
  MPI_Op_create(&bf16_sum, 1, &raw_bf16_sum);

  if (root) {
    std::printf("# meshtrain bench comm: allreduce (sum), %d ranks, %s, best of %d rounds\n", n,
                args.in_place ? "in place" : "out of place", args.rounds);
    std::printf("# busbw = algbw * 2(n-1)/n; ratio = ours / raw MPI busbw, same dtype\n");
    std::printf(
        "| size (B) | count | type | variant | time (us) | algbw (GB/s) | busbw (GB/s) | vs raw "
        "|\n");
    std::printf("|---:|---:|---|---|---:|---:|---:|---:|\n");
  }
  const double bus_factor = n > 1 ? 2.0 * (n - 1) / n : 1.0;

  for (std::size_t bytes = args.min_bytes; bytes <= args.max_bytes; bytes *= args.factor) {
    const std::int64_t count32 = static_cast<std::int64_t>(bytes / 4);
    const std::int64_t count16 = static_cast<std::int64_t>(bytes / 2);
    std::vector<float> ones32(count32, 1.0f), ones16(count16, 1.0f);
    Tensor in32 = Tensor::from_floats(ones32, Shape{count32}, DType::kF32);
    Tensor out32 = args.in_place ? in32 : Tensor::empty(Shape{count32}, DType::kF32);
    Tensor in16 = Tensor::from_floats(ones16, Shape{count16}, DType::kBF16);
    Tensor out16 = args.in_place ? in16 : Tensor::empty(Shape{count16}, DType::kBF16);
    // Inputs of 1: out of place every result is exactly n (checked with -c). In place the values
    // grow by a factor n per operation up to Inf, which costs the same as any other number
    // (denormals, which would not, cannot occur).
    const void* send32 = args.in_place ? MPI_IN_PLACE : in32.data();
    const void* send16 = args.in_place ? MPI_IN_PLACE : in16.data();
    std::vector<Variant> variants;
    variants.push_back({"meshtrain", DType::kF32, [&] { wire.allreduce(in32, out32).wait(); }});
    variants.push_back({"meshtrain, no ring (MPI_Iallreduce)", DType::kF32,
                        [&] { nbc.allreduce(in32, out32).wait(); }});
    variants.push_back({"raw MPI_Allreduce", DType::kF32, [&] {
                          MPI_Allreduce(send32, out32.data(), static_cast<int>(count32), MPI_FLOAT,
                                        MPI_SUM, raw);
                        }});
    variants.push_back(
        {"meshtrain wire-op", DType::kBF16, [&] { wire.allreduce(in16, out16).wait(); }});
    variants.push_back(
        {"meshtrain convert", DType::kBF16, [&] { convert.allreduce(in16, out16).wait(); }});
    variants.push_back({"meshtrain wire-op, no ring (MPI_Iallreduce, user op)", DType::kBF16,
                        [&] { nbc.allreduce(in16, out16).wait(); }});
    variants.push_back({"raw MPI_Allreduce (user op)", DType::kBF16, [&] {
                          MPI_Allreduce(send16, out16.data(), static_cast<int>(count16),
                                        MPI_UINT16_T, raw_bf16_sum, raw);
                        }});
    const int iters = iterations(bytes, args.round_bytes);
    for (auto& v : variants) {  // warm-up: first-touch of buffers, connection setup
      for (int i = 0; i < 2; ++i) v.run();
    }
    if (args.check && !args.in_place) {
      for (auto& v : variants) {
        v.run();
        const Tensor& out = v.dtype == DType::kF32 ? out32 : out16;
        const auto got = out.to_floats();
        std::size_t bad = 0;
        for (float x : got) bad += x != static_cast<float>(n);
        MT_CHECK(bad == 0, "{} {}: {} of {} elements are not {}", v.name, dtype_name(v.dtype), bad,
                 got.size(), n);
      }
    }
    for (int round = 0; round < args.rounds; ++round) {
      for (auto& v : variants) {
        // One untimed operation first, so that every variant starts with its buffers as warm
        // as the one before it left them (the variants share buffers and run in turn).
        v.run();
        MPI_Barrier(raw);
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i) v.run();
        double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        // The slowest rank defines the time of a collective.
        MPI_Allreduce(MPI_IN_PLACE, &dt, 1, MPI_DOUBLE, MPI_MAX, raw);
        v.best_s = std::min(v.best_s, dt / iters);
      }
    }
    if (root) {
      double raw_bus[2] = {0, 0};
      for (const auto& v : variants) {
        if (v.name.rfind("raw", 0) == 0) {
          raw_bus[v.dtype == DType::kF32 ? 0 : 1] = bytes / v.best_s / 1e9 * bus_factor;
        }
      }
      for (const auto& v : variants) {
        const double algbw = bytes / v.best_s / 1e9;
        const double busbw = algbw * bus_factor;
        const std::int64_t count = v.dtype == DType::kF32 ? count32 : count16;
        const double ref = raw_bus[v.dtype == DType::kF32 ? 0 : 1];
        std::printf(
            "| %zu | %lld | %s | %s | %.1f | %.3f | %.3f | %s |\n", bytes,
            static_cast<long long>(count), std::string(dtype_name(v.dtype)).c_str(), v.name.c_str(),
            v.best_s * 1e6, algbw, busbw,
            v.name.rfind("raw", 0) == 0 ? "" : fmt::format("{:.0f}%", 100 * busbw / ref).c_str());
      }
      std::fflush(stdout);
    }
  }
  MPI_Op_free(&raw_bf16_sum);
  MPI_Comm_free(&raw);
  wire.finalize();
  convert.finalize();
  nbc.finalize();
  session.finalize();
  return 0;
}
