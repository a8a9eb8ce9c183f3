#include <gtest/gtest.h>

#include "runtime/allocator.hpp"
#include "runtime/ops.hpp"
#include "runtime/tensor.hpp"

namespace meshtrain {
namespace {

TEST(Shape, BasicsAndErrors) {
  Shape s{2, 3, 4};
  EXPECT_EQ(s.ndim(), 3);
  EXPECT_EQ(s.numel(), 24);
  EXPECT_EQ(s[-1], 4);
  EXPECT_EQ(s.str(), "[2, 3, 4]");
  EXPECT_THROW(s[3], InvalidArgument);
  EXPECT_THROW((Shape{1, -2}), InvalidArgument);
  EXPECT_THROW((Shape{1, 1, 1, 1, 1, 1, 1}), InvalidArgument);
}

TEST(Tensor, ViewsShareStorage) {
  Tensor t = Tensor::from_floats({1, 2, 3, 4, 5, 6}, Shape{3, 2}, DType::kF32);
  Tensor rows = t.slice(1, 2);
  EXPECT_EQ(rows.shape(), (Shape{2, 2}));
  EXPECT_EQ(rows.to_floats(), (std::vector<float>{3, 4, 5, 6}));
  rows.data_as<float>()[0] = 30;
  EXPECT_EQ(t.to_floats()[2], 30);
  EXPECT_EQ(t.view(Shape{6}).to_floats()[2], 30);
  EXPECT_THROW(t.view(Shape{4}), InvalidArgument);
  EXPECT_THROW(t.slice(2, 2), InvalidArgument);
  EXPECT_THROW(t.data_as<bf16>(), InvalidArgument);
}

TEST(Tensor, ConvertsBetweenDtypes) {
  Tensor t = Tensor::from_floats({1.0f, -2.5f, 3.0e-3f}, Shape{3}, DType::kF32);
  Tensor b = t.to(DType::kBF16);
  EXPECT_EQ(b.dtype(), DType::kBF16);
  std::vector<float> back = b.to(DType::kF32).to_floats();
  EXPECT_EQ(back[0], 1.0f);
  EXPECT_EQ(back[1], -2.5f);
  EXPECT_NEAR(back[2], 3.0e-3f, 3.0e-3f / 128);
  Tensor h = b.to(DType::kF16);
  EXPECT_NEAR(h.to_floats()[2], 3.0e-3f, 3.0e-3f / 100);
  Tensor c = t.clone();
  c.zero_();
  EXPECT_EQ(t.to_floats()[0], 1.0f);
  EXPECT_EQ(c.to_floats()[0], 0.0f);
}

TEST(Tensor, UndefinedIsAnError) {
  Tensor u;
  EXPECT_FALSE(u.defined());
  EXPECT_THROW(u.data(), InvalidArgument);
  EXPECT_EQ(u.str(), "undefined tensor");
}

TEST(Allocator, ReusesBlocksWithoutSystemCalls) {
  int system_calls = 0;
  CachingAllocator alloc(
      [&](std::size_t n) {
        ++system_calls;
        return ::operator new(n);
      },
      [](void* p) { ::operator delete(p); }, true);
  // One "training step": the same sizes every time.
  auto step = [&] {
    void* a = alloc.allocate(1000);
    void* b = alloc.allocate(1 << 20);
    void* c = alloc.allocate(12345);
    alloc.deallocate(b, 1 << 20);
    alloc.deallocate(a, 1000);
    alloc.deallocate(c, 12345);
  };
  step();
  const int after_first = system_calls;
  for (int i = 0; i < 10; ++i) step();
  EXPECT_EQ(system_calls, after_first);
  EXPECT_EQ(alloc.stats().in_use_bytes, 0u);
  EXPECT_GT(alloc.stats().peak_in_use_bytes, (1u << 20));
  alloc.empty_cache();
  EXPECT_EQ(alloc.stats().cached_bytes, 0u);
}

TEST(Allocator, RoundSizeBoundsSlack) {
  for (std::size_t n : {1ul, 63ul, 64ul, 65ul, 4096ul, 4097ul, 1000000ul, 123456789ul}) {
    const std::size_t r = CachingAllocator::round_size(n);
    EXPECT_GE(r, n);
    EXPECT_LE(r, n + n / 8 + 64) << n;
  }
}

TEST(Tensor, CpuTrainingLoopMakesNoSystemAllocationsAfterWarmup) {
  auto step = [] {
    Tensor a = Tensor::empty(Shape{64, 128}, DType::kBF16);
    Tensor b = Tensor::empty(Shape{64, 128}, DType::kBF16);
    Tensor g = Tensor::zeros(Shape{64, 128}, DType::kF32);
    ops::add(a, a, b);
  };
  step();
  const std::size_t before = cpu_device().memory_stats().system_allocations;
  for (int i = 0; i < 5; ++i) step();
  EXPECT_EQ(cpu_device().memory_stats().system_allocations, before);
}

}  // namespace
}  // namespace meshtrain
