// The DMA pipeline on the GPU (dma::cuda::run_pipeline) and its benchmark driver.
//
//   1. delta     dynamic weights from v, w_dt, a             (dynamic_weights.cu)   [or given]
//   2. mask      evict positions, built in parallel           (mask.cu)
//   3. forward   o, lse on the gathered candidate keys        (forward.cu)
//   4. backward  dq, dk, dv, ddelta                           (backward.cu)
//                then dw_dt, da and the extra dv through delta (dynamic_weights.cu)
//
// Memory is O(B*H*L*D) plus O(B*Hd*Lk) for delta and the mask: no Lq x Lk tensor exists.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "common.cuh"
#include "dma/cuda.hpp"
#include "dma/cuda_bench.hpp"
#include "dma/validate.hpp"
#include "gather.cuh"
#include "kernels.hpp"

namespace dma::cuda {

bool device_available(std::string* reason) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error
    if (reason) *reason = std::string("no CUDA device: ") + cudaGetErrorString(err);
    return false;
  }
  if (count == 0) {
    if (reason) *reason = "no CUDA device";
    return false;
  }
  // The kernels are built for sm_90 (H100/H200) only: any other device has no code to run.
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    if (reason) *reason = "no usable CUDA device: cannot read its compute capability";
    return false;
  }
  if (major != 9) {
    if (reason)
      *reason = "unsupported CUDA device: compute capability " + std::to_string(major) + "." +
                std::to_string(minor) + ", this build has kernels for 9.0 (H100, H200) only";
    return false;
  }
  return true;
}

namespace detail {
namespace {

// One device allocation, freed on scope exit (also when an error is thrown).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
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
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; }
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
  Event() { DMA_CUDA_CHECK(cudaEventCreate(&e_)); }
  ~Event() { cudaEventDestroy(e_); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(cudaStream_t st) { DMA_CUDA_CHECK(cudaEventRecord(e_, st)); }
  float ms_since(const Event& start) const {
    float ms = 0;
    DMA_CUDA_CHECK(cudaEventElapsedTime(&ms, start.e_, e_));
    return ms;
  }

 private:
  cudaEvent_t e_{};
};

// All device buffers of one problem.
struct Workspace {
  Dims d;
  Form form;
  bool half, backward, delta_given;
  size_t elem = 2;
  DeviceBuffer q, k, v, dout, w_dt, a;         // inputs (q k v do in bf16/fp16)
  DeviceBuffer z, delta, evict, chunk_max, keys, sorted;
  DeviceBuffer o, lse, dsum, dq, dk, dv, ddelta, dz, da, dw_dt;

  Workspace(const Dims& dims, Form f, bool half_, bool bwd, bool given)
      : d(dims), form(f), half(half_), backward(bwd), delta_given(given) {
    const size_t q_n = (size_t)d.B * d.Hq * d.Lq * d.D, kv_n = (size_t)d.B * d.Hkv * d.Lk * d.D;
    const size_t delta_n = (size_t)d.B * d.Hd * d.Lk, lse_n = (size_t)d.B * d.Hq * d.Lq;
    const size_t w_n = (size_t)d.Hd * d.Hkv * d.D;
    const size_t n_bh = (size_t)d.B * d.Hd, n_small = d.n_chunks();
    const size_t n_big = (d.Lk + 1023) / 1024;
    q = DeviceBuffer(q_n * elem);
    k = DeviceBuffer(kv_n * elem);
    v = DeviceBuffer(kv_n * elem);
    delta = DeviceBuffer(delta_n * 4);
    if (!given) {
      w_dt = DeviceBuffer(w_n * 4);
      a = DeviceBuffer(d.Hd * 4);
      z = DeviceBuffer(delta_n * 4);
    }
    evict = DeviceBuffer(delta_n * 4);
    chunk_max = DeviceBuffer(n_bh * n_small * 4);
    if (d.window < d.Lk) {
      keys = DeviceBuffer(delta_n * 8);
      sorted = DeviceBuffer(n_bh * (n_big * 1024 + n_small * 128) * 8);
    }
    o = DeviceBuffer(q_n * 4);
    lse = DeviceBuffer(lse_n * 4);
    if (bwd) {
      dout = DeviceBuffer(q_n * elem);
      dsum = DeviceBuffer(lse_n * 4);
      dq = DeviceBuffer(q_n * 4);
      dk = DeviceBuffer(kv_n * 4);
      dv = DeviceBuffer(kv_n * 4);
      ddelta = DeviceBuffer(delta_n * 4);
      if (!given) {
        dz = DeviceBuffer(delta_n * 4);
        da = DeviceBuffer(d.Hd * 4);
        dw_dt = DeviceBuffer(w_n * 4);
      }
    }
  }

