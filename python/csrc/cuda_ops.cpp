// The CUDA path of dma_torch._C: the kernels through the device-pointer API (dma/cuda_device.hpp;
// dma/cuda_decode.hpp for CudaDecodeCache, at the end) on torch's current stream, every buffer
// (outputs, mask state, workspace, status word, the decode cache) from torch's caching allocator.
// Compiled only when the extension is built with CUDA.
//
// q, k, v, dout: bf16 or fp16 (made contiguous; dout cast to q's dtype). w_dt, a, a given delta:
// any floating dtype, cast to float32. Outputs float32: o, lse, delta, the grads; the mask state
// is mask_state_bytes(cfg) opaque bytes, kept by the caller from the forward to the backward.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#include "common.h"
#include "dma/cuda_decode.hpp"
#include "dma/cuda_device.hpp"
#include "dma/validate.hpp"

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

// ---- decoding: dma::cuda's decode cache behind a Python object (dma/cuda_decode.hpp) ---------
//
//   CudaDecodeCache(B, Hq, Hkv, Hd, D, window, form, scale, max_length, fp16, device_index)
//   .prefill(b, k, v, w_dt, a, q, delta, check) -> (delta (Hd,P) f32, evict (Hd,P) int64,
//                                                    o (Hq,P,D) f32 | None, lse (Hq,P) f32 | None)
//   .step(q, k, v, w_dt, a, active, delta, check) -> (o (B,Hq,D) f32, lse (B,Hq) f32,
//                                                    delta (B,Hd) f32, position (B) int64 on the
//                                                    CPU, evicted (B,Hd) int64)
//   .positions(b, hd), .deltas(b, hd), .length(), .max_length(), .reset(b, max_length), .nbytes()
//
// The interface of the CPU DecodeCache (bindings.cpp), on device memory: the cache is one uint8
// tensor of cache_bytes() from torch's caching allocator on the given device, carved by
// cache_in(); every call enqueues on torch's current stream there, and its workspace, status
// word and outputs are tensors from the same allocator. q, k, v: the cache's bf16 or fp16; w_dt,
// a and a given delta: any floating dtype, used in float32. prefill runs the forward's phases
// over the prompt (B = 1, Lq = Lk = P: dynamic_weights or check_delta, build_mask, and
// attention_forward when q is given) and hands its delta and evict_of(mask state) to
// dma::cuda::prefill.
//
// The device keeps no length limit and no record of what a sequence may do, so this object keeps
// them on the host: length and max_length per sequence (the device's length[b] advances with
// them), and which sequences must be reset. With check (dma_torch.set_cuda_checks, default on):
// before anything is enqueued, the inputs of the sequences that step must be finite (and a given
// delta within float32 range / log2(e)), one synchronisation; after the launch the status word
// is read, a second one. prefill reads it before it writes the cache, so a call that raises
// leaves the cache as it was; a step's kernels have already run when a computed delta turns out
// bad, so then every sequence that stepped must be reset (step refuses them until then).
// Without check nothing is read back: a bad delta leaves its (b, hd) unchanged with o = lse = 0.
namespace dma_torch {
namespace {

using OptTensor = std::optional<at::Tensor>;

// As decode.cu: delta * log2(e) must be a finite float32.
constexpr float kMaxDecodeDelta = std::numeric_limits<float>::max() / 1.4426950408889634f;

// Values that must be finite (and, for a given delta, within kMaxDecodeDelta) before a call.
struct Checked {
  at::Tensor t;               // on the device, any dtype
  const char* name;
  std::vector<int64_t> dims;  // for the message's index
  bool per_sequence;          // dims[0] is B: only the rows of the sequences that step count
  bool delta_range;
};

class CudaDecodeCacheObject {
 public:
  CudaDecodeCacheObject(int64_t B, int64_t Hq, int64_t Hkv, int64_t Hd, int64_t D, int64_t window,
                        const std::string& form, double scale, int64_t max_length, bool fp16,
                        int64_t device_index)
      : config_(make_config(B, Hq, Hkv, Hd, D, window, form, scale, fp16)),
        device_(make_device(device_index)),
        elem_(fp16 ? at::kHalf : at::kBFloat16) {
    if (max_length < 0)
      throw dma::Error("max_length: " + std::to_string(max_length) +
                       " (must be >= 0; 0 means no limit)");
    length_.assign(B, 0);
    max_length_.assign(B, max_length);
    failed_.assign(B, 0);
    const c10::cuda::CUDAGuard guard(device_);
    memory_ = at::empty({static_cast<int64_t>(dc::cache_bytes(config_))},
                        at::TensorOptions().device(device_).dtype(at::kByte));
    cache_ = dc::cache_in(config_, memory_.data_ptr());
    dc::reset_cache(config_, cache_, current_stream());
  }
  CudaDecodeCacheObject(const CudaDecodeCacheObject&) = delete;
  CudaDecodeCacheObject& operator=(const CudaDecodeCacheObject&) = delete;

