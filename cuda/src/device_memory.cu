// Device allocations, events and streams of the host wrapper and the benchmark.
#include "device_memory.hpp"

#include <string>

#include "common.cuh"
#include "dma/cuda.hpp"

namespace dma::cuda::detail {

Config device_config(const Shape& s, const Options& opt, Precision precision) {
  Config c;
  c.shape = s;
  c.opt = opt;
  c.precision = precision;
  check_config(c);
  std::string why;
  if (!device_available(&why)) throw dma::Error(why);
  return c;
}

DeviceBuffer::DeviceBuffer(size_t bytes) : bytes_(bytes) {
  if (bytes == 0) return;
  const cudaError_t err = cudaMalloc(&ptr_, bytes);
  if (err == cudaErrorMemoryAllocation) {  // say so plainly, with the numbers
    cudaGetLastError();                    // not sticky: the device stays usable
    size_t free = 0, total = 0;
    cudaMemGetInfo(&free, &total);
    throw dma::Error("cuda: out of device memory: an allocation of " + std::to_string(bytes >> 20) +
                     " MiB failed with " + std::to_string(free >> 20) + " of " +
                     std::to_string(total >> 20) + " MiB free");
  }
  DMA_CUDA_CHECK(err);
}

Event::Event() { DMA_CUDA_CHECK(cudaEventCreate(&e_)); }
void Event::record(cudaStream_t st) { DMA_CUDA_CHECK(cudaEventRecord(e_, st)); }
float Event::ms_since(const Event& start) const {
  float ms = 0;
  DMA_CUDA_CHECK(cudaEventElapsedTime(&ms, start.e_, e_));
  return ms;
}

StreamGuard::StreamGuard() { DMA_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking)); }

}  // namespace dma::cuda::detail