  size_t bytes() const {
    size_t s = 0;
    for (const DeviceBuffer* b : {&q, &k, &v, &dout, &w_dt, &a, &z, &delta, &evict, &chunk_max,
                                  &keys, &sorted, &o, &lse, &dsum, &dq, &dk, &dv, &ddelta, &dz,
                                  &da, &dw_dt})
      s += b->bytes();
    return s;
  }

  AttnArgs args() const {
    AttnArgs x{};
    x.q = q.as<void>();
    x.k = k.as<void>();
    x.v = v.as<void>();
    x.delta = delta.as<float>();
    x.evict = evict.as<int>();
    x.chunk_max = chunk_max.as<int>();
    x.o = o.as<float>();
    x.lse = lse.as<float>();
    x.dout = dout.as<void>();
    x.dsum = dsum.as<float>();
    x.dq = dq.as<float>();
    x.dk = dk.as<float>();
    x.dv = dv.as<float>();
    x.ddelta = ddelta.as<float>();
    return x;
  }

  void phase_delta(cudaStream_t st) {
    launch_dynamic_weights(d, form, half, v.as<void>(), w_dt.as<float>(), a.as<float>(),
                           z.as<float>(), delta.as<float>(), st);
  }
  void phase_mask(cudaStream_t st) {
    launch_mask(d, delta.as<float>(), evict.as<int>(), chunk_max.as<int>(), keys.as<uint64_t>(),
                sorted.as<uint64_t>(), st);
  }
  void phase_forward(cudaStream_t st) { launch_forward(d, half, args(), st); }
  void phase_backward(cudaStream_t st) {
    DMA_CUDA_CHECK(cudaMemsetAsync(dk.as<void>(), 0, dk.bytes(), st));
    DMA_CUDA_CHECK(cudaMemsetAsync(dv.as<void>(), 0, dv.bytes(), st));
    DMA_CUDA_CHECK(cudaMemsetAsync(ddelta.as<void>(), 0, ddelta.bytes(), st));
    launch_backward(d, half, args(), st);
  }
  void phase_dw_backward(cudaStream_t st) {
    launch_dynamic_weights_backward(d, form, half, v.as<void>(), w_dt.as<float>(), a.as<float>(),
                                    z.as<float>(), delta.as<float>(), ddelta.as<float>(),
                                    dz.as<float>(), da.as<float>(), dw_dt.as<float>(),
                                    dv.as<float>(), st);
  }
};

Dims make_dims(const Shape& s, const Options& opt) {
  if (!supported_head_dim(static_cast<int>(s.D)))
    throw dma::Error("D = " + std::to_string(s.D) +
                     ": the CUDA backend supports head dims 64 and 128");
  constexpr int64_t kMax = (int64_t{1} << 30);
  // (grid limits: Hq and B*Hd on grid.y, B on grid.z)
  if (s.Lq >= kMax || s.Lk >= kMax || s.Hq > 65535 || s.B * s.Hd > 65535 || s.B > 65535)
    throw dma::Error("shape: too large for the CUDA backend (Lq, Lk < 2^30; Hq, B*Hd, B <= 65535)");
  // Some kernels index rows with 32-bit ints and launch 32 threads per row (B*Hq*Lq query rows,
  // B*Lk key rows), and element indices of q, k, v stay below 2^31.
  constexpr int64_t kMaxRows = int64_t{1} << 26, kMaxElems = int64_t{1} << 31;
  if (s.B * s.Hq * s.Lq >= kMaxRows || s.B * s.Lk * std::max(s.Hd, s.Hkv) >= kMaxRows ||
      s.q_numel() >= kMaxElems || s.kv_numel() >= kMaxElems)
    throw dma::Error("shape: too large for the CUDA backend's 32-bit indexing (B*Hq*Lq and "
                     "B*Lk*max(Hd,Hkv) < 2^26, q and k/v < 2^31 elements); split the batch");
  Dims d{};
  d.B = (int)s.B; d.Hq = (int)s.Hq; d.Hkv = (int)s.Hkv; d.Hd = (int)s.Hd;
  d.Lq = (int)s.Lq; d.Lk = (int)s.Lk; d.D = (int)s.D;
  d.window = (int)std::min<int64_t>(opt.window, s.Lk);  // w >= Lk: nothing is ever evicted
  d.causal = opt.causal;
  d.scale = static_cast<float>(opt.softmax_scale(s));
  return d;
}

template <typename U>
void upload(DeviceBuffer& dst, const std::vector<U>& src, cudaStream_t st) {
  DMA_CUDA_CHECK(cudaMemcpyAsync(dst.as<void>(), src.data(), src.size() * sizeof(U),
                                 cudaMemcpyHostToDevice, st));
}
// Rounds float inputs to the compute type (round to nearest even) and uploads them.
// Rounds to bf16 or fp16 on the host and uploads. fp16 tops out at 65504: a finite input beyond
// it would become inf on the device, so it is an error naming the tensor and index.
void upload_elem(DeviceBuffer& dst, const std::vector<float>& src, bool half, cudaStream_t st,
                 const char* name, const std::vector<int64_t>& dims) {
  std::vector<uint16_t> h(src.size());
  for (size_t n = 0; n < src.size(); ++n) {
    if (half) {
      const __half x = __float2half_rn(src[n]);
      if (!std::isfinite(__half2float(x)))
        throw dma::Error(std::string(name) + format_index((int64_t)n, dims) + " = " +
                         std::to_string(src[n]) + " overflows fp16 (|x| <= 65504); use bf16");
      std::memcpy(&h[n], &x, 2);
    } else {
      const __nv_bfloat16 x = __float2bfloat16_rn(src[n]);
      std::memcpy(&h[n], &x, 2);
    }
  }
  upload(dst, h, st);
  DMA_CUDA_CHECK(cudaStreamSynchronize(st));  // h goes out of scope
}
// Copies on the pipeline's stream, then waits for it. (A plain cudaMemcpy runs on the legacy
// default stream, which does not wait for a non-blocking stream: it could read before the kernels
// wrote.)
template <typename U>
std::vector<U> download(const DeviceBuffer& src, size_t n, cudaStream_t st) {
  std::vector<U> h(n);
  DMA_CUDA_CHECK(cudaMemcpyAsync(h.data(), src.as<void>(), n * sizeof(U), cudaMemcpyDeviceToHost, st));
  DMA_CUDA_CHECK(cudaStreamSynchronize(st));
  return h;
}

// Outputs are poisoned before the kernels run (NaN for floats, an impossible e_j for evict), so
// an element a kernel forgot to write shows up in the tests.
void poison(DeviceBuffer& b, int byte, cudaStream_t st) {
  if (b.bytes()) DMA_CUDA_CHECK(cudaMemsetAsync(b.as<void>(), byte, b.bytes(), st));
}

struct StreamGuard {
  cudaStream_t st{};
  StreamGuard() { DMA_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking)); }
  ~StreamGuard() { cudaStreamDestroy(st); }
};

}  // namespace
}  // namespace detail

