// What the CPU and CUDA bindings share: the arguments of one call and their DMA shape/options.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "dma/types.hpp"

namespace dma_torch {

// One call's inputs as they come from Python (already checked there; checked again here, since
// _C can be called directly). w_dt and a, or delta, are given.
struct Args {
  at::Tensor q, k, v;
  std::optional<at::Tensor> w_dt, a, delta;
  int64_t window = 0;
  bool causal = true;
  std::string form = "exp";
  double scale = 0.0;  // 0: 1/sqrt(D)

  bool delta_given() const { return delta.has_value(); }
};

// Throws dma::Error (-> dma_torch.DMAError, a ValueError) naming the tensor.
// "[2, 4, 5]", written out here rather than with c10's stream operators.
inline std::string shape_string(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

inline void expect_dim(const at::Tensor& t, int64_t dim, const char* name) {
  if (t.dim() != dim)
    throw dma::Error(std::string(name) + ": expected " + std::to_string(dim) + " dimensions, got " +
                     std::to_string(t.dim()));
}

// The dynamic weights of a decode call: w_dt and a, or delta (not both).
inline void check_weights_given(const std::optional<at::Tensor>& w_dt,
                                const std::optional<at::Tensor>& a,
                                const std::optional<at::Tensor>& delta) {
  if (delta && (w_dt || a))
    throw dma::Error("delta: given together with w_dt/a; pass either w_dt and a, or delta");
  if (!delta && (!w_dt || !a)) throw dma::Error("w_dt, a: both are needed when delta is not given");
}

inline dma::Shape shape_of(const Args& a) {
  expect_dim(a.q, 4, "q");
  expect_dim(a.k, 4, "k");
  expect_dim(a.v, 4, "v");
  dma::Shape s;
  s.B = a.q.size(0);
  s.Hq = a.q.size(1);
  s.Lq = a.q.size(2);
  s.D = a.q.size(3);
  s.Hkv = a.k.size(1);
  s.Lk = a.k.size(2);
  if (a.delta_given()) {
    expect_dim(*a.delta, 3, "delta");
    s.Hd = a.delta->size(1);
  } else {
    if (!a.w_dt || !a.a) throw dma::Error("w_dt, a: both are needed when delta is not given");
    expect_dim(*a.w_dt, 2, "w_dt");
    s.Hd = a.w_dt->size(0);
  }
  return s;
}

inline dma::Options options_of(const Args& a) {
  dma::Options o;
  o.window = a.window;
  o.causal = a.causal;
  o.form = dma::parse_form(a.form);
  o.scale = a.scale;
  return o;
}

#ifdef DMA_TORCH_WITH_CUDA
// cuda_ops.cpp. Outputs as the CPU path's, but float32 and the mask state as opaque bytes.
std::vector<at::Tensor> forward_cuda(const Args& a, bool check);
std::vector<at::Tensor> backward_cuda(const Args& a, const at::Tensor& delta,
                                      const at::Tensor& mask_state, const at::Tensor& o,
                                      const at::Tensor& lse, const at::Tensor& dout);
int64_t cuda_mask_state_bytes(const dma::Shape& s, const dma::Options& o, bool fp16);
// _C.CudaDecodeCache: the GPU decode cache (dma/cuda_decode.hpp), defined in cuda_ops.cpp.
void bind_cuda_decode(pybind11::module_& m);
#endif

}  // namespace dma_torch
