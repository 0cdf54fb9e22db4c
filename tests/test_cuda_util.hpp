// Helpers of the GPU suites: device memory the test owns, copies both ways (every call checked).
#pragma once

#include <doctest/doctest.h>

#include <cstddef>
#include <vector>

#include <cuda_runtime_api.h>

namespace dma_test {

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

template <typename T>
std::vector<T> to_host(const void* src, size_t n) {
  std::vector<T> h(n);
  if (n) REQUIRE(cudaMemcpy(h.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
  return h;
}

}  // namespace dma_test
