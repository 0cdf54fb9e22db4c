// dma_torch._C: the DMA op on torch tensors. CPU tensors (float32/float64) run the tiled CPU code of
// core/ (dma::run_pipeline with Backend::tiled for the forward, tiled_backward and
// dynamic_weights_backward for the backward); CUDA tensors go to cuda_ops.cpp.
//
//   forward(q, k, v, w_dt, a, delta, window, causal, form, scale, check) -> [o, lse, delta, mask_state]
//   backward(q, k, v, w_dt, a, delta, mask_state, o, lse, dout, window, causal, form, scale)
//       -> [dq, dk, dv, ddelta, dw_dt, da]        (dw_dt, da empty when delta was given)
//
//   DecodeCache: the decode cache of core/include/dma/decode.hpp (CPU; see its block below)
//   CudaDecodeCache: the GPU one, dma/cuda_decode.hpp (cuda_ops.cpp; CUDA builds only)
//
// On the CPU every output has q's dtype and mask_state is evict (B,Hd,Lk) int64. dma::Error
// becomes dma_torch._C.DMAError, a ValueError.
#include <torch/extension.h>

#include <cstring>
#include <mutex>
#include <variant>

#include "common.h"
#include "dma/decode.hpp"
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

// ---- decoding: dma::DecodeCache behind a Python object (core/include/dma/decode.hpp) ----------
//
//   DecodeCache(B, Hq, Hkv, Hd, D, window, form, scale, max_length, float64)
//   .prefill(b, k, v, w_dt, a, q, delta) -> (delta (Hd,P), evict (Hd,P) int64, o (Hq,P,D) | None,
//                                             lse (Hq,P) | None)
//   .step(q, k, v, w_dt, a, active, delta) -> (o (B,Hq,D), lse (B,Hq), delta (B,Hd),
//                                              position (B) int64, evicted (B,Hd) int64)
//   .positions(b, hd), .deltas(b, hd), .length(), .max_length(), .reset(b, max_length)
//
// The cache holds float or double entries (float64 picks); every tensor passed must be a CPU
// tensor of that dtype and of the exact shape. dma_torch.DMACache (dma_torch/decode.py) checks
// the arguments first. A call that throws leaves the cache as it was (decode.hpp). The GIL is
// released while the core works; a mutex serialises the calls on one cache.
namespace dma_torch {
namespace {

using OptTensor = std::optional<at::Tensor>;

template <typename C>
struct cache_value;
template <typename T>
struct cache_value<dma::DecodeCache<T>> {
  using type = T;
};

template <typename T>
std::vector<T> cache_vec(const at::Tensor& t, const char* name, const std::vector<int64_t>& sizes) {
  const auto want = c10::CppTypeToScalarType<T>::value;
  if (t.device().type() != at::kCPU || t.scalar_type() != want)
    throw dma::Error(std::string(name) + ": a " + std::string(c10::toString(t.scalar_type())) +
                     " tensor on " + t.device().str() + "; the cache takes " +
                     c10::toString(want) + " tensors on the CPU");
  if (t.sizes() != at::IntArrayRef(sizes))
    throw dma::Error(std::string(name) + ": shape " + shape_string(t.sizes()) + ", expected " +
                     shape_string(sizes));
  return to_vec<T>(t, name);
}

template <typename T>
std::vector<T> optional_vec(const OptTensor& t, const char* name, const std::vector<int64_t>& sizes) {
  return t ? cache_vec<T>(*t, name, sizes) : std::vector<T>{};
}

class DecodeCacheObject {
 public:
  DecodeCacheObject(int64_t B, int64_t Hq, int64_t Hkv, int64_t Hd, int64_t D, int64_t window,
                    const std::string& form, double scale, int64_t max_length, bool float64)
      : cache_(make(B, Hq, Hkv, Hd, D, window, form, scale, max_length, float64)) {}

  pybind11::tuple prefill(int64_t b, const at::Tensor& k, const at::Tensor& v, const OptTensor& w_dt,
                          const OptTensor& a, const OptTensor& q, const OptTensor& delta) {
    return std::visit([&](auto& c) { return prefill_impl(c, b, k, v, w_dt, a, q, delta); }, cache_);
  }