void check_supported(const Shape& s) { detail::make_dims(s, Options{}); }

std::vector<float> round_to_precision(const std::vector<float>& x, Precision precision) {
  std::vector<float> out(x.size());
  for (size_t n = 0; n < x.size(); ++n)
    out[n] = precision == Precision::fp16 ? __half2float(__float2half_rn(x[n]))
                                          : __bfloat162float(__float2bfloat16_rn(x[n]));
  return out;
}

Result<float> run_pipeline(const Problem<float>& p, Precision precision) {
  using namespace detail;
  validate_problem(p);
  const Shape& s = p.shape;
  const Dims d = make_dims(s, p.opt);
  std::string why;
  if (!device_available(&why)) throw dma::Error(why);

  const bool half = precision == Precision::fp16;
  StreamGuard sg;
  cudaStream_t st = sg.st;
  Workspace ws(d, p.opt.form, half, p.has_backward(), p.delta_given());

  const std::vector<int64_t> q_dims{s.B, s.Hq, s.Lq, s.D}, kv_dims{s.B, s.Hkv, s.Lk, s.D};
  upload_elem(ws.q, p.q, half, st, "q", q_dims);
  upload_elem(ws.k, p.k, half, st, "k", kv_dims);
  upload_elem(ws.v, p.v, half, st, "v", kv_dims);
  if (p.has_backward()) upload_elem(ws.dout, p.dout, half, st, "do", q_dims);
  if (p.delta_given()) {
    upload(ws.delta, p.delta, st);
  } else {
    upload(ws.w_dt, p.w_dt, st);
    upload(ws.a, p.a, st);
    poison(ws.delta, 0xff, st);
  }
  poison(ws.evict, 0x7f, st);
  poison(ws.o, 0xff, st);
  poison(ws.lse, 0xff, st);
  if (p.has_backward()) poison(ws.dq, 0xff, st);

  Event e0, e1, e2, e3, e4;
  Result<float> r;
  const size_t delta_n = (size_t)s.delta_numel();
  e0.record(st);
  if (!p.delta_given()) ws.phase_delta(st);
  e1.record(st);
  // Selection needs a finite delta: check before the mask (exp overflow is the usual cause).
  r.delta = download<float>(ws.delta, delta_n, st);
  // The kernels use delta * log2(e) (exp2 arithmetic): it must stay finite too.
  constexpr float kMaxDelta = 3.4028235e38f / kLog2e;
  for (size_t n = 0; n < delta_n; ++n)
    if (!(std::abs(r.delta[n]) <= kMaxDelta))
      throw dma::Error("delta" + format_index((int64_t)n, {s.B, s.Hd, s.Lk}) + " is " +
                       (std::isnan(r.delta[n]) ? std::string("nan") : std::isinf(r.delta[n]) ? std::string("inf") : std::to_string(r.delta[n]) + ", beyond float32 range / log2(e),") +
                       " (exp overflow? try --form linear or smaller a / w_dt)");
  Event e1b;
  e1b.record(st);
  ws.phase_mask(st);
  e2.record(st);
  ws.phase_forward(st);
  e3.record(st);
  if (p.has_backward()) {
    ws.phase_backward(st);
    if (!p.delta_given()) ws.phase_dw_backward(st);
  }
  e4.record(st);
  DMA_CUDA_CHECK(cudaStreamSynchronize(st));
  DMA_CUDA_CHECK(cudaGetLastError());

  r.times.delta = e1.ms_since(e0);
  r.times.mask = e2.ms_since(e1b);
  r.times.forward = e3.ms_since(e2);
  r.times.backward = e4.ms_since(e3);

  const std::vector<int> evict32 = download<int>(ws.evict, delta_n, st);
  r.evict.assign(evict32.begin(), evict32.end());
  r.fwd.o = download<float>(ws.o, (size_t)s.q_numel(), st);
  r.fwd.lse = download<float>(ws.lse, (size_t)s.lse_numel(), st);
  if (p.has_backward()) {
    r.grads.dq = download<float>(ws.dq, (size_t)s.q_numel(), st);
    r.grads.dk = download<float>(ws.dk, (size_t)s.kv_numel(), st);
    r.grads.dv = download<float>(ws.dv, (size_t)s.kv_numel(), st);
    r.grads.ddelta = download<float>(ws.ddelta, delta_n, st);
    if (!p.delta_given()) {
      r.dw_dt = download<float>(ws.dw_dt, (size_t)s.w_dt_numel(), st);
      r.da = download<float>(ws.da, (size_t)s.Hd, st);
    }
  }
  return r;
}

