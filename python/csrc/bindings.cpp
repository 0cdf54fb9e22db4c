// dma_torch._C: the DMA op on torch tensors. CPU tensors (float32/float64) run the tiled CPU code of
// core/ (dma::run_pipeline with Backend::tiled for the forward, tiled_backward and
// dynamic_weights_backward for the backward); CUDA tensors go to cuda_ops.cpp.
//
//   forward(q, k, v, w_dt, a, delta, window, causal, form, scale, check) -> [o, lse, delta, mask_state]
//   backward(q, k, v, w_dt, a, delta, mask_state, o, lse, dout, window, causal, form, scale)
//       -> [dq, dk, dv, ddelta, dw_dt, da]        (dw_dt, da empty when delta was given)
//
// On the CPU every output has q's dtype and mask_state is evict (B,Hd,Lk) int64. dma::Error
// becomes dma_torch._C.DMAError, a ValueError.
#include <torch/extension.h>

#include <cstring>

#include "common.h"
#include "dma/pipeline.hpp"
#include "dma/validate.hpp"

namespace dma_torch {
namespace {

template <typename T>
std::vector<T> to_vec(const at::Tensor& t, const char* name) {
  if (t.device().type() != at::kCPU)
    throw dma::Error(std::string(name) + ": is on " + t.device().str() + ", expected the CPU like q");
  if (t.scalar_type() != c10::CppTypeToScalarType<T>::value)
    throw dma::Error(std::string(name) + ": dtype " + std::string(c10::toString(t.scalar_type())) +
                     ", expected " + c10::toString(c10::CppTypeToScalarType<T>::value) + " like q");
  const at::Tensor c = t.contiguous();
  const T* p = c.data_ptr<T>();
  return std::vector<T>(p, p + c.numel());
}

template <typename T>
at::Tensor to_tensor(const std::vector<T>& v, at::IntArrayRef sizes) {
  at::Tensor t = at::empty(sizes, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  if (static_cast<int64_t>(v.size()) != t.numel())
    throw dma::Error("internal: an output has " + std::to_string(v.size()) + " elements, expected " +
                     std::to_string(t.numel()));
  if (!v.empty()) std::memcpy(t.data_ptr<T>(), v.data(), v.size() * sizeof(T));
  return t;
}

// The problem as core/ takes it (validate_problem checks it all, finiteness included).
template <typename T>
dma::Problem<T> problem_of(const Args& a) {
  dma::Problem<T> p;
  p.shape = shape_of(a);
  p.opt = options_of(a);
  p.q = to_vec<T>(a.q, "q");
  p.k = to_vec<T>(a.k, "k");
  p.v = to_vec<T>(a.v, "v");
  if (a.delta_given()) {
    p.delta = to_vec<T>(*a.delta, "delta");
  } else {
    p.w_dt = to_vec<T>(*a.w_dt, "w_dt");
    p.a = to_vec<T>(*a.a, "a");
  }
  return p;
}

template <typename T>
std::vector<at::Tensor> forward_cpu(const Args& a) {
  const dma::Problem<T> p = problem_of<T>(a);
  const dma::Shape& s = p.shape;
  dma::Result<T> r;
  {
    pybind11::gil_scoped_release nogil;
    r = dma::run_pipeline(p, dma::Backend::tiled, dma::TileConfig{}, /*want_mask=*/false);
  }
  return {to_tensor(r.fwd.o, {s.B, s.Hq, s.Lq, s.D}), to_tensor(r.fwd.lse, {s.B, s.Hq, s.Lq}),
          to_tensor(r.delta, {s.B, s.Hd, s.Lk}), to_tensor(r.evict, {s.B, s.Hd, s.Lk})};
}

template <typename T>
void check_finite_output(const std::vector<T>& t, const std::vector<int64_t>& dims, const char* name) {
  const int64_t n = dma::first_non_finite(t);
  if (n >= 0)
    throw dma::Error(std::string(name) + dma::format_index(n, dims) +
                     " is not finite: the backward overflowed; the inputs are too large");
}

// Args carry the forward's inputs: w_dt and a when the forward computed delta, else delta is the
// given one. `delta` is the forward's delta output in both cases.
template <typename T>
std::vector<at::Tensor> backward_cpu(Args a, const at::Tensor& delta, const at::Tensor& evict_t,
                                     const at::Tensor& o, const at::Tensor& lse,
                                     const at::Tensor& dout) {
  const bool given = a.delta_given();
  dma::Problem<T> p = problem_of<T>(a);
  const dma::Shape& s = p.shape;
  p.dout = to_vec<T>(dout, "dout");
  dma::validate_problem(p);
  const std::vector<T> d = to_vec<T>(delta, "delta");
  if (evict_t.scalar_type() != at::kLong || evict_t.numel() != s.delta_numel())
    throw dma::Error("mask_state: expected the forward's evict, int64 (B,Hd,Lk)");
  const at::Tensor ec = evict_t.contiguous();
  const std::vector<int64_t> evict(ec.data_ptr<int64_t>(), ec.data_ptr<int64_t>() + ec.numel());
  dma::ForwardResult<T> fwd{to_vec<T>(o, "o"), to_vec<T>(lse, "lse")};
  dma::validate_numel(d, s.delta_numel(), "delta");
  dma::validate_numel(fwd.o, s.q_numel(), "o");
  dma::validate_numel(fwd.lse, s.lse_numel(), "lse");

  dma::AttentionGrads<T> g;
  dma::DynamicWeightGrads<T> dw;
  {
    pybind11::gil_scoped_release nogil;
    g = dma::tiled_backward(s, p.opt, dma::TileConfig{}, p.q, p.k, p.v, d, evict, fwd, p.dout);
    if (!given) {
      dw = dma::dynamic_weights_backward(s, p.opt.form, p.v, p.w_dt, p.a, g.ddelta);
      for (size_t n = 0; n < dw.dv.size(); ++n) g.dv[n] += dw.dv[n];  // v's total gradient
    }
  }
  const std::vector<int64_t> q_dims{s.B, s.Hq, s.Lq, s.D}, kv_dims{s.B, s.Hkv, s.Lk, s.D};
  check_finite_output(g.dq, q_dims, "dq");
  check_finite_output(g.dk, kv_dims, "dk");
  check_finite_output(g.dv, kv_dims, "dv");
  check_finite_output(g.ddelta, {s.B, s.Hd, s.Lk}, "ddelta");
  check_finite_output(dw.dw_dt, {s.Hd, s.Hkv * s.D}, "dw_dt");
  check_finite_output(dw.da, {s.Hd}, "da");
  const auto empty = [] { return to_tensor(std::vector<T>{}, {0}); };
  return {to_tensor(g.dq, q_dims), to_tensor(g.dk, kv_dims), to_tensor(g.dv, kv_dims),
          to_tensor(g.ddelta, {s.B, s.Hd, s.Lk}),
          given ? empty() : to_tensor(dw.dw_dt, {s.Hd, s.Hkv * s.D}),
          given ? empty() : to_tensor(dw.da, {s.Hd})};
}

#ifndef DMA_TORCH_WITH_CUDA
[[noreturn]] void no_cuda() {
  throw dma::Error("q: is a CUDA tensor, but dma_torch was built without CUDA (rebuild with nvcc and "
                   "a CUDA build of torch present)");
}
#endif

Args make_args(at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> w_dt,
               std::optional<at::Tensor> a, std::optional<at::Tensor> delta, int64_t window,
               bool causal, std::string form, double scale) {
  Args r{std::move(q), std::move(k), std::move(v), std::move(w_dt), std::move(a), std::move(delta),
         window, causal, std::move(form), scale};
  if (r.delta_given() && (r.w_dt || r.a))
    throw dma::Error("delta: given together with w_dt/a; pass either w_dt and a, or delta");
  return r;
}

std::vector<at::Tensor> forward(at::Tensor q, at::Tensor k, at::Tensor v,
                                std::optional<at::Tensor> w_dt, std::optional<at::Tensor> a,
                                std::optional<at::Tensor> delta, int64_t window, bool causal,
                                std::string form, double scale, bool check) {
  const Args args = make_args(q, k, v, w_dt, a, delta, window, causal, form, scale);
  if (q.is_cuda()) {
#ifdef DMA_TORCH_WITH_CUDA
    return forward_cuda(args, check);
#else
    no_cuda();
#endif
  }
  (void)check;  // the CPU path always checks
  if (q.scalar_type() == at::kDouble) return forward_cpu<double>(args);
  if (q.scalar_type() == at::kFloat) return forward_cpu<float>(args);
  throw dma::Error(std::string("q: dtype ") + c10::toString(q.scalar_type()) +
                   " on the CPU; expected float32 or float64");
}

std::vector<at::Tensor> backward(at::Tensor q, at::Tensor k, at::Tensor v,
                                 std::optional<at::Tensor> w_dt, std::optional<at::Tensor> a,
                                 at::Tensor delta, at::Tensor mask_state, at::Tensor o,
                                 at::Tensor lse, at::Tensor dout, int64_t window, bool causal,
                                 std::string form, double scale) {
  // delta_given: the forward had no w_dt/a; then the forward's delta is the given one.
  const bool given = !w_dt.has_value();
  const Args args = make_args(q, k, v, w_dt, a, given ? std::optional<at::Tensor>(delta) : std::nullopt,
                              window, causal, form, scale);
  if (q.is_cuda()) {
#ifdef DMA_TORCH_WITH_CUDA
    return backward_cuda(args, delta, mask_state, o, lse, dout);
#else
    no_cuda();
#endif
  }
  if (q.scalar_type() == at::kDouble) return backward_cpu<double>(args, delta, mask_state, o, lse, dout);
  if (q.scalar_type() == at::kFloat) return backward_cpu<float>(args, delta, mask_state, o, lse, dout);
  throw dma::Error(std::string("q: dtype ") + c10::toString(q.scalar_type()) +
                   " on the CPU; expected float32 or float64");
}

}  // namespace
}  // namespace dma_torch

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pybind11::literals;
  m.doc() = "DMA (Dynamic Mask Attention) kernels for torch tensors; use dma_torch, not this module";
  pybind11::register_exception<dma::Error>(m, "DMAError", PyExc_ValueError);
  m.def("forward", &dma_torch::forward, "q"_a, "k"_a, "v"_a, "w_dt"_a, "a"_a, "delta"_a,
        "window"_a, "causal"_a, "form"_a, "scale"_a, "check"_a);
  m.def("backward", &dma_torch::backward, "q"_a, "k"_a, "v"_a, "w_dt"_a, "a"_a, "delta"_a,
        "mask_state"_a, "o"_a, "lse"_a, "dout"_a, "window"_a, "causal"_a, "form"_a, "scale"_a);
  m.def(
      "cuda_mask_state_bytes",
      [](int64_t B, int64_t Hq, int64_t Hkv, int64_t Hd, int64_t Lq, int64_t Lk, int64_t D,
         int64_t window, bool causal, const std::string& form, bool fp16) -> int64_t {
#ifdef DMA_TORCH_WITH_CUDA
        dma::Shape s{B, Hq, Hkv, Hd, Lq, Lk, D};
        dma::Options o;
        o.window = window;
        o.causal = causal;
        o.form = dma::parse_form(form);
        return dma_torch::cuda_mask_state_bytes(s, o, fp16);
#else
        (void)B, (void)Hq, (void)Hkv, (void)Hd, (void)Lq, (void)Lk, (void)D, (void)window,
            (void)causal, (void)form, (void)fp16;
        dma_torch::no_cuda();
#endif
      },
      "B"_a, "Hq"_a, "Hkv"_a, "Hd"_a, "Lq"_a, "Lk"_a, "D"_a, "window"_a, "causal"_a, "form"_a,
      "fp16"_a);
  m.def("build_info", [] {
    pybind11::dict d;
    d["eigen"] = bool(DMA_TORCH_HAVE_EIGEN);
#ifdef DMA_TORCH_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["cpu_path"] = DMA_TORCH_HAVE_EIGEN ? "tiled (core/src/tiled.cpp)"
                                         : "scalar reference (no Eigen3 at build time)";
    return d;
  });
}