  pybind11::tuple prefill(int64_t b, const at::Tensor& k_in, const at::Tensor& v_in,
                          const OptTensor& w_dt_in, const OptTensor& a_in, const OptTensor& q_in,
                          const OptTensor& delta_in, bool check) {
    const dma::DecodeConfig& l = config_.layer;
    check_weights_given(w_dt_in, a_in, delta_in);
    check_sequence(b);
    if (length_[b] != 0)
      throw dma::Error("prefill: sequence " + std::to_string(b) + " already holds " +
                       std::to_string(length_[b]) + " tokens (reset it first)");
    expect_dim(k_in, 3, "k");
    const int64_t P = k_in.size(1);
    if (max_length_[b] > 0 && P > max_length_[b])
      throw dma::Error("prefill: the prompt of sequence " + std::to_string(b) + " has " +
                       std::to_string(P) + " tokens, more than its declared maximum length " +
                       std::to_string(max_length_[b]));
    if (P >= (int64_t{1} << 30))
      throw dma::Error("prefill: P = " + std::to_string(P) + " tokens (the GPU cache takes < 2^30)");
    const c10::cuda::CUDAGuard guard(device_);
    const at::Tensor k = elem_tensor(k_in, "k", {l.Hkv, P, l.D});
    const at::Tensor v = elem_tensor(v_in, "v", {l.Hkv, P, l.D});
    at::Tensor q, w_dt, a, delta_given;
    if (q_in) q = elem_tensor(*q_in, "q", {l.Hq, P, l.D});
    if (delta_in) {
      delta_given = float_tensor(*delta_in, "delta", {l.Hd, P});
    } else {
      w_dt = float_tensor(*w_dt_in, "w_dt", {l.Hd, l.Hkv * l.D});
      a = float_tensor(*a_in, "a", {l.Hd});
    }
    const auto fopt = k.options().dtype(at::kFloat);
    const dc::Stream st = current_stream();
    pybind11::object o_out = pybind11::none(), lse_out = pybind11::none();

    if (P == 0) {  // nothing to attend to: the sequence is emptied
      dc::prefill(config_, cache_, b, 1, 0, nullptr, nullptr, nullptr, nullptr, st);
      length_[b] = 0;
      failed_[b] = 0;
      if (q.defined()) {
        o_out = pybind11::cast(at::empty({l.Hq, 0, l.D}, fopt));
        lse_out = pybind11::cast(at::empty({l.Hq, 0}, fopt));
      }
      return pybind11::make_tuple(at::empty({l.Hd, 0}, fopt), at::empty({l.Hd, 0}, fopt.dtype(at::kLong)),
                                  o_out, lse_out);
    }

    if (check) {
      std::vector<Checked> items;
      if (q.defined()) items.push_back({q, "q", {l.Hq, P, l.D}, false, false});
      items.push_back({k, "k", {l.Hkv, P, l.D}, false, false});
      items.push_back({v, "v", {l.Hkv, P, l.D}, false, false});
      if (delta_given.defined()) {
        items.push_back({delta_given, "delta", {l.Hd, P}, false, true});
      } else {
        items.push_back({w_dt, "w_dt", {l.Hd, l.Hkv * l.D}, false, false});
        items.push_back({a, "a", {l.Hd}, false, false});
      }
      check_values(items, {});
    }

    // the prompt's forward (B = 1, Lq = Lk = P): its delta and mask state, o and lse with q
    const dc::Config fc{l.shape(P, P), l.options(), config_.precision};
    dc::check_config(fc);
    at::Tensor delta = at::empty({1, l.Hd, P}, fopt);
    if (delta_given.defined()) delta.copy_(delta_given.view({1, l.Hd, P}));  // read, not written
    const at::Tensor mask_state = bytes(k, dc::mask_state_bytes(fc));
    const at::Tensor status = at::empty({1}, k.options().dtype(at::kLong));
    const size_t ws_bytes = dc::workspace_bytes(fc);
    const at::Tensor ws = bytes(k, ws_bytes);
    at::Tensor o, lse;
    if (q.defined()) {
      o = at::empty({1, l.Hq, P, l.D}, fopt);
      lse = at::empty({1, l.Hq, P}, fopt);
      const dc::ForwardBuffers f = forward_buffers(q, k, v, w_dt, a, delta, mask_state, o, lse, status);
      dc::forward(fc, f, ws.data_ptr(), ws_bytes, st);
    } else {  // forward() without its attention phase
      dc::reset_status(status.data_ptr<int64_t>(), st);
      if (delta_given.defined())
        dc::check_delta(fc, delta.data_ptr<float>(), status.data_ptr<int64_t>(), st);
      else
        dc::dynamic_weights(fc, v.data_ptr(), w_dt.data_ptr<float>(), a.data_ptr<float>(),
                            delta.data_ptr<float>(), status.data_ptr<int64_t>(), ws.data_ptr(),
                            ws_bytes, st);
      dc::build_mask(fc, delta.data_ptr<float>(), mask_state.data_ptr(), ws.data_ptr(), ws_bytes, st);
    }
    if (check) dc::check_status(fc, status.data_ptr<int64_t>(), st);  // before the cache changes

    const int32_t* evict = dc::evict_of(mask_state.data_ptr());
    dc::prefill(config_, cache_, b, 1, P, k.data_ptr(), v.data_ptr(), delta.data_ptr<float>(), evict, st);
    length_[b] = P;
    failed_[b] = 0;
    const at::Tensor evict_t =
        mask_state.narrow(0, 0, l.Hd * P * static_cast<int64_t>(sizeof(int32_t))).view(at::kInt);
    if (q.defined()) {
      o_out = pybind11::cast(o.view({l.Hq, P, l.D}));
      lse_out = pybind11::cast(lse.view({l.Hq, P}));
    }
    return pybind11::make_tuple(delta.view({l.Hd, P}), evict_t.view({l.Hd, P}).to(at::kLong), o_out,
                                lse_out);
  }