// ---- benchmark --------------------------------------------------------------------------
namespace detail {
namespace {

__device__ __forceinline__ uint32_t hash32(uint64_t x) {
  x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull; x ^= x >> 33;
  return static_cast<uint32_t>(x);
}
// Fills with N(0, sd^2) (Box-Muller on a counter hash) or U(-sd, sd), as elem or float.
template <typename T>
__global__ void random_kernel(T* out, size_t n, uint64_t seed, float sd, bool uniform) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float u1 = (hash32(seed * 0x9E3779B97F4A7C15ull + 2 * i) + 1.0f) * 2.3283064e-10f;
  const float u2 = hash32(seed * 0x9E3779B97F4A7C15ull + 2 * i + 1) * 2.3283064e-10f;
  const float x = uniform ? sd * (2.0f * u2 - 1.0f)
                          : sd * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
  out[i] = static_cast<T>(x);
}
template <typename T>
void fill_random(DeviceBuffer& b, size_t n, uint64_t seed, float sd, bool uniform, cudaStream_t st) {
  random_kernel<T><<<(unsigned)((n + 255) / 256), 256, 0, st>>>(b.as<T>(), n, seed, sd, uniform);
  DMA_CUDA_CHECK_LAUNCH(random_kernel);
}
void fill_elem(DeviceBuffer& b, size_t n, bool half, uint64_t seed, cudaStream_t st) {
  if (half) fill_random<__half>(b, n, seed, 1.0f, false, st);
  else fill_random<__nv_bfloat16>(b, n, seed, 1.0f, false, st);
}

double median(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  const size_t n = x.size();
  return n == 0 ? 0.0 : (n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]));
}

}  // namespace
}  // namespace detail

