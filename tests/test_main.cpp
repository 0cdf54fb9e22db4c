#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "test_util.hpp"

namespace dma_test {
uint64_t test_seed() {
  static const uint64_t seed = []() -> uint64_t {
    if (const char* env = std::getenv("DMA_TEST_SEED")) return std::strtoull(env, nullptr, 10);
    return static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  }();
  return seed;
}
}  // namespace dma_test

int main(int argc, char** argv) {
  // Print the seed so a failure can be replayed with DMA_TEST_SEED=<seed>.
  bool listing = false;
  for (int n = 1; n < argc; ++n) listing |= std::string(argv[n]).rfind("--list", 0) == 0;
  if (!listing)
    std::fprintf(stderr, "DMA_TEST_SEED=%llu\n", static_cast<unsigned long long>(dma_test::test_seed()));
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
