// doctest main for the GPU suites: exits 77 (ctest: skipped) when no CUDA device is usable, e.g.
// on the CPU-only CI machines where cudaGetDeviceCount fails with error 35.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <string>

#include "dma/cuda.hpp"

int main(int argc, char** argv) {
  std::string why;
  if (!dma::cuda::device_available(&why)) {
    std::printf("skipping the CUDA tests: %s\n", why.c_str());
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