  pybind11::tuple step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const OptTensor& w_dt, const OptTensor& a,
                       const std::optional<std::vector<int64_t>>& active, const OptTensor& delta) {
    return std::visit([&](auto& c) { return step_impl(c, q, k, v, w_dt, a, active, delta); }, cache_);
  }

  std::vector<int64_t> positions(int64_t b, int64_t hd) const {
    return std::visit([&](const auto& c) {
      std::lock_guard<std::mutex> lock(mutex_);
      check_head(c.config, b, hd);
      return c.positions(b, hd);
    }, cache_);
  }

  std::vector<double> deltas(int64_t b, int64_t hd) const {
    return std::visit([&](const auto& c) {
      std::lock_guard<std::mutex> lock(mutex_);
      check_head(c.config, b, hd);
      std::vector<double> out;
      for (const auto& e : c.at(b, hd)) out.push_back(static_cast<double>(e.delta));
      return out;
    }, cache_);
  }

  std::vector<int64_t> length() const {
    return std::visit([&](const auto& c) {
      std::lock_guard<std::mutex> lock(mutex_);
      return c.length;
    }, cache_);
  }

  std::vector<int64_t> max_length() const {
    return std::visit([&](const auto& c) {
      std::lock_guard<std::mutex> lock(mutex_);
      return c.max_length;
    }, cache_);
  }

  // Empties sequence b; max_length >= 0 also sets its declared maximum (0 = none), -1 keeps it.
  void reset(int64_t b, int64_t max_length) {
    if (max_length < -1)
      throw dma::Error("max_length: " + std::to_string(max_length) +
                       " (must be >= 0; 0 means no limit)");
    std::visit([&](auto& c) {
      std::lock_guard<std::mutex> lock(mutex_);
      c.reset_sequence(b);  // checks b
      if (max_length >= 0) c.max_length[b] = max_length;
    }, cache_);
  }

 private:
  using Variant = std::variant<dma::DecodeCache<float>, dma::DecodeCache<double>>;

  static Variant make(int64_t B, int64_t Hq, int64_t Hkv, int64_t Hd, int64_t D, int64_t window,
                      const std::string& form, double scale, int64_t max_length, bool float64) {
    dma::DecodeConfig c;
    c.B = B; c.Hq = Hq; c.Hkv = Hkv; c.Hd = Hd; c.D = D;
    c.window = window;
    c.form = dma::parse_form(form);
    c.scale = scale;
    c.max_length = max_length;
    if (float64) return Variant(std::in_place_type<dma::DecodeCache<double>>, c);
    return Variant(std::in_place_type<dma::DecodeCache<float>>, c);
  }

  static void check_head(const dma::DecodeConfig& c, int64_t b, int64_t hd) {
    if (b < 0 || b >= c.B)
      throw dma::Error("b: sequence " + std::to_string(b) + " does not exist (B = " +
                       std::to_string(c.B) + ")");
    if (hd < 0 || hd >= c.Hd)
      throw dma::Error("h: delta head " + std::to_string(hd) + " does not exist (Hd = " +
                       std::to_string(c.Hd) + ")");
  }

  template <typename C>
  pybind11::tuple prefill_impl(C& cache, int64_t b, const at::Tensor& k, const at::Tensor& v,
                               const OptTensor& w_dt, const OptTensor& a, const OptTensor& q,
                               const OptTensor& delta) {
    using T = typename cache_value<C>::type;
    const dma::DecodeConfig& c = cache.config;
    check_weights_given(w_dt, a, delta);
    expect_dim(k, 3, "k");
    const int64_t P = k.size(1);
    dma::Prompt<T> prompt;
    prompt.k = cache_vec<T>(k, "k", {c.Hkv, P, c.D});
    prompt.v = cache_vec<T>(v, "v", {c.Hkv, P, c.D});
    prompt.q = optional_vec<T>(q, "q", {c.Hq, P, c.D});
    prompt.delta = optional_vec<T>(delta, "delta", {c.Hd, P});
    const std::vector<T> wv = optional_vec<T>(w_dt, "w_dt", {c.Hd, c.Hkv * c.D});
    const std::vector<T> av = optional_vec<T>(a, "a", {c.Hd});
    // finiteness first, so that an index names the prompt's own tensor (with q, the core checks
    // a one-sequence forward, whose indices have a leading batch index 0)
    dma::validate_finite(prompt.q, {c.Hq, P, c.D}, "q");
    dma::validate_finite(prompt.k, {c.Hkv, P, c.D}, "k");
    dma::validate_finite(prompt.v, {c.Hkv, P, c.D}, "v");
    dma::validate_finite(prompt.delta, {c.Hd, P}, "delta");
    dma::PrefillResult<T> r;
    {
      pybind11::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lock(mutex_);
      r = dma::prefill(cache, b, prompt, wv, av);
    }
    pybind11::object o = pybind11::none(), lse = pybind11::none();
    if (q) {
      o = pybind11::cast(to_tensor(r.fwd.o, {c.Hq, P, c.D}));
      lse = pybind11::cast(to_tensor(r.fwd.lse, {c.Hq, P}));
    }
    return pybind11::make_tuple(to_tensor(r.delta, {c.Hd, P}), to_tensor(r.evict, {c.Hd, P}), o, lse);
  }

