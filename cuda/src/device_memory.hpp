// Host-side owners of device resources for the tools' wrapper and the benchmark: one allocation,
// one event, one stream, each released on scope exit (also when an error is thrown). The device
// API itself (device_api.cu) owns nothing: its callers bring their own memory and stream.
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include "common.cuh"
#include "dma/cuda_device.hpp"

namespace dma::cuda::detail {

// The configuration of a run, checked for the kernels (dma::Error otherwise), with a usable
// device present (dma::Error naming why not).
Config device_config(const Shape& s, const Options& opt, Precision precision);

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes);  // throws dma::Error "cuda: out of device memory: ..."
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  template <typename U> U* as() const { return static_cast<U*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

class Event {
 public:
  Event();
  ~Event() { cudaEventDestroy(e_); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(cudaStream_t st);
  float ms_since(const Event& start) const;  // both recorded and complete

 private:
  cudaEvent_t e_{};
};

// A non-blocking stream of its own, so the wrapper never serializes with other work.
struct StreamGuard {
  cudaStream_t st{};
  StreamGuard();
  ~StreamGuard() { cudaStreamDestroy(st); }
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;
};

// n elements of type U from the device, copied on stream st, which is then waited for. (A plain
// cudaMemcpy runs on the legacy default stream, which does not wait for a non-blocking stream: it
// could read before the kernels wrote.)
template <typename U>
std::vector<U> download(const void* src, size_t n, cudaStream_t st) {
  std::vector<U> h(n);
  DMA_CUDA_CHECK(cudaMemcpyAsync(h.data(), src, n * sizeof(U), cudaMemcpyDeviceToHost, st));
  DMA_CUDA_CHECK(cudaStreamSynchronize(st));
  return h;
}

}  // namespace dma::cuda::detail
