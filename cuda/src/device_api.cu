// The device-pointer API (dma/cuda_device.hpp): each phase checks its arguments, carves the
// caller's mask state and workspace (layout.hpp) and enqueues the kernels on the caller's stream.
// Nothing here allocates, copies to or from the host, or waits, except check_status(), whose job
// is to wait.
#include <cfloat>
#include <string>

#include "common.cuh"
#include "dma/cuda_device.hpp"
#include "dma/validate.hpp"
#include "kernels.hpp"
#include "layout.hpp"

namespace dma::cuda {

using namespace detail;

namespace {

cudaStream_t as_stream(Stream s) { return static_cast<cudaStream_t>(s); }

void require(const void* p, const char* what) {
  if (p == nullptr) throw dma::Error(std::string("cuda: ") + what + " is a null pointer");
}
void require_workspace(const Dims& d, const void* workspace, size_t size) {
  const size_t need = workspace_layout(d).bytes;
  if (size < need || (need > 0 && workspace == nullptr))
    throw dma::Error("cuda: the workspace has " + std::to_string(size) + " bytes, this call needs " +
                     std::to_string(need) + " (dma::cuda::workspace_bytes)");
}

// The kernels compute with delta * log2(e) (base-2 softmax), so |delta| must stay below
// FLT_MAX / log2(e); NaN fails the comparison too. The smallest bad index wins: status holds -1
// (all bits set) until then, which is the largest value as unsigned.
constexpr float kMaxDelta = FLT_MAX / kLog2e;

__global__ void check_delta_kernel(const float* __restrict__ delta, size_t n,
                                   unsigned long long* status) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x)
    if (!(fabsf(delta[i]) <= kMaxDelta)) atomicMin(status, (unsigned long long)i);
}

void launch_check_delta(const Dims& d, const float* delta, int64_t* status, cudaStream_t st) {
  const size_t n = (size_t)d.B * d.Hd * d.Lk;
  const unsigned blocks = (unsigned)std::min<size_t>((n + 255) / 256, 1024);
  check_delta_kernel<<<blocks, 256, 0, st>>>(delta, n, reinterpret_cast<unsigned long long*>(status));
  DMA_CUDA_CHECK_LAUNCH(check_delta_kernel);
}

AttnArgs attn_args(const Dims& d, const void* q, const void* k, const void* v, const float* delta,
                   const void* mask_state) {
  const MaskStateLayout m = mask_state_layout(d);
  AttnArgs x{};
  x.q = q;
  x.k = k;
  x.v = v;
  x.delta = delta;
  x.evict = at<const int>(mask_state, m.evict);
  x.tables = tables_in(d, const_cast<void*>(mask_state));
  return x;
}

}  // namespace

void check_config(const Config& c) { make_dims(c); }

size_t mask_state_bytes(const Config& c) { return mask_state_layout(make_dims(c)).bytes; }

size_t workspace_bytes(const Config& c) { return workspace_layout(make_dims(c)).bytes; }

CandidateTables candidate_tables_of(const Config& c, const void* mask_state) {
  const Dims d = make_dims(c);
  const Tables t = tables_in(d, const_cast<void*>(mask_state));
  CandidateTables out;
  out.tile_queries = kTileQ;
  out.tiles = table_tiles(d);
  out.stride = tables_implicit(d) ? d.Lk : table_stride(d);
  out.slot_key = t.slot_key, out.list = t.list, out.n_alive = t.n_alive, out.n_full = t.n_full;
  return out;
}

void reset_status(int64_t* status, Stream stream) {
  require(status, "status");
  DMA_CUDA_CHECK(cudaMemsetAsync(status, 0xff, sizeof(int64_t), as_stream(stream)));
}

void check_status(const Config& c, const int64_t* status, Stream stream) {
  require(status, "status");
  int64_t bad = -1;
  DMA_CUDA_CHECK(cudaMemcpyAsync(&bad, status, sizeof bad, cudaMemcpyDeviceToHost, as_stream(stream)));
  DMA_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream)));
  if (bad >= 0) {
    const Shape& s = c.shape;
    throw dma::Error("delta" + format_index(bad, {s.B, s.Hd, s.Lk}) +
                     " is not finite or beyond float32 range / log2(e) (exp overflow? try --form "
                     "linear or smaller a / w_dt)");
  }
}

void dynamic_weights(const Config& c, const void* v, const float* w_dt, const float* a,
                     float* delta, int64_t* status, void* workspace, size_t workspace_size,
                     Stream stream) {
  const Dims d = make_dims(c);
  require(v, "v"), require(w_dt, "w_dt"), require(a, "a"), require(delta, "delta");
  require(status, "status");
  require_workspace(d, workspace, workspace_size);
  const WorkspaceLayout w = workspace_layout(d);
  launch_dynamic_weights(d, c.opt.form, v, w_dt, a, at<float>(workspace, w.z), delta,
                         as_stream(stream));
  launch_check_delta(d, delta, status, as_stream(stream));
}

void check_delta(const Config& c, const float* delta, int64_t* status, Stream stream) {
  const Dims d = make_dims(c);
  require(delta, "delta"), require(status, "status");
  launch_check_delta(d, delta, status, as_stream(stream));
}

void build_mask(const Config& c, const float* delta, void* mask_state, void* workspace,
                size_t workspace_size, Stream stream) {
  const Dims d = make_dims(c);
  require(delta, "delta"), require(mask_state, "mask_state");
  require_workspace(d, workspace, workspace_size);
  const MaskStateLayout m = mask_state_layout(d);
  const WorkspaceLayout w = workspace_layout(d);
  launch_mask(d, delta, at<int>(mask_state, m.evict),
              w.sorts ? at<uint64_t>(workspace, w.keys) : nullptr,
              w.sorts ? at<uint64_t>(workspace, w.sorted) : nullptr, as_stream(stream));
  launch_candidates(d, at<int>(mask_state, m.evict), tables_in(d, mask_state),
                    at<int>(workspace, w.sweep), as_stream(stream));
}