  pybind11::tuple step(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                       const OptTensor& w_dt_in, const OptTensor& a_in,
                       const std::optional<std::vector<int64_t>>& active, const OptTensor& delta_in,
                       bool check) {
    const dma::DecodeConfig& l = config_.layer;
    const int64_t B = l.B;
    check_weights_given(w_dt_in, a_in, delta_in);
    const c10::cuda::CUDAGuard guard(device_);
    const at::Tensor q = elem_tensor(q_in, "q", {B, l.Hq, l.D});
    const at::Tensor k = elem_tensor(k_in, "k", {B, l.Hkv, l.D});
    const at::Tensor v = elem_tensor(v_in, "v", {B, l.Hkv, l.D});
    at::Tensor w_dt, a, delta_given;
    if (delta_in) {
      delta_given = float_tensor(*delta_in, "delta", {B, l.Hd});
    } else {
      w_dt = float_tensor(*w_dt_in, "w_dt", {l.Hd, l.Hkv * l.D});
      a = float_tensor(*a_in, "a", {l.Hd});
    }
    std::vector<uint8_t> steps(B, 1);
    if (active) {
      if (static_cast<int64_t>(active->size()) != B)
        throw dma::Error("active: has " + std::to_string(active->size()) +
                         " elements, expected B = " + std::to_string(B));
      for (int64_t b = 0; b < B; ++b) steps[b] = (*active)[b] != 0 ? 1 : 0;
    }
    for (int64_t b = 0; b < B; ++b) {
      if (!steps[b]) continue;
      const std::string seq = "step: sequence " + std::to_string(b);
      if (failed_[b])
        throw dma::Error(seq + " failed in an earlier step (a new delta the device flagged); "
                         "reset it first");
      if (max_length_[b] > 0 && length_[b] >= max_length_[b])
        throw dma::Error(seq + " is finished: it reached its declared maximum length " +
                         std::to_string(max_length_[b]));
      if (length_[b] >= std::numeric_limits<int32_t>::max())
        throw dma::Error(seq + " holds 2^31 - 1 tokens, the most the GPU cache counts");
    }
    if (check) {
      std::vector<Checked> items{{q, "q", {B, l.Hq, l.D}, true, false},
                                 {k, "k", {B, l.Hkv, l.D}, true, false},
                                 {v, "v", {B, l.Hkv, l.D}, true, false}};
      if (delta_given.defined()) {
        items.push_back({delta_given, "delta", {B, l.Hd}, true, true});
      } else {
        items.push_back({w_dt, "w_dt", {l.Hd, l.Hkv * l.D}, false, false});
        items.push_back({a, "a", {l.Hd}, false, false});
      }
      check_values(items, steps);
    }

    const auto fopt = q.options().dtype(at::kFloat);
    const at::Tensor o = at::empty({B, l.Hq, l.D}, fopt), lse = at::empty({B, l.Hq}, fopt);
    const at::Tensor delta_out = at::empty({B, l.Hd}, fopt);
    const at::Tensor evicted = at::empty({B, l.Hd}, q.options().dtype(at::kInt));
    const at::Tensor status = at::empty({1}, q.options().dtype(at::kLong));
    const size_t ws_bytes = dc::step_workspace_bytes(config_);
    const at::Tensor ws = bytes(q, ws_bytes);
    const dc::Stream st = current_stream();
    at::Tensor active_dev;
    if (active) {  // through pinned memory: an asynchronous copy, ordered before the step
      const at::Tensor host = at::empty({B}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
      std::memcpy(host.data_ptr<uint8_t>(), steps.data(), steps.size());
      active_dev = host.to(device_, at::kByte, /*non_blocking=*/true);
    }

    dc::StepBuffers sb;
    sb.q = q.data_ptr();
    sb.k = k.data_ptr();
    sb.v = v.data_ptr();
    sb.active = active_dev.defined() ? active_dev.data_ptr<uint8_t>() : nullptr;
    if (delta_given.defined()) {
      sb.delta_given = delta_given.data_ptr<float>();
    } else {
      sb.w_dt = w_dt.data_ptr<float>();
      sb.a = a.data_ptr<float>();
    }
    sb.o = o.data_ptr<float>();
    sb.lse = lse.data_ptr<float>();
    sb.delta_out = delta_out.data_ptr<float>();
    sb.evicted = evicted.data_ptr<int32_t>();
    sb.status = status.data_ptr<int64_t>();
    dc::reset_status(sb.status, st);
    dc::step(config_, cache_, sb, ws.data_ptr(), ws_bytes, st);

    // the device's length[b] has advanced for every sequence that stepped, flagged or not
    std::vector<int64_t> position(B, -1);
    for (int64_t b = 0; b < B; ++b)
      if (steps[b]) position[b] = length_[b]++;
    if (check) {
      try {
        dc::check_step_status(config_, sb.status, st);
      } catch (const dma::Error& e) {
        std::string which;
        for (int64_t b = 0; b < B; ++b)
          if (steps[b]) {
            failed_[b] = 1;
            which += (which.empty() ? "" : ", ") + std::to_string(b);
          }
        throw dma::Error(std::string(e.what()) + " (on the GPU the step has run: reset every "
                         "sequence it stepped: " + which + ")");
      }
    }
    at::Tensor position_t = at::empty({B}, at::TensorOptions().dtype(at::kLong));
    std::memcpy(position_t.data_ptr<int64_t>(), position.data(), position.size() * sizeof(int64_t));
    return pybind11::make_tuple(o, lse, delta_out, position_t, evicted.to(at::kLong));
  }

  // The entries of (b, hd) in position order: (position, delta). Reads the device (a sync).
  std::vector<std::pair<int64_t, double>> entries(int64_t b, int64_t hd) const {
    check_head(b, hd);
    const c10::cuda::CUDAGuard guard(device_);
    const int64_t w = config_.layer.window, bh = b * config_.layer.Hd + hd;
    const int64_t count = device_view(cache_.count + bh, 1, at::kInt).cpu().item<int32_t>();
    if (count < 0 || count > w)
      throw dma::Error("internal: the device cache of sequence " + std::to_string(b) +
                       ", delta head " + std::to_string(hd) + " counts " + std::to_string(count) +
                       " entries (window " + std::to_string(w) + ")");
    std::vector<std::pair<int64_t, double>> out;
    if (count == 0) return out;
    const at::Tensor pos = device_view(cache_.pos + bh * w, count, at::kInt).cpu();
    const at::Tensor delta = device_view(cache_.delta + bh * w, count, at::kFloat).cpu();
    for (int64_t s = 0; s < count; ++s)
      out.emplace_back(pos.data_ptr<int32_t>()[s], delta.data_ptr<float>()[s]);
    std::sort(out.begin(), out.end());  // slots are not in position order; positions are unique
    return out;
  }

  std::vector<int64_t> positions(int64_t b, int64_t hd) const {
    std::vector<int64_t> out;
    for (const auto& e : entries(b, hd)) out.push_back(e.first);
    return out;
  }

  std::vector<double> deltas(int64_t b, int64_t hd) const {
    std::vector<double> out;
    for (const auto& e : entries(b, hd)) out.push_back(e.second);
    return out;
  }

  std::vector<int64_t> length() const { return length_; }
  std::vector<int64_t> max_length() const { return max_length_; }
  int64_t nbytes() const { return memory_.numel(); }

  // Empties sequence b; max_length >= 0 also sets its declared maximum (0 = none), -1 keeps it.
  void reset(int64_t b, int64_t max_length) {
    if (max_length < -1)
      throw dma::Error("max_length: " + std::to_string(max_length) +
                       " (must be >= 0; 0 means no limit)");
    check_sequence(b);
    const c10::cuda::CUDAGuard guard(device_);
    dc::reset_sequence(config_, cache_, b, current_stream());
    length_[b] = 0;
    failed_[b] = 0;
    if (max_length >= 0) max_length_[b] = max_length;
  }

 private:
  static dc::DecodeConfig make_config(int64_t B, int64_t Hq, int64_t Hkv, int64_t Hd, int64_t D,
                                      int64_t window, const std::string& form, double scale,
                                      bool fp16) {
    dc::DecodeConfig c;
    c.layer.B = B; c.layer.Hq = Hq; c.layer.Hkv = Hkv; c.layer.Hd = Hd; c.layer.D = D;
    c.layer.window = window;
    c.layer.form = dma::parse_form(form);
    c.layer.scale = scale;
    c.layer.max_length = 0;  // kept here, per sequence
    c.precision = fp16 ? dma::Precision::fp16 : dma::Precision::bf16;
    dc::check_decode_config(c);  // head dims 64 and 128, grid limits, the layer itself
    return c;
  }

  static at::Device make_device(int64_t index) {
    const int64_t n = c10::cuda::device_count();
    if (index < 0 || index >= n)
      throw dma::Error("device: cuda:" + std::to_string(index) + " does not exist (" +
                       std::to_string(n) + " CUDA devices)");
    return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index));
  }

