// The NCCL backend on CUDA tensors: every collective and dtype against a host expectation, in
// place and out of place, split, and the stream ordering. Runs under mpirun with one rank per
// GPU (ctest: one rank, since NCCL refuses two ranks on one GPU); reports skipped without a GPU.

#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <numeric>

#include <gtest/gtest.h>

#include "comm/mpi.hpp"
#include "comm/nccl/nccl.hpp"
#include "runtime/cuda/cuda_check.hpp"
#include "runtime/cuda/stream.hpp"
#include "runtime/device.hpp"
#include "runtime/error.hpp"

namespace meshtrain::comm {
namespace {

MpiSession* g_session = nullptr;

// A minimal CUDA Device for this test (runtime/cuda's Device is not available yet): plain
// cudaMalloc, copies on the given stream.
class TestCudaDevice final : public Device {
 public:
  TestCudaDevice(int index, cudaStream_t stream) : index_(index), stream_(stream) {}
  DeviceType type() const override { return DeviceType::kCUDA; }
  int index() const override { return index_; }
  std::string name() const override { return "cuda:" + std::to_string(index_); }
  void* allocate(std::size_t n) override {
    void* p = nullptr;
    MT_CUDA_CHECK(cudaMalloc(&p, n == 0 ? 1 : n));
    return p;
  }
  void deallocate(void* p, std::size_t) noexcept override { MT_CUDA_LOG(cudaFree(p)); }
  MemoryStats memory_stats() const override { return {}; }
  void reset_peak_memory() override {}
  void empty_cache() override {}
  void copy_from_host(void* d, const void* s, std::size_t n) override { copy(d, s, n); }
  void copy_to_host(void* d, const void* s, std::size_t n) override { copy(d, s, n); }
  void copy_within(void* d, const void* s, std::size_t n) override { copy(d, s, n); }
  void fill_zero(void* d, std::size_t n) override {
    MT_CUDA_CHECK(cudaMemsetAsync(d, 0, n, stream_));
    MT_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void synchronize() override { MT_CUDA_CHECK(cudaStreamSynchronize(stream_)); }
  meshtrain::Backend& backend() override { return cpu_device().backend(); }  // not used

 private:
  void copy(void* d, const void* s, std::size_t n) {
    MT_CUDA_CHECK(cudaMemcpyAsync(d, s, n, cudaMemcpyDefault, stream_));
    MT_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  int index_;
  cudaStream_t stream_;
};

float value(int rank, std::int64_t i) {
  // Small multiples of 1/16: exact in every dtype, and so are their sums over a few ranks.
  return static_cast<float>((rank + 1) * (i % 13 + 1)) / 16.0f;
}

class Nccl : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "no GPU visible";
    device_ = cuda::device_for_local_rank(g_session->local_rank());
    MT_CUDA_CHECK(cudaSetDevice(device_));
    stream_.emplace(0);
    dev_ = std::make_unique<TestCudaDevice>(device_, stream_->get());
    Communicator world = g_session->world();
    NcclOptions o;
    o.compute_stream = stream_->get();
    o.device = device_;
    comm_ = nccl_communicator(world, o);
    world.finalize();
  }
  void TearDown() override {
    if (comm_.valid()) comm_.finalize();
  }

  Tensor make(DType d, std::int64_t n, int rank) {
    std::vector<float> v(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) v[i] = value(rank, i);
    return Tensor::from_floats(v, Shape{n}, d, *dev_);
  }

  int device_ = 0;
  std::optional<cuda::Stream> stream_;
  std::unique_ptr<TestCudaDevice> dev_;
  Communicator comm_;
};

TEST_F(Nccl, AllreduceEveryOpAndDtype) {
  const int n = comm_.size();
  for (DType d : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (std::int64_t count : {1, 7, 1'000'003}) {
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin}) {
        for (bool in_place : {true, false}) {
          Tensor in = make(d, count, comm_.rank());
          Tensor out = in_place ? in : Tensor::empty(Shape{count}, d, *dev_);
          comm_.allreduce(in, out, op).wait();
          const auto got = out.to_floats();
          std::int64_t bad = 0;
          for (std::int64_t i = 0; i < count; ++i) {
            double sum = 0, mx = -INFINITY, mn = INFINITY;
            for (int r = 0; r < n; ++r) {
              sum += value(r, i);
              mx = std::max<double>(mx, value(r, i));
              mn = std::min<double>(mn, value(r, i));
            }
            const double want = op == ReduceOp::kSum   ? sum
                                : op == ReduceOp::kAvg ? sum / n
                                : op == ReduceOp::kMax ? mx
                                                       : mn;
            bad += std::fabs(got[i] - want) > 1e-2 * std::fabs(want);
          }
          EXPECT_EQ(bad, 0) << dtype_name(d) << "[" << count << "] " << reduce_op_name(op)
                            << (in_place ? " in place" : "");
        }
      }
    }
  }
}

TEST_F(Nccl, ReduceScatterAllGatherBroadcastBarrier) {
  const int n = comm_.size();
  const int me = comm_.rank();
  const std::int64_t m = 1001;
  Tensor in = make(DType::kBF16, n * m, me);
  Tensor out = Tensor::empty(Shape{m}, DType::kBF16, *dev_);
  comm_.reduce_scatter(in, out).wait();
  auto got = out.to_floats();
  for (std::int64_t j = 0; j < m; ++j) {
    double want = 0;
    for (int r = 0; r < n; ++r) want += value(r, me * m + j);
    ASSERT_NEAR(got[j], want, 1e-2 * want) << j;
  }
  Tensor all = Tensor::empty(Shape{n * m}, DType::kF32, *dev_);
  Tensor mine = make(DType::kF32, m, me);
  comm_.all_gather(mine, all).wait();
  got = all.to_floats();
  for (int r = 0; r < n; ++r) {
    for (std::int64_t j = 0; j < m; ++j) ASSERT_EQ(got[r * m + j], value(r, j));
  }
  Tensor b = make(DType::kF16, m, me);
  comm_.broadcast(b, n - 1).wait();
  got = b.to_floats();
  for (std::int64_t j = 0; j < m; ++j) ASSERT_EQ(got[j], value(n - 1, j));
  comm_.barrier().wait();
  EXPECT_THROW(comm_.allreduce(Tensor::zeros(Shape{4}, DType::kF32)), InvalidArgument)
      << "host tensors are not NCCL's";
}