void attention_forward(const Config& c, const void* q, const void* k, const void* v,
                       const float* delta, const void* mask_state, float* o, float* lse,
                       Stream stream) {
  const Dims d = make_dims(c);
  require(q, "q"), require(k, "k"), require(v, "v"), require(delta, "delta");
  require(mask_state, "mask_state"), require(o, "o"), require(lse, "lse");
  AttnArgs x = attn_args(d, q, k, v, delta, mask_state);
  x.o = o;
  x.lse = lse;
  launch_forward(d, x, as_stream(stream));
}

void attention_backward(const Config& c, const void* q, const void* k, const void* v,
                        const float* delta, const void* mask_state, const float* o,
                        const float* lse, const void* dout, float* dq, float* dk, float* dv,
                        float* ddelta, void* workspace, size_t workspace_size, Stream stream) {
  const Dims d = make_dims(c);
  require(q, "q"), require(k, "k"), require(v, "v"), require(delta, "delta");
  require(mask_state, "mask_state"), require(o, "o"), require(lse, "lse"), require(dout, "do");
  require(dq, "dq"), require(dk, "dk"), require(dv, "dv"), require(ddelta, "ddelta");
  require_workspace(d, workspace, workspace_size);
  const WorkspaceLayout w = workspace_layout(d);
  const cudaStream_t st = as_stream(stream);
  // Keys no query keeps are never visited by the kernels: their gradients are zero.
  const size_t kv_bytes = (size_t)d.B * d.Hkv * d.Lk * d.D * sizeof(float);
  const size_t part_bytes = (size_t)d.B * d.Hd * d.Lk * d.D * sizeof(float);
  AttnArgs x = attn_args(d, q, k, v, delta, mask_state);
  if (backward_partials(d)) {  // dk, dv are then written whole by the reduction
    x.dk_part = at<float>(workspace, w.dk_part);
    x.dv_part = at<float>(workspace, w.dv_part);
    DMA_CUDA_CHECK(cudaMemsetAsync(x.dk_part, 0, part_bytes, st));
    DMA_CUDA_CHECK(cudaMemsetAsync(x.dv_part, 0, part_bytes, st));
  } else {
    DMA_CUDA_CHECK(cudaMemsetAsync(dk, 0, kv_bytes, st));
    DMA_CUDA_CHECK(cudaMemsetAsync(dv, 0, kv_bytes, st));
  }
  DMA_CUDA_CHECK(cudaMemsetAsync(ddelta, 0, (size_t)d.B * d.Hd * d.Lk * sizeof(float), st));
  x.o = const_cast<float*>(o);  // read only in the backward
  x.lse = const_cast<float*>(lse);
  x.dout = dout;
  x.dsum = at<float>(workspace, w.dsum);
  x.carry = at<float>(workspace, w.carry);
  x.dq = dq;
  x.dk = dk;
  x.dv = dv;
  x.ddelta = ddelta;
  launch_backward(d, x, st);
}

void dynamic_weights_backward(const Config& c, const void* v, const float* w_dt, const float* a,
                              const float* ddelta, float* dw_dt, float* da, float* dv,
                              void* workspace, size_t workspace_size, Stream stream) {
  const Dims d = make_dims(c);
  require(v, "v"), require(w_dt, "w_dt"), require(a, "a"), require(ddelta, "ddelta");
  require(dw_dt, "dw_dt"), require(da, "da"), require(dv, "dv");
  require_workspace(d, workspace, workspace_size);
  const WorkspaceLayout w = workspace_layout(d);
  const cudaStream_t st = as_stream(stream);
  // z is not kept from the forward: recompute it (with delta, into scratch; the same kernel, so
  // the same values the forward had).
  float* z = at<float>(workspace, w.z);
  float* delta = at<float>(workspace, w.delta2);
  launch_dynamic_weights(d, c.opt.form, v, w_dt, a, z, delta, st);
  launch_dynamic_weights_backward(d, c.opt.form, v, w_dt, a, z, delta, ddelta,
                                  at<float>(workspace, w.dz), da, dw_dt, dv,
                                  at<float>(workspace, w.dw_partials), st);
}

void forward(const Config& c, const ForwardBuffers& f, void* workspace, size_t workspace_size,
             Stream stream) {
  reset_status(f.status, stream);
  if (f.delta_given()) check_delta(c, f.delta, f.status, stream);
  else dynamic_weights(c, f.v, f.w_dt, f.a, f.delta, f.status, workspace, workspace_size, stream);
  build_mask(c, f.delta, f.mask_state, workspace, workspace_size, stream);
  attention_forward(c, f.q, f.k, f.v, f.delta, f.mask_state, f.o, f.lse, stream);
}

void backward(const Config& c, const ForwardBuffers& f, const BackwardBuffers& g, void* workspace,
              size_t workspace_size, Stream stream) {
  attention_backward(c, f.q, f.k, f.v, f.delta, f.mask_state, f.o, f.lse, g.dout, g.dq, g.dk,
                     g.dv, g.ddelta, workspace, workspace_size, stream);
  if (!f.delta_given())
    dynamic_weights_backward(c, f.v, f.w_dt, f.a, g.ddelta, g.dw_dt, g.da, g.dv, workspace,
                             workspace_size, stream);
}

}  // namespace dma::cuda