  void check_sequence(int64_t b) const {
    if (b < 0 || b >= config_.layer.B)
      throw dma::Error("b: sequence " + std::to_string(b) + " does not exist (B = " +
                       std::to_string(config_.layer.B) + ")");
  }

  void check_head(int64_t b, int64_t hd) const {
    check_sequence(b);
    if (hd < 0 || hd >= config_.layer.Hd)
      throw dma::Error("h: delta head " + std::to_string(hd) + " does not exist (Hd = " +
                       std::to_string(config_.layer.Hd) + ")");
  }

  static void check_sizes(const at::Tensor& t, const char* name, const std::vector<int64_t>& sizes) {
    if (t.sizes() != at::IntArrayRef(sizes))
      throw dma::Error(std::string(name) + ": shape " + shape_string(t.sizes()) + ", expected " +
                       shape_string(sizes));
  }

  // q, k, v: the cache's element type, on its device; contiguous and 16-byte aligned (the kernels
  // load 8 elements at a time; a contiguous view at an odd offset is copied).
  at::Tensor elem_tensor(const at::Tensor& t, const char* name, const std::vector<int64_t>& sizes) const {
    if (t.device() != device_ || t.scalar_type() != elem_)
      throw dma::Error(std::string(name) + ": a " + c10::toString(t.scalar_type()) + " tensor on " +
                       t.device().str() + "; the cache takes " + c10::toString(elem_) +
                       " tensors on " + device_.str());
    check_sizes(t, name, sizes);
    at::Tensor c = t.contiguous();
    if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
    return c;
  }

