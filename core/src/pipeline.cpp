// The whole DMA pipeline on the CPU, phase by phase (DESIGN.md §1).
#include "dma/pipeline.hpp"

#include <chrono>

#include "dma/validate.hpp"

namespace dma {

const char* backend_name(Backend b) { return b == Backend::cpu ? "cpu" : "tiled"; }

template <typename T>
void validate_problem(const Problem<T>& p) {
  const Shape& s = p.shape;
  validate_shape(s, p.opt.causal);
  validate_options(s, p.opt);
  const std::vector<int64_t> q_dims{s.B, s.Hq, s.Lq, s.D}, kv_dims{s.B, s.Hkv, s.Lk, s.D};
  validate_numel(p.q, s.q_numel(), "q");
  validate_numel(p.k, s.kv_numel(), "k");
  validate_numel(p.v, s.kv_numel(), "v");
  validate_finite(p.q, q_dims, "q");
  validate_finite(p.k, kv_dims, "k");
  validate_finite(p.v, kv_dims, "v");
  if (p.delta_given()) {
    validate_numel(p.delta, s.delta_numel(), "delta");
    validate_finite(p.delta, {s.B, s.Hd, s.Lk}, "delta");
  } else {
    validate_numel(p.w_dt, s.w_dt_numel(), "w_dt");
    validate_numel(p.a, s.Hd, "a");
    validate_finite(p.w_dt, {s.Hd, s.Hkv * s.D}, "w_dt");
    validate_finite(p.a, {s.Hd}, "a");
  }
  if (p.has_backward()) {
    validate_numel(p.dout, s.q_numel(), "do");
    validate_finite(p.dout, q_dims, "do");
  }
}

namespace {

// Runs f and adds its wall-clock time in milliseconds to ms.
template <typename F>
auto timed(double& ms, F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  auto result = f();
  ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

}  // namespace

template <typename T>
Result<T> run_pipeline(const Problem<T>& p, Backend backend, const TileConfig& tc,
                       bool want_mask) {
  validate_problem(p);
  const Shape& s = p.shape;
  Result<T> r;

  // 1. dynamic weights delta (B,Hd,Lk), unless given
  r.delta = p.delta_given()
                ? p.delta
                : timed(r.times.delta, [&] { return dynamic_weights(s, p.opt.form, p.v, p.w_dt, p.a); });

  // 2. the mask: eviction positions always (the output `evict`), the explicit mask for the
  //    reference (which is written the obvious way) or when asked for
  r.evict = timed(r.times.mask, [&] { return evict_positions(s, p.opt.window, r.delta); });
  if (backend == Backend::cpu || want_mask)
    r.mask = timed(r.times.mask, [&] { return explicit_mask(s, p.opt, r.delta); });

  // 3. forward
  r.fwd = timed(r.times.forward, [&] {
    return backend == Backend::cpu
               ? reference_forward(s, p.opt, p.q, p.k, p.v, r.delta, r.mask)
               : tiled_forward(s, p.opt, tc, p.q, p.k, p.v, r.delta, r.evict, &r.fwd_counters);
  });
  if (!p.has_backward()) return r;

  // 4. backward of the attention, then of the dynamic weights
  r.grads = timed(r.times.backward, [&] {
    return backend == Backend::cpu
               ? reference_backward(s, p.opt, p.q, p.k, p.v, r.delta, r.mask, r.fwd, p.dout)
               : tiled_backward(s, p.opt, tc, p.q, p.k, p.v, r.delta, r.evict, r.fwd, p.dout,
                                &r.bwd_counters);
  });
  if (!p.delta_given()) {
    DynamicWeightGrads<T> dw = timed(r.times.backward, [&] {
      return dynamic_weights_backward(s, p.opt.form, p.v, p.w_dt, p.a, r.grads.ddelta);
    });
    for (size_t n = 0; n < dw.dv.size(); ++n) r.grads.dv[n] += dw.dv[n];  // v's total gradient
    r.dw_dt = std::move(dw.dw_dt);
    r.da = std::move(dw.da);
  }
  return r;
}

template void validate_problem(const Problem<float>&);
template void validate_problem(const Problem<double>&);
template Result<float> run_pipeline(const Problem<float>&, Backend, const TileConfig&, bool);
template Result<double> run_pipeline(const Problem<double>&, Backend, const TileConfig&, bool);

}  // namespace dma
