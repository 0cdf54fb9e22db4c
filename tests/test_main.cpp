// The doctest main of the core and GPU suites: prints the random seed (replay a failure with
// DMA_TEST_SEED=<seed>) and fails when a filter matched no test case, so a test name that ctest
// mangled can never pass by running nothing. Built with DMA_TEST_NEEDS_CUDA (the GPU suites) it
// exits 77 (ctest: skipped) when no CUDA device is usable, e.g. on CPU-only machines where
// cudaGetDeviceCount fails with error 35.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "test_util.hpp"
#ifdef DMA_TEST_NEEDS_CUDA
#include "dma/cuda.hpp"
#endif

namespace dma_test {
uint64_t test_seed() {
  static const uint64_t seed = []() -> uint64_t {
    if (const char* env = std::getenv("DMA_TEST_SEED")) return std::strtoull(env, nullptr, 10);
    return static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  }();
  return seed;
}
}  // namespace dma_test

namespace {

std::atomic<int> g_cases_run{0};

// Counts the test cases that actually start.
struct CaseCounter : doctest::IReporter {
  explicit CaseCounter(const doctest::ContextOptions&) {}
  void report_query(const doctest::QueryData&) override {}
  void test_run_start() override {}
  void test_run_end(const doctest::TestRunStats&) override {}
  void test_case_start(const doctest::TestCaseData&) override { ++g_cases_run; }
  void test_case_reenter(const doctest::TestCaseData&) override {}
  void test_case_end(const doctest::CurrentTestCaseStats&) override {}
  void test_case_exception(const doctest::TestCaseException&) override {}
  void subcase_start(const doctest::SubcaseSignature&) override {}
  void subcase_end() override {}
  void log_assert(const doctest::AssertData&) override {}
  void log_message(const doctest::MessageData&) override {}
  void test_case_skipped(const doctest::TestCaseData&) override {}
};
REGISTER_LISTENER("case_counter", 1, CaseCounter);

}  // namespace

int main(int argc, char** argv) {
#ifdef DMA_TEST_NEEDS_CUDA
  std::string why;
  if (!dma::cuda::device_available(&why)) {
    std::printf("skipping the CUDA tests: %s\n", why.c_str());
    return 77;
  }
#endif
  bool listing = false;
  for (int n = 1; n < argc; ++n) listing |= std::string(argv[n]).rfind("--list", 0) == 0;
  if (!listing)
    std::fprintf(stderr, "DMA_TEST_SEED=%llu\n", static_cast<unsigned long long>(dma_test::test_seed()));
  doctest::Context ctx(argc, argv);
  const int result = ctx.run();
  if (ctx.shouldExit() || listing) return result;
  if (g_cases_run == 0) {
    std::fprintf(stderr, "no test case matched the filter: a mangled test name?\n");
    return 1;
  }
  return result;
}
