// What the conformance suite's files (suite.cpp: collectives, suite_p2p.cpp: point-to-point)
// share: the random inputs every rank can compute for every rank, the expected reductions with
// their tolerance, and a fake non-host device. Defined in suite_util.cpp.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "runtime/backend.hpp"
#include "runtime/device.hpp"
#include "runtime/tensor.hpp"
#include "tests/comm/suite.hpp"

namespace meshtrain::comm::commtest {

using Clock = std::chrono::steady_clock;

constexpr DType kFloatTypes[] = {DType::kF32, DType::kBF16, DType::kF16};
// 65'537 also takes the two-rank exchange path of the MPI backend (64-512 KiB).
constexpr std::int64_t kCounts[] = {1, 7, 65'537, 1'000'003};
constexpr ReduceOp kOps[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin};

std::uint64_t mix(std::uint64_t x);
std::uint64_t seed_of(DType d, std::int64_t n, int salt);
float round_to(DType d, float x);
// Rank `rank`'s element i for a given seed: uniform in [-1, 1), rounded to the dtype.
float value(DType d, std::uint64_t seed, int rank, std::int64_t i);
std::vector<float> values(DType d, std::uint64_t seed, int rank, std::int64_t n);
Tensor make(DType d, std::uint64_t seed, int rank, std::int64_t n, Device& dev = cpu_device());

// The reduction over ranks of elements [offset, offset + n), with what the tolerance needs.
struct Expected {
  std::vector<double> sum, abs;
  std::vector<float> max, min;
};

Expected expect(DType d, std::uint64_t seed, int size, std::int64_t offset, std::int64_t n);
double unit_roundoff(DType d);
// Sums may round at every step of a tree or ring (MPI user ops on 16-bit data round each
// pairwise step), so the bound grows with the number of ranks.
void check_reduced(const std::string& what, const std::vector<float>& got, ReduceOp op,
                   const Expected& e, DType d, int size);
bool contains(const std::string& s, const std::string& part);

// A device whose memory is host memory but which is not the CPU device, to exercise staging of
// non-host tensors through Device copies (what CUDA tensors take with the MPI backend).
class FakeDevice final : public Device {
 public:
  DeviceType type() const override { return DeviceType::kCUDA; }
  int index() const override { return 0; }
  std::string name() const override { return "fake:0"; }
  void* allocate(std::size_t nbytes) override { return std::malloc(nbytes == 0 ? 1 : nbytes); }
  void deallocate(void* p, std::size_t) noexcept override { std::free(p); }
  MemoryStats memory_stats() const override { return {}; }
  void reset_peak_memory() override {}
  void empty_cache() override {}
  void copy_from_host(void* dst, const void* src, std::size_t n) override { copy(dst, src, n); }
  void copy_to_host(void* dst, const void* src, std::size_t n) override { copy(dst, src, n); }
  void copy_within(void* dst, const void* src, std::size_t n) override { copy(dst, src, n); }
  void fill_zero(void* dst, std::size_t n) override { std::memset(dst, 0, n); }
  void synchronize() override {}
  meshtrain::Backend& backend() override { return cpu_device().backend(); }

 private:
  static void copy(void* dst, const void* src, std::size_t n) {
    if (n && dst != src) std::memmove(dst, src, n);
  }
};

}  // namespace meshtrain::comm::commtest