  // w_dt, a, delta: any floating type on the cache's device, as contiguous float32, 16-byte
  // aligned (the step loads w_dt 16 bytes at a time).
  at::Tensor float_tensor(const at::Tensor& t, const char* name, const std::vector<int64_t>& sizes) const {
    if (t.device() != device_ || !at::isFloatingType(t.scalar_type()))
      throw dma::Error(std::string(name) + ": a " + c10::toString(t.scalar_type()) + " tensor on " +
                       t.device().str() + "; the cache takes floating tensors on " + device_.str());
    check_sizes(t, name, sizes);
    at::Tensor c = t.to(at::kFloat).contiguous();
    if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
    return c;
  }

  // n elements of the cache memory at p, as a tensor that shares it.
  template <typename T>
  at::Tensor device_view(const T* p, int64_t n, at::ScalarType type) const {
    const int64_t at_byte = reinterpret_cast<const char*>(p) - static_cast<const char*>(memory_.data_ptr());
    return memory_.narrow(0, at_byte, n * static_cast<int64_t>(sizeof(T))).view(type);
  }

  // One synchronisation for all items; on a failure, the first bad element of the first bad
  // item (in the rows that count), named as the CPU cache names it. steps: B flags, empty = all.
  void check_values(const std::vector<Checked>& items, const std::vector<uint8_t>& steps) const {
    std::vector<at::Tensor> flags;  // per item: B (per sequence) or 1 bools, true = all good
    for (const Checked& it : items) {
      const at::Tensor good = it.delta_range ? it.t.to(at::kFloat).abs() <= kMaxDecodeDelta
                                             : at::isfinite(it.t);
      const int64_t rows = it.per_sequence ? it.t.size(0) : 1;
      flags.push_back(good.reshape({rows, good.numel() / rows}).all(1));
    }
    const at::Tensor host = at::cat(flags).cpu();
    const bool* ok = host.data_ptr<bool>();
    int64_t at_flag = 0;
    for (const Checked& it : items) {
      const int64_t rows = it.per_sequence ? it.t.size(0) : 1;
      bool bad = false;
      for (int64_t r = 0; r < rows; ++r)
        bad = bad || (!ok[at_flag + r] && (!it.per_sequence || steps.empty() || steps[r]));
      at_flag += rows;
      if (!bad) continue;
      // the slow path, once: which element, in float64 on the host (bf16/fp16/fp32 exactly)
      const at::Tensor h = it.t.to(at::kDouble).cpu().contiguous();
      std::vector<double> x(h.data_ptr<double>(), h.data_ptr<double>() + h.numel());
      const int64_t row = rows > 0 ? static_cast<int64_t>(x.size()) / rows : 0;
      if (it.per_sequence && !steps.empty())
        for (int64_t r = 0; r < rows; ++r)
          if (!steps[r]) std::fill(x.begin() + r * row, x.begin() + (r + 1) * row, 0.0);
      dma::validate_finite(x, it.dims, it.name);  // "k[1,1,1] is nan (inputs must be finite)"
      for (size_t n = 0; n < x.size(); ++n)
        if (!(std::fabs(static_cast<float>(x[n])) <= kMaxDecodeDelta))
          throw dma::Error(std::string(it.name) + dma::format_index(static_cast<int64_t>(n), it.dims) +
                           " = " + std::to_string(x[n]) + " is beyond float32 range / log2(e)");
      throw dma::Error(std::string("internal: ") + it.name + " was flagged but every value is good");
    }
  }

