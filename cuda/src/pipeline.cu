// dma::cuda::run_pipeline: the host-vector wrapper over the device API, for tools (dma_run, the
// inspector, the tutorials, the tests). It allocates the buffers, rounds and uploads the inputs,
// runs the phases of dma/cuda_device.hpp one by one on a stream of its own (timing each with
// events) and downloads the outputs.
//
//   1. delta     dynamic weights from v, w_dt, a             (dynamic_weights.cu)   [or given]
//   2. mask      evict positions, built in parallel           (mask.cu)
//   3. forward   o, lse on the gathered candidate keys        (forward.cu)
//   4. backward  dq, dk, dv, ddelta                           (backward.cu)
//                then dw_dt, da and the extra dv through delta (dynamic_weights.cu)
//
// Memory is O(B*H*L*D) plus O(B*Hd*Lk) for delta and the mask: no Lq x Lk tensor exists.
#include <cstring>
#include <string>
#include <vector>

#include "common.cuh"
#include "device_memory.hpp"
#include "dma/cuda.hpp"
#include "dma/validate.hpp"

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

void check_supported(const Shape& s) {
  Config c;
  c.shape = s;
  c.opt.window = 1;
  check_config(c);
}

namespace {

using detail::DeviceBuffer;
using detail::download;

template <typename U>
void upload(DeviceBuffer& dst, const std::vector<U>& src, cudaStream_t st) {
  DMA_CUDA_CHECK(cudaMemcpyAsync(dst.as<void>(), src.data(), src.size() * sizeof(U),
                                 cudaMemcpyHostToDevice, st));
  DMA_CUDA_CHECK(cudaStreamSynchronize(st));  // src may go out of scope
}

// Rounds float inputs to the element type (dma::to_bf16_bits / to_fp16_bits) and uploads them.
// fp16 tops out at 65504: a finite input beyond it would become inf on the device, so it is an
// error naming the tensor and index.
DeviceBuffer upload_elem(const std::vector<float>& src, Precision precision, cudaStream_t st,
                         const char* name, const std::vector<int64_t>& dims) {
  std::vector<uint16_t> h(src.size());
  for (size_t n = 0; n < src.size(); ++n) {
    if (precision == Precision::fp16) {
      h[n] = to_fp16_bits(src[n]);
      if (!std::isfinite(from_fp16_bits(h[n])))
        throw dma::Error(std::string(name) + format_index((int64_t)n, dims) + " = " +
                         std::to_string(src[n]) + " overflows fp16 (|x| <= 65504); use bf16");
    } else {
      h[n] = to_bf16_bits(src[n]);
    }
  }
  DeviceBuffer b(h.size() * 2);
  upload(b, h, st);
  return b;
}
template <typename U>
DeviceBuffer upload_new(const std::vector<U>& src, cudaStream_t st) {
  DeviceBuffer b(src.size() * sizeof(U));
  upload(b, src, st);
  return b;
}

// Outputs are poisoned before the kernels run (NaN for floats, an impossible e_j for evict), so
// an element a kernel forgot to write shows up in the tests.
DeviceBuffer poisoned(size_t bytes, int byte, cudaStream_t st) {
  DeviceBuffer b(bytes);
  if (bytes) DMA_CUDA_CHECK(cudaMemsetAsync(b.as<void>(), byte, bytes, st));
  return b;
}

}  // namespace

