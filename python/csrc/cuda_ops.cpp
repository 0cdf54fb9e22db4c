// The CUDA path of dma_torch._C: the kernels through the device-pointer API (dma/cuda_device.hpp)
// on torch's current stream, every buffer (outputs, mask state, workspace, status word) from torch's
// caching allocator. Compiled only when the extension is built with CUDA.
//
// q, k, v, dout: bf16 or fp16 (made contiguous; dout cast to q's dtype). w_dt, a, a given delta:
// any floating dtype, cast to float32. Outputs float32: o, lse, delta, the grads; the mask state
// is mask_state_bytes(cfg) opaque bytes, kept by the caller from the forward to the backward.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"
#include "dma/cuda_device.hpp"

namespace dma_torch {
namespace {

namespace dc = dma::cuda;

void expect_cuda(const at::Tensor& t, const at::Tensor& q, const char* name) {
  if (t.device() != q.device())
    throw dma::Error(std::string(name) + ": is on " + t.device().str() + ", expected " +
                     q.device().str() + " like q");
}

dc::Config config_of(const Args& a) {
  dc::Config c;
  c.shape = shape_of(a);
  c.opt = options_of(a);
  const at::ScalarType t = a.q.scalar_type();
  if (t != at::kBFloat16 && t != at::kHalf)
    throw dma::Error(std::string("q: dtype ") + c10::toString(t) +
                     " on CUDA; the kernels take bfloat16 or float16");
  for (const auto& [x, name] : {std::pair{&a.k, "k"}, std::pair{&a.v, "v"}}) {
    expect_cuda(*x, a.q, name);
    if (x->scalar_type() != t)
      throw dma::Error(std::string(name) + ": dtype " + c10::toString(x->scalar_type()) +
                       ", expected " + c10::toString(t) + " like q");
  }
  for (const auto& [x, name] : {std::pair{&a.w_dt, "w_dt"}, std::pair{&a.a, "a"},
                                std::pair{&a.delta, "delta"}})
    if (x->has_value()) expect_cuda(**x, a.q, name);
  c.precision = t == at::kHalf ? dma::Precision::fp16 : dma::Precision::bf16;
  dc::check_config(c);  // head dims, grid limits, shape and options: dma::Error
  return c;
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }
at::Tensor bytes(const at::Tensor& like, size_t n) {
  return at::empty({static_cast<int64_t>(n)}, like.options().dtype(at::kByte));
}
dc::Stream current_stream() { return static_cast<dc::Stream>(at::cuda::getCurrentCUDAStream().stream()); }

// One sync: names the first of q, k, v holding a NaN or an infinity (the kernels do not look).
void check_inputs_finite(const Args& a) {
  const at::Tensor bad = at::stack({at::isfinite(a.q).all(), at::isfinite(a.k).all(),
                                    at::isfinite(a.v).all()}).logical_not().cpu();
  const char* names[] = {"q", "k", "v"};
  for (int n = 0; n < 3; ++n)
    if (bad[n].item<bool>())
      throw dma::Error(std::string(names[n]) + ": holds a nan or inf (inputs must be finite)");
}

// The forward's buffers as the API takes them (w_dt and a undefined when delta is given,
// status undefined in the backward).
dc::ForwardBuffers forward_buffers(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& w_dt, const at::Tensor& a, const at::Tensor& delta,
                                   const at::Tensor& mask_state, const at::Tensor& o,
                                   const at::Tensor& lse, const at::Tensor& status) {
  dc::ForwardBuffers f;
  f.q = q.data_ptr();
  f.k = k.data_ptr();
  f.v = v.data_ptr();
  if (w_dt.defined()) {
    f.w_dt = w_dt.data_ptr<float>();
    f.a = a.data_ptr<float>();
  }
  f.delta = delta.data_ptr<float>();
  f.mask_state = mask_state.data_ptr();
  f.o = o.data_ptr<float>();
  f.lse = lse.data_ptr<float>();
  f.status = status.defined() ? status.data_ptr<int64_t>() : nullptr;
  return f;
}

}  // namespace

int64_t cuda_mask_state_bytes(const dma::Shape& s, const dma::Options& o, bool fp16) {
  dc::Config c{s, o, fp16 ? dma::Precision::fp16 : dma::Precision::bf16};
  return static_cast<int64_t>(dc::mask_state_bytes(c));
}

std::vector<at::Tensor> forward_cuda(const Args& args, bool check) {
  const c10::cuda::CUDAGuard guard(args.q.device());
  const dc::Config c = config_of(args);
  const dma::Shape& s = c.shape;
  const at::Tensor q = args.q.contiguous(), k = args.k.contiguous(), v = args.v.contiguous();
  const auto fopt = q.options().dtype(at::kFloat);

  at::Tensor w_dt, a, delta = at::empty({s.B, s.Hd, s.Lk}, fopt);
  if (args.delta_given()) {
    delta.copy_(*args.delta);  // read by the kernels, not written
  } else {
    w_dt = f32(*args.w_dt);
    a = f32(*args.a);
  }
  at::Tensor mask_state = bytes(q, dc::mask_state_bytes(c));
  at::Tensor o = at::empty({s.B, s.Hq, s.Lq, s.D}, fopt), lse = at::empty({s.B, s.Hq, s.Lq}, fopt);
  at::Tensor status = at::empty({1}, q.options().dtype(at::kLong));
  const size_t ws_bytes = dc::workspace_bytes(c);
  at::Tensor ws = bytes(q, ws_bytes);

  const dc::ForwardBuffers f = forward_buffers(q, k, v, w_dt, a, delta, mask_state, o, lse, status);
  const dc::Stream st = current_stream();
  dc::forward(c, f, ws.data_ptr(), ws_bytes, st);
  if (check) {
    check_inputs_finite(args);
    dc::check_status(c, f.status, st);  // a bad delta: dma::Error naming its index
  }
  return {o, lse, delta, mask_state};
}

std::vector<at::Tensor> backward_cuda(const Args& args, const at::Tensor& delta_saved,
                                      const at::Tensor& mask_state, const at::Tensor& o_saved,
                                      const at::Tensor& lse_saved, const at::Tensor& dout) {
  const c10::cuda::CUDAGuard guard(args.q.device());
  const dc::Config c = config_of(args);
  const dma::Shape& s = c.shape;
  for (const auto& [x, name] : {std::pair{&delta_saved, "delta"}, std::pair{&mask_state, "mask_state"},
                                std::pair{&o_saved, "o"}, std::pair{&lse_saved, "lse"},
                                std::pair{&dout, "dout"}})
    expect_cuda(*x, args.q, name);
  if (mask_state.scalar_type() != at::kByte ||
      mask_state.numel() != static_cast<int64_t>(dc::mask_state_bytes(c)))
    throw dma::Error("mask_state: expected the forward's mask state (uint8, mask_state_bytes)");
  if (delta_saved.numel() != s.delta_numel() || o_saved.numel() != s.q_numel() ||
      lse_saved.numel() != s.lse_numel() || dout.numel() != s.q_numel())
    throw dma::Error("backward: delta, o, lse or dout does not have the forward's shape");
  const at::Tensor q = args.q.contiguous(), k = args.k.contiguous(), v = args.v.contiguous();
  const at::Tensor d_o = dout.to(q.scalar_type()).contiguous();
  const at::Tensor delta = f32(delta_saved), o = f32(o_saved), lse = f32(lse_saved);
  const auto fopt = q.options().dtype(at::kFloat);
  const bool given = args.delta_given();

  at::Tensor w_dt, a;
  if (!given) {
    w_dt = f32(*args.w_dt);
    a = f32(*args.a);
  }
  at::Tensor dq = at::empty({s.B, s.Hq, s.Lq, s.D}, fopt), dk = at::empty({s.B, s.Hkv, s.Lk, s.D}, fopt),
             dv = at::empty({s.B, s.Hkv, s.Lk, s.D}, fopt), ddelta = at::empty({s.B, s.Hd, s.Lk}, fopt);
  at::Tensor dw_dt = given ? at::empty({0}, fopt) : at::empty({s.Hd, s.Hkv * s.D}, fopt);
  at::Tensor da = at::empty({given ? 0 : s.Hd}, fopt);
  const size_t ws_bytes = dc::workspace_bytes(c);
  at::Tensor ws = bytes(q, ws_bytes);
  const dc::Stream st = current_stream();

  // The backward reads the forward's buffers as they were left; no status word.
  const dc::ForwardBuffers f =
      forward_buffers(q, k, v, w_dt, a, delta, mask_state, o, lse, at::Tensor());
  dc::BackwardBuffers g;
  g.dout = d_o.data_ptr();
  g.dq = dq.data_ptr<float>();
  g.dk = dk.data_ptr<float>();
  g.dv = dv.data_ptr<float>();
  g.ddelta = ddelta.data_ptr<float>();
  if (!given) {
    g.dw_dt = dw_dt.data_ptr<float>();
    g.da = da.data_ptr<float>();
  }
  dc::backward(c, f, g, ws.data_ptr(), ws_bytes, st);
  return {dq, dk, dv, ddelta, dw_dt, da};
}

}  // namespace dma_torch
