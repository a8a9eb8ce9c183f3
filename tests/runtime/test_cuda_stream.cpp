#include <gtest/gtest.h>

#include "runtime/cuda/cuda_check.hpp"
#include "runtime/cuda/stream.hpp"
#include "runtime/error.hpp"

namespace meshtrain::cuda {
namespace {

TEST(CudaStream, EventsOrderStreams) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  MT_CUDA_CHECK(cudaSetDevice(device_for_local_rank(0)));
  Stream a, b;
  Event done(true), start(true);
  start.record(a.get());
  done.record(a.get());
  done.block(b.get());
  b.synchronize();
  EXPECT_TRUE(done.query());
  EXPECT_GE(start.elapsed_ms(done), 0.0f);
}

TEST(CudaStream, ErrorsNameTheCall) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  try {
    MT_CUDA_CHECK(cudaSetDevice(1 << 20));
    FAIL() << "cudaSetDevice accepted an impossible device";
  } catch (const CudaError& e) {
    EXPECT_NE(std::string(e.what()).find("cudaSetDevice"), std::string::npos) << e.what();
  }
}

TEST(CudaStream, NoDeviceMeansZeroNotAThrow) {
  EXPECT_GE(device_count(), 0);
}

}  // namespace
}  // namespace meshtrain::cuda