Result<float> run_pipeline(const Problem<float>& p, Precision precision) {
  validate_problem(p);
  const Shape& s = p.shape;
  const Config c = detail::device_config(s, p.opt, precision);

  detail::StreamGuard sg;
  const cudaStream_t st = sg.st;
  const Stream stream = st;
  const size_t q_n = (size_t)s.q_numel(), kv_n = (size_t)s.kv_numel();
  const size_t delta_n = (size_t)s.delta_numel(), lse_n = (size_t)s.lse_numel();
  const std::vector<int64_t> q_dims{s.B, s.Hq, s.Lq, s.D}, kv_dims{s.B, s.Hkv, s.Lk, s.D};

  // Inputs, and the outputs poisoned.
  const DeviceBuffer q = upload_elem(p.q, precision, st, "q", q_dims);
  const DeviceBuffer k = upload_elem(p.k, precision, st, "k", kv_dims);
  const DeviceBuffer v = upload_elem(p.v, precision, st, "v", kv_dims);
  const DeviceBuffer dout = p.has_backward() ? upload_elem(p.dout, precision, st, "do", q_dims)
                                             : DeviceBuffer();
  const DeviceBuffer w_dt = p.delta_given() ? DeviceBuffer() : upload_new(p.w_dt, st);
  const DeviceBuffer a = p.delta_given() ? DeviceBuffer() : upload_new(p.a, st);
  DeviceBuffer delta = p.delta_given() ? upload_new(p.delta, st) : poisoned(delta_n * 4, 0xff, st);
  DeviceBuffer mask_state = poisoned(mask_state_bytes(c), 0x7f, st);
  DeviceBuffer o = poisoned(q_n * 4, 0xff, st), lse = poisoned(lse_n * 4, 0xff, st);
  DeviceBuffer status(sizeof(int64_t));
  const size_t ws_bytes = workspace_bytes(c);
  DeviceBuffer workspace(ws_bytes);
  DeviceBuffer dq, dk, dv, ddelta, dw_dt, da;
  if (p.has_backward()) {
    dq = poisoned(q_n * 4, 0xff, st);
    dk = DeviceBuffer(kv_n * 4);
    dv = DeviceBuffer(kv_n * 4);
    ddelta = DeviceBuffer(delta_n * 4);
    if (!p.delta_given()) {
      dw_dt = DeviceBuffer((size_t)s.w_dt_numel() * 4);
      da = DeviceBuffer((size_t)s.Hd * 4);
    }
  }

  ForwardBuffers f;
  f.q = q.as<void>(), f.k = k.as<void>(), f.v = v.as<void>();
  f.w_dt = w_dt.as<float>(), f.a = a.as<float>();
  f.delta = delta.as<float>();
  f.mask_state = mask_state.as<void>();
  f.o = o.as<float>(), f.lse = lse.as<float>();
  f.status = status.as<int64_t>();
  BackwardBuffers g;
  g.dout = dout.as<void>();
  g.dq = dq.as<float>(), g.dk = dk.as<float>(), g.dv = dv.as<float>();
  g.ddelta = ddelta.as<float>(), g.dw_dt = dw_dt.as<float>(), g.da = da.as<float>();

  // The phases of forward() and backward(), timed one by one.
  detail::Event e0, e1, e1b, e2, e3, e4;
  void* ws = workspace.as<void>();
  reset_status(f.status, stream);
  e0.record(st);
  if (f.delta_given()) check_delta(c, f.delta, f.status, stream);
  else dynamic_weights(c, f.v, f.w_dt, f.a, f.delta, f.status, ws, ws_bytes, stream);
  e1.record(st);
  // Selection needs a finite delta: stop before the mask (exp overflow is the usual cause).
  check_status(c, f.status, stream);
  e1b.record(st);
  build_mask(c, f.delta, f.mask_state, ws, ws_bytes, stream);
  e2.record(st);
  attention_forward(c, f.q, f.k, f.v, f.delta, f.mask_state, f.o, f.lse, stream);
  e3.record(st);
  if (p.has_backward()) backward(c, f, g, ws, ws_bytes, stream);
  e4.record(st);
  DMA_CUDA_CHECK(cudaStreamSynchronize(st));
  DMA_CUDA_CHECK(cudaGetLastError());

  Result<float> r;
  r.times.delta = e1.ms_since(e0);
  r.times.mask = e2.ms_since(e1b);
  r.times.forward = e3.ms_since(e2);
  r.times.backward = e4.ms_since(e3);
  r.delta = download<float>(f.delta, delta_n, st);
  const std::vector<int32_t> evict32 = download<int32_t>(evict_of(f.mask_state), delta_n, st);
  r.evict.assign(evict32.begin(), evict32.end());
  r.fwd.o = download<float>(f.o, q_n, st);
  r.fwd.lse = download<float>(f.lse, lse_n, st);
  if (p.has_backward()) {
    r.grads.dq = download<float>(g.dq, q_n, st);
    r.grads.dk = download<float>(g.dk, kv_n, st);
    r.grads.dv = download<float>(g.dv, kv_n, st);
    r.grads.ddelta = download<float>(g.ddelta, delta_n, st);
    if (!p.delta_given()) {
      r.dw_dt = download<float>(g.dw_dt, (size_t)s.w_dt_numel(), st);
      r.da = download<float>(g.da, (size_t)s.Hd, st);
    }
  }
  return r;
}

}  // namespace dma::cuda
