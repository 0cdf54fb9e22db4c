// Which kernel family runs a pass: the wgmma kernels (forward_sm90.cu; dq_sm90.cu and
// backward_sm90.cu) on a compute capability 9.0 device when the library was built with them
// (DMA_HAVE_SM90) and the head dim is 64 or 128, the mma.sync kernels (forward.cu, backward.cu;
// head dims 32, 64, 128, 256) everywhere else. An environment variable per pass overrides it:
// DMA_CUDA_FORWARD, DMA_CUDA_BACKWARD = sm80 (the ladder's lower rung, for comparisons), sm90
// (required: an error where it cannot run) or auto (the default).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common.cuh"
#include "kernels.hpp"

namespace dma::cuda::detail {
namespace {

#if defined(DMA_HAVE_SM90)
// The device's compute capability is 9.0; asked of the runtime once per device.
bool device_is_sm90() {
  constexpr int kDevices = 64;
  static std::atomic<int> known[kDevices];  // 0 not asked yet, 1 yes, 2 no
  int dev = 0;
  DMA_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < kDevices && known[dev].load(std::memory_order_relaxed) != 0)
    return known[dev].load(std::memory_order_relaxed) == 1;
  int major = 0, minor = 0;
  DMA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  DMA_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  const bool yes = major == 9 && minor == 0;
  if (dev < kDevices) known[dev].store(yes ? 1 : 2, std::memory_order_relaxed);
  return yes;
}
#endif

const char* kernel_family(const char* variable, int D) {
  const char* env = std::getenv(variable);
  const bool force_sm80 = env && std::strcmp(env, "sm80") == 0;
  const bool want_sm90 = env && std::strcmp(env, "sm90") == 0;
  if (env && *env && !force_sm80 && !want_sm90 && std::strcmp(env, "auto") != 0)
    throw dma::Error(std::string("cuda: ") + variable + "=" + env + " (sm80, sm90 or auto)");
#if defined(DMA_HAVE_SM90)
  const bool have_sm90 = !force_sm80 && sm90_head_dim(D) && device_is_sm90();
#else
  const bool have_sm90 = false;
#endif
  if (want_sm90 && !sm90_head_dim(D))
    throw dma::Error(std::string("cuda: ") + variable +
                     "=sm90: the wgmma kernels take head dims 64 and 128, not " + std::to_string(D));
  if (want_sm90 && !have_sm90)
    throw dma::Error(std::string("cuda: ") + variable +
                     "=sm90 needs a compute capability 9.0 device and a library built with sm_90a");
  return have_sm90 ? "sm90" : "sm80";
}

}  // namespace

const char* forward_kernel_name(int D) { return kernel_family("DMA_CUDA_FORWARD", D); }
const char* backward_kernel_name(int D) { return kernel_family("DMA_CUDA_BACKWARD", D); }

}  // namespace dma::cuda::detail