BenchResult bench_pipeline(const Shape& s, const Options& opt, const BenchOptions& bo) {
  using namespace detail;
  validate_shape(s, opt.causal);
  validate_options(s, opt);
  const Dims d = make_dims(s, opt);
  std::string why;
  if (!device_available(&why)) throw dma::Error(why);
  const bool half = bo.precision == Precision::fp16;
  StreamGuard sg;
  cudaStream_t st = sg.st;
  Workspace ws(d, opt.form, half, bo.backward, false);
  fill_elem(ws.q, (size_t)s.q_numel(), half, bo.seed * 16 + 1, st);
  fill_elem(ws.k, (size_t)s.kv_numel(), half, bo.seed * 16 + 2, st);
  fill_elem(ws.v, (size_t)s.kv_numel(), half, bo.seed * 16 + 3, st);
  if (bo.backward) fill_elem(ws.dout, (size_t)s.q_numel(), half, bo.seed * 16 + 4, st);
  fill_random<float>(ws.w_dt, (size_t)s.w_dt_numel(), bo.seed * 16 + 5,
                     1.0f / std::sqrt(float(s.Hkv * s.D)), false, st);
  fill_random<float>(ws.a, (size_t)s.Hd, bo.seed * 16 + 6, 1.0f, true, st);
  DeviceBuffer flush(bo.flush_l2 ? (size_t)256 << 20 : 0);

  BenchResult res;
  res.peak_bytes = (double)ws.bytes();
  const int kBq = 16 * block_warps();
  res.tile_q = kBq;
  res.tile_k = kBk;
  std::vector<double> t_delta, t_mask, t_fwd, t_bwd, t_dw, t_total;
  Event e[6];
  for (int rep = 0; rep < bo.warmup + bo.reps; ++rep) {
    if (bo.flush_l2) DMA_CUDA_CHECK(cudaMemsetAsync(flush.as<void>(), rep & 0xff, flush.bytes(), st));
    e[0].record(st);
    ws.phase_delta(st);
    e[1].record(st);
    ws.phase_mask(st);
    e[2].record(st);
    ws.phase_forward(st);
    e[3].record(st);
    if (bo.backward) ws.phase_backward(st);
    e[4].record(st);
    if (bo.backward) ws.phase_dw_backward(st);
    e[5].record(st);
    DMA_CUDA_CHECK(cudaStreamSynchronize(st));
    if (rep < bo.warmup) continue;
    t_delta.push_back(e[1].ms_since(e[0]));
    t_mask.push_back(e[2].ms_since(e[1]));
    t_fwd.push_back(e[3].ms_since(e[2]));
    t_bwd.push_back(e[4].ms_since(e[3]));
    t_dw.push_back(e[5].ms_since(e[4]));
    t_total.push_back(e[5].ms_since(e[0]));
  }
  res.delta_ms = median(t_delta);
  res.mask_ms = median(t_mask);
  res.forward_ms = median(t_fwd);
  res.backward_ms = median(t_bwd);
  res.dw_backward_ms = median(t_dw);
  res.total_ms = median(t_total);

  // Pair counts from the mask actually built (host side, O(B*Hd*Lk) + O(tiles * Lk)).
  const std::vector<int> evict = download<int>(ws.evict, (size_t)s.delta_numel(), st);
  if (!bo.dump_dir.empty()) {
    const std::vector<float> delta = download<float>(ws.delta, (size_t)s.delta_numel(), st);
    const std::string tag = "_N" + std::to_string(s.Lk) + "_w" + std::to_string(opt.window);
    std::FILE* f = std::fopen((bo.dump_dir + "/delta" + tag + ".f32").c_str(), "wb");
    std::FILE* g = std::fopen((bo.dump_dir + "/evict" + tag + ".i32").c_str(), "wb");
    if (!f || !g) throw dma::Error("bench: cannot write to " + bo.dump_dir);
    std::fwrite(delta.data(), 4, delta.size(), f);
    std::fwrite(evict.data(), 4, evict.size(), g);
    std::fclose(f);
    std::fclose(g);
  }
  const int64_t heads_per_delta = s.Hq / s.Hd, shift = s.Lk - s.Lq;
  const int64_t p_lo = opt.causal ? shift : s.Lk - 1, p_hi = s.Lk - 1;
  for (int64_t bh = 0; bh < s.B * s.Hd; ++bh) {
    const int* e_bh = &evict[bh * s.Lk];
    double kept = 0;
    for (int64_t j = 0; j < s.Lk; ++j) {
      if (!opt.causal) { kept += (e_bh[j] >= s.Lk - 1) ? (double)s.Lq : 0.0; continue; }
      const int64_t lo = std::max<int64_t>(j, p_lo), hi = std::min<int64_t>(e_bh[j], p_hi);
      if (hi >= lo) kept += (double)(hi - lo + 1);
    }
    res.kept_pairs += kept * heads_per_delta;
    // gathered candidates per query tile -> tiles of kBk keys
    for (int64_t i0 = 0; i0 < s.Lq; i0 += kBq) {
      const int64_t i1 = std::min<int64_t>(i0 + kBq, s.Lq) - 1;
      const int64_t pf = opt.causal ? i0 + shift : s.Lk - 1, pl = opt.causal ? i1 + shift : s.Lk - 1;
      int64_t n = 0;
      for (int64_t j = 0; j <= pl; ++j) n += (e_bh[j] >= j && e_bh[j] >= pf) ? 1 : 0;
      res.computed_pairs += (double)((n + kBk - 1) / kBk) * kBk * kBq * heads_per_delta;
    }
  }
  const double Lq = (double)s.Lq, Lk = (double)s.Lk;
  res.dense_causal_pairs = (double)(s.B * s.Hq) *
                           (opt.causal ? Lq * (Lk - Lq) + Lq * (Lq + 1) / 2 : Lq * Lk);
  return res;
}

}  // namespace dma::cuda