// Device-timeline marks: a collective's start and end on the NCCL stream, and marks on the
// compute stream, on one clock (what GradReducer's device-time metrics are made of).
TEST_F(Nccl, DeviceTimelineMarks) {
  const std::shared_ptr<DeviceMark> origin = comm_.mark_compute();
  ASSERT_TRUE(origin) << "the NCCL backend has a device timeline";
  Tensor t = make(DType::kF32, 1 << 22, comm_.rank());
  Work w = comm_.allreduce(t);
  const std::shared_ptr<DeviceMark> after = comm_.mark_compute();
  w.wait();
  const std::shared_ptr<DeviceMark> start = w.device_start(), end = w.device_end();
  ASSERT_TRUE(start && end);
  const double a = start->ms_since(*origin), b = end->ms_since(*origin);
  EXPECT_GE(a, 0.0) << "the collective starts after what the compute stream queued before it";
  EXPECT_GE(b, a);
  EXPECT_LT(b, 60'000.0);
  EXPECT_GE(after->ms_since(*origin), 0.0);
  EXPECT_LE(origin->ms_since(*after), 0.0);
  // A host backend's marks do not exist, and marks of different kinds do not compare.
  Communicator world = g_session->world();
  EXPECT_EQ(world.mark_compute(), nullptr);
  world.finalize();
}

// Point-to-point: ncclSend/ncclRecv in one NCCL group per exchange, on the NCCL stream between
// device-timeline marks. The argument checks run at any size; the ring shift needs two ranks
// (one GPU each), so at one rank (ctest's) only the checks run.
TEST_F(Nccl, SendRecv) {
  const int n = comm_.size();
  const int me = comm_.rank();
  Tensor dev_t = make(DType::kF32, 16, me);
  EXPECT_THROW(comm_.send(dev_t, me), InvalidArgument) << "a send to this rank";
  EXPECT_THROW(comm_.recv(dev_t, n), InvalidArgument) << "a recv from outside the group";
  if (n < 2) return;
  const int next = (me + 1) % n;
  const int prev = (me + n - 1) % n;
  EXPECT_THROW(comm_.send(Tensor::zeros(Shape{4}, DType::kF32), next), InvalidArgument)
      << "host tensors are not NCCL's";
  for (DType d : {DType::kF32, DType::kBF16, DType::kI32}) {
    for (std::int64_t count : {1, 7, 1'000'003}) {
      Tensor out = make(d, count, me);
      Tensor in = Tensor::zeros(Shape{count}, d, *dev_);
      const std::shared_ptr<DeviceMark> origin = comm_.mark_compute();
      std::vector<Work> w = comm_.exchange({P2pOp::send(out, next), P2pOp::recv(in, prev)});
      wait_all(w);
      ASSERT_TRUE(w[1].device_start() && w[1].device_end());
      EXPECT_GE(w[1].device_start()->ms_since(*origin), 0.0);
      EXPECT_GE(w[1].device_end()->ms_since(*w[1].device_start()), 0.0);
      const auto got = in.to_floats();
      const auto want = make(d, count, prev).to_floats();  // what prev sent, bit for bit
      std::int64_t bad = 0;
      for (std::int64_t i = 0; i < count; ++i) bad += got[i] != want[i];
      EXPECT_EQ(bad, 0) << dtype_name(d) << "[" << count << "] from rank " << prev;
    }
  }
  // Lone ops in the even/odd order (comm/README.md's deadlock rule).
  Tensor out = make(DType::kF32, 1 << 20, me);
  Tensor in = Tensor::zeros(Shape{1 << 20}, DType::kF32, *dev_);
  Work s, r;
  if (me % 2 == 0) {
    s = comm_.send(out, next);
    r = comm_.recv(in, prev);
  } else {
    r = comm_.recv(in, prev);
    s = comm_.send(out, next);
  }
  r.wait();
  s.wait();
  EXPECT_EQ(in.to_floats()[12], value(prev, 12));
}

TEST_F(Nccl, SplitAndAsync) {
  Communicator sub = comm_.split(comm_.rank() % 2, comm_.rank());
  ASSERT_TRUE(sub.valid());
  std::vector<Work> works;
  std::vector<Tensor> ts;
  for (int k = 0; k < 16; ++k) {
    ts.push_back(make(DType::kF32, 100 + k, sub.rank()));
    works.push_back(sub.allreduce(ts.back()));
  }
  wait_all(works);
  for (int k = 0; k < 16; ++k) {
    const auto got = ts[k].to_floats();
    double want0 = 0;
    for (int r = 0; r < sub.size(); ++r) want0 += value(r, 0);
    EXPECT_EQ(got[0], want0) << k;
  }
  sub.finalize();
}

}  // namespace
}  // namespace meshtrain::comm

int main(int argc, char** argv) {
  meshtrain::comm::MpiSession session(&argc, &argv);
  meshtrain::comm::g_session = &session;
  ::testing::InitGoogleTest(&argc, argv);
  const int rc = RUN_ALL_TESTS();
  meshtrain::comm::g_session = nullptr;
  session.finalize();
  return rc;
}
