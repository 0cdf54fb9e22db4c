// Helpers of the GPU suites: device memory the test owns, copies both ways (every call checked),
// host floats as the device's 16-bit elements.
#pragma once

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "dma/numerics.hpp"

namespace dma_test {

// Sets an environment variable for a scope and restores the caller's value (or its absence).
struct ScopedEnv {
  std::string name;
  std::optional<std::string> old;
  ScopedEnv(const char* n, const char* value) : name(n) {
    if (const char* o = std::getenv(n)) old = o;
    setenv(n, value, 1);
  }
  ~ScopedEnv() {
    if (old) setenv(name.c_str(), old->c_str(), 1);
    else unsetenv(name.c_str());
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;
};

// The wgmma kernels run here: the library was built with them (nvcc 12 or newer; without it
// it has the mma.sync kernels only) and the current device has compute capability 9.0 (H100,
// H200).
inline bool sm90_kernels_run() {
#if defined(DMA_TEST_HAVE_SM90)
  int dev = 0, major = 0, minor = 0;
  REQUIRE(cudaGetDevice(&dev) == cudaSuccess);
  REQUIRE(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess);
  REQUIRE(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess);
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

// One cudaMalloc, freed on scope exit.
struct DeviceMem {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceMem(size_t n) : bytes(n) {
    if (n) REQUIRE(cudaMalloc(&ptr, n) == cudaSuccess);
  }
  template <typename T>
  explicit DeviceMem(const std::vector<T>& host) : DeviceMem(host.size() * sizeof(T)) {
    upload(host);
  }
  ~DeviceMem() { cudaFree(ptr); }
  DeviceMem(const DeviceMem&) = delete;
  DeviceMem& operator=(const DeviceMem&) = delete;
  template <typename T> T* as() const { return static_cast<T*>(ptr); }
  template <typename T>
  void upload(const std::vector<T>& host) {
    REQUIRE(bytes == host.size() * sizeof(T));
    if (bytes) REQUIRE(cudaMemcpy(ptr, host.data(), bytes, cudaMemcpyHostToDevice) == cudaSuccess);
  }
};

// Host floats (already rounded to the precision) as the bf16/fp16 bits the kernels read.
inline std::vector<uint16_t> as_elems(const std::vector<float>& x, dma::Precision p) {
  std::vector<uint16_t> bits;
  bits.reserve(x.size());
  for (float e : x) bits.push_back(p == dma::Precision::fp16 ? dma::to_fp16_bits(e) : dma::to_bf16_bits(e));
  return bits;
}

// Same size and the same bytes (float compares would call -0 and +0 equal and NaN unequal).
template <typename T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

template <typename T>
std::vector<T> to_host(const void* src, size_t n) {
  std::vector<T> h(n);
  if (n) REQUIRE(cudaMemcpy(h.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
  return h;
}

}  // namespace dma_test