  dc::DecodeConfig config_;
  at::Device device_;
  at::ScalarType elem_;
  at::Tensor memory_;      // cache_bytes(config_), the whole cache
  dc::DeviceCache cache_;  // its pieces, carved by cache_in
  std::vector<int64_t> length_, max_length_;  // per sequence, as in dma::DecodeCache
  std::vector<uint8_t> failed_;  // 1: a step flagged this sequence; it must be reset
};

}  // namespace

void bind_cuda_decode(pybind11::module_& m) {
  using namespace pybind11::literals;
  pybind11::class_<CudaDecodeCacheObject>(m, "CudaDecodeCache")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const std::string&,
                          double, int64_t, bool, int64_t>(),
           "B"_a, "Hq"_a, "Hkv"_a, "Hd"_a, "D"_a, "window"_a, "form"_a, "scale"_a, "max_length"_a,
           "fp16"_a, "device_index"_a)
      .def("prefill", &CudaDecodeCacheObject::prefill, "b"_a, "k"_a, "v"_a, "w_dt"_a, "a"_a, "q"_a,
           "delta"_a, "check"_a)
      .def("step", &CudaDecodeCacheObject::step, "q"_a, "k"_a, "v"_a, "w_dt"_a, "a"_a, "active"_a,
           "delta"_a, "check"_a)
      .def("positions", &CudaDecodeCacheObject::positions, "b"_a, "hd"_a)
      .def("deltas", &CudaDecodeCacheObject::deltas, "b"_a, "hd"_a)
      .def("length", &CudaDecodeCacheObject::length)
      .def("max_length", &CudaDecodeCacheObject::max_length)
      .def("nbytes", &CudaDecodeCacheObject::nbytes)
      .def("reset", &CudaDecodeCacheObject::reset, "b"_a, "max_length"_a);
}

}  // namespace dma_torch