  template <typename C>
  pybind11::tuple step_impl(C& cache, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const OptTensor& w_dt, const OptTensor& a,
                            const std::optional<std::vector<int64_t>>& active, const OptTensor& delta) {
    using T = typename cache_value<C>::type;
    const dma::DecodeConfig& c = cache.config;
    check_weights_given(w_dt, a, delta);
    dma::DecodeTokens<T> tokens;
    tokens.q = cache_vec<T>(q, "q", {c.B, c.Hq, c.D});
    tokens.k = cache_vec<T>(k, "k", {c.B, c.Hkv, c.D});
    tokens.v = cache_vec<T>(v, "v", {c.B, c.Hkv, c.D});
    tokens.delta = optional_vec<T>(delta, "delta", {c.B, c.Hd});
    if (active) {
      if (static_cast<int64_t>(active->size()) != c.B)
        throw dma::Error("active: has " + std::to_string(active->size()) +
                         " elements, expected B = " + std::to_string(c.B));
      for (int64_t x : *active) tokens.active.push_back(x != 0 ? 1 : 0);
    }
    const std::vector<T> wv = optional_vec<T>(w_dt, "w_dt", {c.Hd, c.Hkv * c.D});
    const std::vector<T> av = optional_vec<T>(a, "a", {c.Hd});
    dma::DecodeOutput<T> out;
    {
      pybind11::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lock(mutex_);
      out = dma::step(cache, tokens, wv, av);
    }
    return pybind11::make_tuple(to_tensor(out.o, {c.B, c.Hq, c.D}), to_tensor(out.lse, {c.B, c.Hq}),
                                to_tensor(out.delta, {c.B, c.Hd}), to_tensor(out.position, {c.B}),
                                to_tensor(out.evicted, {c.B, c.Hd}));
  }

  Variant cache_;
  mutable std::mutex mutex_;
};

void bind_decode(pybind11::module_& m) {
  using namespace pybind11::literals;
  pybind11::class_<DecodeCacheObject>(m, "DecodeCache")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const std::string&,
                          double, int64_t, bool>(),
           "B"_a, "Hq"_a, "Hkv"_a, "Hd"_a, "D"_a, "window"_a, "form"_a, "scale"_a, "max_length"_a,
           "float64"_a)
      .def("prefill", &DecodeCacheObject::prefill, "b"_a, "k"_a, "v"_a, "w_dt"_a, "a"_a, "q"_a,
           "delta"_a)
      .def("step", &DecodeCacheObject::step, "q"_a, "k"_a, "v"_a, "w_dt"_a, "a"_a, "active"_a,
           "delta"_a)
      .def("positions", &DecodeCacheObject::positions, "b"_a, "hd"_a)
      .def("deltas", &DecodeCacheObject::deltas, "b"_a, "hd"_a)
      .def("length", &DecodeCacheObject::length)
      .def("max_length", &DecodeCacheObject::max_length)
      .def("reset", &DecodeCacheObject::reset, "b"_a, "max_length"_a);
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
  dma_torch::bind_decode(m);
#ifdef DMA_TORCH_WITH_CUDA
  dma_torch::bind_cuda_decode(m);
#endif
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
